//! Rebuilding read models from position zero while readers keep reading.
//!
//! Generation N+1 of each chosen projection is filled beside the live
//! generation N (its secondary indexes and append-only keys are built after
//! the fill, by sorting, rather than row by row). Then one transaction locks
//! the checkpoints, applies what was appended meanwhile, and moves the
//! checkpoints and the readers' views to N+1; a second one drops N. A crash
//! before the first commit leaves N live and untouched (the leftover N+1
//! tables are dropped by the next rebuild of that projection).

use crate::apply::{FillPlan, Lease, NoObserver, Target, apply_batch, fill, install};
use crate::db::{Checkpoint, ReadDb};
use crate::envelope::decode_all;
use crate::error::ProjectionError;
use crate::projection::Projection;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::EventStore;
use uuid::Uuid;

/// Events per rebuild batch.
pub const REBUILD_BATCH_DEFAULT: usize = 10_000;

/// What a rebuild did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildReport {
    /// The projections rebuilt.
    pub projections: Vec<&'static str>,
    /// Events replayed before the swap.
    pub events: i64,
    /// Events applied inside the swap (appended during the rebuild).
    pub caught_up: usize,
    /// The position every rebuilt projection stands at.
    pub position: i64,
    /// Time spent, in seconds.
    pub seconds: f64,
}

impl RebuildReport {
    /// Events replayed per second.
    pub fn events_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.events as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Readies the read models for a process that runs projections: installs
/// what is missing and rebuilds any projection whose table shape is older
/// than this build's.
pub async fn prepare(store: Arc<dyn EventStore>, db: &ReadDb) -> Result<(), ProjectionError> {
    let stale = install(db).await?;
    if !stale.is_empty() {
        tracing::info!(projections = ?stale, "table shapes changed; rebuilding");
        rebuild(store, db, &stale, REBUILD_BATCH_DEFAULT, &mut |_, _| {}).await?;
    }
    Ok(())
}

/// Rebuilds the given projections from position zero and swaps them in.
/// `progress` is told the position reached and the head being replayed to.
/// Holds a lease on the projections meanwhile: a second rebuild of any of
/// them fails at once with `RebuildRunning`.
pub async fn rebuild(
    store: Arc<dyn EventStore>,
    db: &ReadDb,
    projections: &[Projection],
    batch: usize,
    progress: &mut (dyn FnMut(i64, i64) + Send),
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    install(db).await?;
    let owner = format!("rebuild {} (pid {})", Uuid::now_v7(), std::process::id());
    let lease = Lease {
        projections,
        owner: &owner,
    };
    let mut live = Vec::with_capacity(projections.len());
    let mut tx = db.begin().await?;
    tx.claim_rebuild(projections, &owner).await?;
    for projection in projections {
        let checkpoint = tx
            .checkpoint(*projection)
            .await?
            .expect("BUG: installed above");
        live.push((*projection, checkpoint.generation));
        tx.create_bare_tables(*projection, checkpoint.generation + 1)
            .await?;
    }
    tx.commit().await?;
    let rebuilt = fill_and_swap(store, db, &live, batch, lease, progress).await;
    if rebuilt.is_err() {
        // Best effort: an unreleased lease expires by itself.
        if let Ok(mut tx) = db.begin().await
            && tx.release_rebuild(projections, &owner).await.is_ok()
        {
            let _ = tx.commit().await;
        }
    }
    let (events, caught_up, position) = rebuilt?;
    Ok(RebuildReport {
        projections: projections.iter().map(|p| p.name()).collect(),
        events,
        caught_up,
        position,
        seconds: started.elapsed().as_secs_f64(),
    })
}

async fn fill_and_swap(
    store: Arc<dyn EventStore>,
    db: &ReadDb,
    live: &[(Projection, i64)],
    batch: usize,
    lease: Lease<'_>,
    progress: &mut (dyn FnMut(i64, i64) + Send),
) -> Result<(i64, usize, i64), ProjectionError> {
    let head = store.head().await?;
    let targets: Vec<Target> = live
        .iter()
        .map(|(projection, generation)| Target {
            projection: *projection,
            generation: generation + 1,
            until: head,
        })
        .collect();
    let plan = FillPlan {
        targets: &targets,
        after: 0,
        batch,
        lease: Some(lease),
    };
    let filled = fill(
        store.clone(),
        db,
        plan,
        &mut NoObserver,
        &mut |position, _| progress(position, head),
    )
    .await?;
    let mut tx = db.begin().await?;
    tx.renew_rebuild(lease.projections, lease.owner).await?;
    for (projection, generation) in live {
        tx.create_indexes(*projection, generation + 1).await?;
    }
    tx.commit().await?;
    let (caught_up, position) = swap(store.as_ref(), db, live, filled, lease).await?;
    Ok((filled, caught_up, position))
}

async fn drop_generations(db: &ReadDb, live: &[(Projection, i64)]) -> Result<(), ProjectionError> {
    let mut tx = db.begin().await?;
    for (projection, generation) in live {
        tx.drop_tables(*projection, *generation).await?;
    }
    tx.commit().await
}

/// Most events applied inside the swap transaction per read.
const SWAP_READ_MAX: usize = 5_000;
/// How long a swap may keep catching up before it gives the log a rest.
const SWAP_CATCH_UP_MAX: Duration = Duration::from_secs(30);

/// In one transaction: applies the events after `filled`, moves checkpoints
/// and views to the new generation and drops the old one.
async fn swap(
    store: &dyn EventStore,
    db: &ReadDb,
    live: &[(Projection, i64)],
    filled: i64,
    lease: Lease<'_>,
) -> Result<(usize, i64), ProjectionError> {
    let mut tx = db.begin().await?;
    tx.renew_rebuild(lease.projections, lease.owner).await?;
    for (projection, generation) in live {
        let current = tx.checkpoint(*projection).await?;
        if current.map(|c| c.generation) != Some(*generation) {
            return Err(ProjectionError::RebuildRaced(projection.name()));
        }
    }
    let started = Instant::now();
    let mut position = filled;
    let mut caught_up = 0;
    loop {
        let events = store.read_all(position, SWAP_READ_MAX).await?;
        let Some(last) = events.last().map(|e| e.position) else {
            break;
        };
        let envelopes = decode_all(events)?;
        for (projection, generation) in live {
            apply_batch(&mut tx, *projection, generation + 1, &envelopes).await?;
        }
        caught_up += envelopes.len();
        position = last;
        if started.elapsed() > SWAP_CATCH_UP_MAX {
            // The runner takes the rest from the checkpoint.
            break;
        }
    }
    for (projection, generation) in live {
        let checkpoint = Checkpoint {
            generation: generation + 1,
            schema_version: projection.schema_version(),
            position,
        };
        tx.set_checkpoint(*projection, checkpoint).await?;
        tx.point_views(*projection, checkpoint.generation).await?;
    }
    tx.release_rebuild(lease.projections, lease.owner).await?;
    tx.commit().await?;
    // The old generation goes in a transaction of its own: dropping a table
    // waits for its last readers (a drift check's snapshot, a slow query),
    // and that wait must not hold the checkpoints the runners need.
    if let Err(error) = drop_generations(db, live).await {
        tracing::warn!(%error, "the replaced tables could not be dropped; they stay unused");
    }
    Ok((caught_up, position))
}
