//! The live sale progress: one task reads the read models a few times a
//! second and publishes the figures; every `/v1/progress/stream` client
//! watches that one copy, so a thousand dashboards cost one query.
//!
//! The same reads serve `GET /v1/progress` and
//! `GET /v1/products/{id}/progress` from memory, already serialized
//! ([`ProgressFeed::served`]). Freshness: an answer from memory reflects
//! everything the sale-progress projection had committed when the request
//! arrived (when the projection has moved since the last read, the request
//! wakes the task and waits for the next read, which every waiting request
//! shares), and it is never older than [`STALE_AFTER`] (1 s): when the task
//! has not read for that long, or the wait exceeds [`WAIT_MAX`], the request
//! queries the database itself.

use super::model::{ProgressListResponse, ProgressResponse};
use axum::body::Bytes;
use axum::response::sse::Event;
use engine::Engine;
use futures::Stream;
use projections::query::PROGRESS_LIST_MAX;
use projections::{Projection, ReadDb, Statuses};
use serde::Serialize;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// How often the figures are read.
pub const FEED_PERIOD: Duration = Duration::from_millis(250);

/// The oldest read a progress request is answered from; older, it queries
/// the database.
pub const STALE_AFTER: Duration = Duration::from_secs(1);

/// How long a progress request waits for the task's next read before it
/// queries the database itself.
pub const WAIT_MAX: Duration = Duration::from_secs(1);

/// The last read, serialized for the progress routes.
#[derive(Debug, Clone)]
pub struct Served {
    /// The sale-progress projection's checkpoint before the read: the
    /// figures reflect at least this position.
    pub seen: i64,
    /// When the read started.
    pub at: Instant,
    /// `GET /v1/progress`'s body.
    pub list: Bytes,
    /// `GET /v1/products/{id}/progress`'s body, by product.
    pub by_product: HashMap<String, Bytes>,
    /// Whether every product was read (fewer than the list's bound), so a
    /// product missing here does not exist.
    pub complete: bool,
}

impl Served {
    fn read(seen: i64, at: Instant, products: &[ProgressResponse]) -> Served {
        let list = serde_json::to_vec(&ProgressListResponse {
            products: products.to_vec(),
        })
        .expect("BUG: progress figures serialize");
        let by_product = products
            .iter()
            .map(|p| {
                let body = serde_json::to_vec(p).expect("BUG: progress figures serialize");
                (p.product_id.clone(), Bytes::from(body))
            })
            .collect();
        Served {
            seen,
            at,
            list: Bytes::from(list),
            by_product,
            complete: (products.len() as i64) < PROGRESS_LIST_MAX,
        }
    }
}

/// Where progress answers came from since the feed started.
#[derive(Debug, Default)]
pub struct ServedCounts {
    /// Answered from memory.
    pub memory: AtomicU64,
    /// Answered by a database query (the feed was stale or too slow).
    pub database: AtomicU64,
}

/// What every dashboard sees.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Every product's progress.
    pub products: Vec<ProgressResponse>,
    /// Stream-level figures.
    pub stats: Stats,
}

/// Figures beside the products.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// The largest projection lag, in events.
    pub projection_lag: i64,
    /// Purchases confirmed by this node since it started.
    pub purchases_confirmed: u64,
    /// Purchases refused by this node since it started.
    pub purchases_refused: u64,
}

/// Bounds on the progress streams.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Streams open at once in all.
    pub total_max: usize,
    /// Streams open at once from one client address.
    pub per_address_max: u32,
    /// How long one stream lasts; the dashboard then reconnects by itself.
    pub lifetime: Duration,
}

/// The published figures, and the switch that ends every stream.
#[derive(Clone)]
pub struct ProgressFeed {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    served: watch::Receiver<Option<Arc<Served>>>,
    wake: Arc<Notify>,
    statuses: Arc<Statuses>,
    counts: Arc<ServedCounts>,
    closing: watch::Sender<bool>,
    task: Arc<tokio::task::AbortHandle>,
    limits: StreamLimits,
    open: Arc<Mutex<OpenStreams>>,
}

/// Streams open now, in all and per address (only addresses with a stream
/// open are kept, so the map is bounded by the total).
#[derive(Debug, Default)]
struct OpenStreams {
    total: usize,
    per_address: HashMap<String, u32>,
}

/// One open stream's place, given back when the stream ends.
pub struct StreamSlot {
    open: Arc<Mutex<OpenStreams>>,
    address: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("BUG: open streams poisoned");
        open.total -= 1;
        if let Some(count) = open.per_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.per_address.remove(&self.address);
            }
        }
    }
}

