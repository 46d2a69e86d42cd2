//! Applying events to read models: one batch inside one transaction, the
//! installation of the tables, and filling tables from the log.

use crate::db::{Checkpoint, ReadDb, Tx};
use crate::envelope::{Envelope, decode_all};
use crate::error::ProjectionError;
use crate::fold::Wanted;
use crate::projection::Projection;
use std::sync::Arc;
use store::EventStore;
use tokio::sync::mpsc;

/// Most events applied in one transaction.
pub const PROJECTION_BATCH_MAX: usize = 10_000;
/// Most keys loaded by one statement.
const LOAD_KEYS_MAX: usize = 5_000;
/// Events a fill applies per transaction.
pub const FILL_COMMIT_EVENTS: usize = 10_000;
/// Batches read ahead of the one being applied.
const READ_AHEAD_BATCHES: usize = 2;

/// Applies a batch of events to one generation of a projection's tables
/// inside `tx`: loads the rows the batch touches, folds, writes what changed.
pub async fn apply_batch(
    tx: &mut Tx,
    projection: Projection,
    generation: i64,
    events: &[Envelope],
) -> Result<(), ProjectionError> {
    let mut fold = projection.fold();
    let mut wanted = Wanted::default();
    for envelope in events {
        fold.want(envelope, &mut wanted);
    }
    for (table, keys) in wanted.tables() {
        for chunk in keys.chunks(LOAD_KEYS_MAX) {
            let rows = tx.load(table, generation, chunk).await?;
            fold.load(table, rows)?;
        }
    }
    for envelope in events {
        fold.apply(envelope)?;
    }
    for (table, keys) in fold.removals() {
        let keys = serde_json::to_string(&keys).expect("BUG: keys serialize");
        tx.execute_json(table.delete(generation, tx.dialect()), keys)
            .await?;
    }
    for (table, rows) in fold.changes() {
        tx.write_rows(table, generation, &rows).await?;
    }
    Ok(())
}

/// Creates the tables and checkpoint of every projection that has none yet.
/// Returns the projections whose stored table shape is older than the code's
/// (they need a rebuild); refuses read models built by newer code.
pub async fn install(db: &ReadDb) -> Result<Vec<Projection>, ProjectionError> {
    let mut stale = Vec::new();
    for projection in Projection::ALL {
        let mut tx = db.begin().await?;
        // Two processes starting on a fresh database must not both create.
        tx.lock_install().await?;
        match tx.checkpoint(projection).await? {
            Some(checkpoint) => {
                if checkpoint.schema_version > projection.schema_version() {
                    return Err(ProjectionError::SchemaNewer {
                        projection: projection.name(),
                        stored: checkpoint.schema_version,
                        known: projection.schema_version(),
                    });
                }
                if checkpoint.schema_version < projection.schema_version() {
                    stale.push(projection);
                }
                continue;
            }
            None => {
                let first = Checkpoint {
                    generation: 1,
                    schema_version: projection.schema_version(),
                    position: 0,
                };
                tx.create_tables(projection, first.generation).await?;
                tx.point_views(projection, first.generation).await?;
                tx.set_checkpoint(projection, first).await?;
                tx.commit().await?;
            }
        }
    }
    Ok(stale)
}

/// A generation of a projection's tables being filled, up to a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The projection.
    pub projection: Projection,
    /// The generation of its tables to fill.
    pub generation: i64,
    /// The last position it takes.
    pub until: i64,
}

/// Something that watches every batch a fill reads (the trial balance does).
pub trait Observer: Send {
    /// Sees a decoded batch, in position order.
    fn observe(&mut self, events: &[Envelope]) -> Result<(), ProjectionError>;
}

/// A rebuild's lease on its projections, renewed at every commit of a fill.
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    /// The projections leased.
    pub projections: &'a [Projection],
    /// The lease holder.
    pub owner: &'a str,
}

/// What a fill fills.
#[derive(Debug, Clone, Copy)]
pub struct FillPlan<'a> {
    /// The tables to fill, each up to its position.
    pub targets: &'a [Target],
    /// The position to start after.
    pub after: i64,
    /// Events per read.
    pub batch: usize,
    /// The rebuild lease to renew at each commit, if any.
    pub lease: Option<Lease<'a>>,
}

/// Fills the targets' tables with the events after `after`, reading the log
/// once for all of them; one transaction per batch, with the next batches
/// read and decoded while one is applied. Checkpoints are not touched.
/// Returns the last position applied.
pub async fn fill(
    store: Arc<dyn EventStore>,
    db: &ReadDb,
    plan: FillPlan<'_>,
    observer: &mut dyn Observer,
    progress: &mut (dyn FnMut(i64, usize) + Send),
) -> Result<i64, ProjectionError> {
    let FillPlan {
        targets,
        after,
        batch,
        lease,
    } = plan;
    let Some(until) = targets.iter().map(|t| t.until).max() else {
        return Ok(after);
    };
    let batch = batch.clamp(1, PROJECTION_BATCH_MAX);
    let (sender, mut receiver) = mpsc::channel(READ_AHEAD_BATCHES);
    let reader = tokio::spawn(read_ahead(store, after, until, batch, sender));
    let mut position = after;
    // Several batches share a transaction: pages a batch dirties are often
    // dirtied again by the next, and written once per commit.
    let (mut open, mut uncommitted) = (None::<Tx>, 0);
    while let Some(events) = receiver.recv().await {
        let events = events?;
        let last = events.last().map_or(position, Envelope::position);
        observer.observe(&events)?;
        let mut tx = match open.take() {
            Some(tx) => tx,
            None => db.begin().await?,
        };
        for target in targets {
            let upto = events.partition_point(|e| e.position() <= target.until);
            if upto > 0 {
                apply_batch(
                    &mut tx,
                    target.projection,
                    target.generation,
                    &events[..upto],
                )
                .await?;
            }
        }
        uncommitted += events.len();
        if uncommitted >= FILL_COMMIT_EVENTS {
            if let Some(lease) = lease {
                tx.renew_rebuild(lease.projections, lease.owner).await?;
            }
            tx.commit().await?;
            uncommitted = 0;
        } else {
            open = Some(tx);
        }
        position = last;
        progress(position, events.len());
    }
    if let Some(mut tx) = open {
        if let Some(lease) = lease {
            tx.renew_rebuild(lease.projections, lease.owner).await?;
        }
        tx.commit().await?;
    }
    reader.await.expect("BUG: the log reader panicked");
    Ok(position)
}

async fn read_ahead(
    store: Arc<dyn EventStore>,
    mut after: i64,
    until: i64,
    batch: usize,
    sender: mpsc::Sender<Result<Vec<Envelope>, ProjectionError>>,
) {
    while after < until {
        let read = store.read_all(after, batch).await;
        let mut events = match read {
            Ok(events) if events.is_empty() => return,
            Ok(events) => events,
            Err(e) => {
                let _ = sender.send(Err(e.into())).await;
                return;
            }
        };
        events.retain(|e| e.position <= until);
        after = events.last().map_or(until, |e| e.position);
        // Decoding here, in the reader task, overlaps it with applying.
        let decoded = decode_all(events);
        let failed = decoded.is_err();
        if sender.send(decoded).await.is_err() || failed {
            return;
        }
    }
}

/// An observer that watches nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    fn observe(&mut self, _events: &[Envelope]) -> Result<(), ProjectionError> {
        Ok(())
    }
}
