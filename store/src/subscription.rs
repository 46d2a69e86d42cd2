//! Catch-up subscriptions: read the log from a position, then tail it live.

use crate::error::StoreError;
use crate::model::{Position, RecordedEvent};
use crate::port::EventStore;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long a caught-up subscription waits for a commit signal before it looks
/// anyway. Signals cover this process (and, on PostgreSQL, every process);
/// the poll covers SQLite files written by another process.
pub const SUBSCRIPTION_POLL_FALLBACK: Duration = Duration::from_secs(1);

/// Reads the log in position order from a checkpoint, in batches, and waits
/// for new commits once caught up. Positions only ever increase, and because
/// the backends make commits visible in position order, nothing is skipped.
pub struct Subscription {
    store: Arc<dyn EventStore>,
    after: Position,
    commits: watch::Receiver<Position>,
    poll_fallback: Duration,
}

impl Subscription {
    /// A subscription that starts after `after` (0: from the beginning).
    pub fn new(store: Arc<dyn EventStore>, after: Position) -> Subscription {
        let commits = store.commits();
        Subscription {
            store,
            after,
            commits,
            poll_fallback: SUBSCRIPTION_POLL_FALLBACK,
        }
    }

    /// Changes how long a caught-up subscription waits before looking anyway.
    pub fn with_poll_fallback(mut self, poll_fallback: Duration) -> Subscription {
        self.poll_fallback = poll_fallback;
        self
    }

    /// The position of the last event handed out (the checkpoint to keep).
    pub fn position(&self) -> Position {
        self.after
    }

    /// The next batch of at most `limit` events; waits while there are none.
    pub async fn next_batch(&mut self, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        loop {
            // Mark the signal seen before reading, so a commit that lands after
            // the read still wakes the wait below.
            self.commits.borrow_and_update();
            let batch = self.store.read_all(self.after, limit).await?;
            if let Some(last) = batch.last() {
                assert!(last.position > self.after, "BUG: log went backwards");
                self.after = last.position;
                return Ok(batch);
            }
            let waited = tokio::time::timeout(self.poll_fallback, self.commits.changed()).await;
            if let Ok(Err(_closed)) = waited {
                // The store's signal is gone: keep polling at the fallback pace.
                tokio::time::sleep(self.poll_fallback).await;
            }
        }
    }
}