impl ProgressFeed {
    /// Starts reading the figures; streams are bounded by `limits`.
    pub fn start(
        db: ReadDb,
        statuses: Arc<Statuses>,
        engine: Engine,
        limits: StreamLimits,
    ) -> ProgressFeed {
        let (publish, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        let (publish_served, served) = watch::channel(None);
        let (closing, _) = watch::channel(false);
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        let task_statuses = statuses.clone();
        let task = tokio::spawn(async move {
            let statuses = task_statuses;
            let mut tick = tokio::time::interval(FEED_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = woken.notified() => {}
                }
                let seen = statuses.position(Projection::SaleProgress);
                let at = Instant::now();
                let products: Vec<ProgressResponse> =
                    match projections::query::all_progress(&db).await {
                        Ok(products) => products.into_iter().map(ProgressResponse::from).collect(),
                        Err(error) => {
                            tracing::debug!(%error, "progress feed could not read the read models");
                            continue;
                        }
                    };
                publish_served.send_replace(Some(Arc::new(Served::read(seen, at, &products))));
                let engine_stats = engine.stats();
                let next = Snapshot {
                    products,
                    stats: Stats {
                        projection_lag: statuses.lag_max(),
                        purchases_confirmed: engine_stats.purchases_confirmed,
                        purchases_refused: engine_stats.purchases_refused,
                    },
                };
                publish.send_if_modified(|current| {
                    let changed = **current != next;
                    if changed {
                        *current = Arc::new(next.clone());
                    }
                    changed
                });
            }
        })
        .abort_handle();
        ProgressFeed {
            snapshot,
            served,
            wake,
            statuses,
            counts: Arc::new(ServedCounts::default()),
            closing,
            task: Arc::new(task),
            limits,
            open: Arc::new(Mutex::new(OpenStreams::default())),
        }
    }

    /// The last read, when it reflects everything the sale-progress
    /// projection has committed now and is younger than [`STALE_AFTER`];
    /// when the projection has moved since, the next read (woken now, shared
    /// by every request waiting) if it comes within [`WAIT_MAX`]. `None`
    /// (the task is stuck, stopped or slow): query the database.
    pub async fn served(&self) -> Option<Arc<Served>> {
        let wanted = self.statuses.position(Projection::SaleProgress);
        let usable = |served: &Option<Arc<Served>>| {
            served
                .as_ref()
                .is_some_and(|s| s.seen >= wanted && s.at.elapsed() <= STALE_AFTER)
        };
        let current = self.served.borrow().clone();
        if usable(&current) {
            return current;
        }
        if current
            .as_ref()
            .is_some_and(|s| s.at.elapsed() > STALE_AFTER)
        {
            // The task has not read for a second: it is stuck or stopped, so
            // waiting for it would only delay the answer.
            return None;
        }
        self.wake.notify_one();
        let mut served = self.served.clone();
        let next = tokio::time::timeout(WAIT_MAX, served.wait_for(usable)).await;
        match next {
            Ok(Ok(next)) => next.clone(),
            _ => None,
        }
    }

    /// Counts where a progress answer came from.
    pub fn count_served(&self, from_memory: bool) {
        let counter = if from_memory {
            &self.counts.memory
        } else {
            &self.counts.database
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Progress answers from memory and from the database so far.
    pub fn served_counts(&self) -> (u64, u64) {
        (
            self.counts.memory.load(Ordering::Relaxed),
            self.counts.database.load(Ordering::Relaxed),
        )
    }

    /// A place for one more stream from `address`, unless the caps are
    /// reached.
    pub fn admit(&self, address: &str) -> Option<StreamSlot> {
        let mut open = self.open.lock().expect("BUG: open streams poisoned");
        let from_address = open.per_address.get(address).copied().unwrap_or(0);
        if open.total >= self.limits.total_max || from_address >= self.limits.per_address_max {
            metrics::counter!("ledger_streams_refused_total").increment(1);
            return None;
        }
        open.total += 1;
        *open.per_address.entry(address.to_owned()).or_insert(0) += 1;
        Some(StreamSlot {
            open: self.open.clone(),
            address: address.to_owned(),
        })
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.open.lock().expect("BUG: open streams poisoned").total
    }

    /// Ends every open stream (at shutdown, so draining does not wait on
    /// dashboards that never hang up).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Stops reading.
    pub fn stop(&self) {
        self.close_streams();
        self.task.abort();
    }

    /// A client's stream: every product's progress at once, then each
    /// product whose figures change (event `progress`), and the stream-level
    /// figures when they change (event `stats`).
    /// It holds its `slot` while open and ends after the stream lifetime.
    pub fn events(
        &self,
        slot: StreamSlot,
    ) -> impl Stream<Item = Result<Event, Infallible>> + Send + use<> {
        let mut snapshot = self.snapshot.clone();
        snapshot.mark_changed();
        let closing = self.closing.subscribe();
        let sent: HashMap<String, ProgressResponse> = HashMap::new();
        let ends_at = tokio::time::Instant::now() + self.limits.lifetime;
        let state = (snapshot, closing, sent, None::<Stats>, Vec::<Event>::new());
        futures::stream::unfold(
            (state, slot),
            move |((mut snapshot, mut closing, mut sent, mut stats, mut queue), slot)| async move {
                loop {
                    if let Some(event) = queue.pop() {
                        let state = (snapshot, closing, sent, stats, queue);
                        return Some((Ok(event), (state, slot)));
                    }
                    if *closing.borrow() {
                        return None;
                    }
                    tokio::select! {
                        changed = snapshot.changed() => if changed.is_err() { return None },
                        _ = closing.changed() => return None,
                        () = tokio::time::sleep_until(ends_at) => return None,
                    }
                    let current = snapshot.borrow_and_update().clone();
                    for product in &current.products {
                        if sent.get(&product.product_id) != Some(product) {
                            sent.insert(product.product_id.clone(), product.clone());
                            queue.push(json_event("progress", product));
                        }
                    }
                    if stats.as_ref() != Some(&current.stats) {
                        stats = Some(current.stats.clone());
                        queue.push(json_event("stats", &current.stats));
                    }
                    queue.reverse();
                }
            },
        )
    }
}

fn json_event<T: Serialize>(name: &str, value: &T) -> Event {
    Event::default()
        .event(name)
        .json_data(value)
        .expect("BUG: progress figures serialize")
}
