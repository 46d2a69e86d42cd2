//! The event store with metrics: append latency and outcomes, as the
//! engine sees them.

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Instant;
use store::{EventStore, Position, RecordedEvent, StoreError, StreamAppend, StreamOutcome};
use tokio::sync::watch;

/// Wraps a store and records `ledger_append_seconds` and
/// `ledger_append_streams_total{outcome}`.
pub struct MeteredStore {
    inner: Arc<dyn EventStore>,
}

impl MeteredStore {
    /// Meters `inner`.
    pub fn new(inner: Arc<dyn EventStore>) -> MeteredStore {
        MeteredStore { inner }
    }
}

#[async_trait]
impl EventStore for MeteredStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn keeps_hash_chain(&self) -> bool {
        self.inner.keeps_hash_chain()
    }

    async fn verify_chain(
        &self,
        progress: &(dyn Fn(i64) + Send + Sync),
    ) -> Result<store::chain::ChainReport, StoreError> {
        self.inner.verify_chain(progress).await
    }

    async fn append_batch(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StreamOutcome>, StoreError> {
        let started = Instant::now();
        let result = self.inner.append_batch(appends).await;
        metrics::histogram!("ledger_append_seconds").record(started.elapsed().as_secs_f64());
        match &result {
            Ok(outcomes) => {
                let conflicts = outcomes
                    .iter()
                    .filter(|o| matches!(o, StreamOutcome::Conflict(_)))
                    .count();
                let appended = outcomes.len() - conflicts;
                metrics::counter!("ledger_append_streams_total", "outcome" => "appended")
                    .increment(appended as u64);
                metrics::counter!("ledger_append_streams_total", "outcome" => "conflict")
                    .increment(conflicts as u64);
            }
            Err(_) => {
                metrics::counter!("ledger_append_failures_total").increment(1);
            }
        }
        result
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner
            .read_stream(stream_id, after_version, limit)
            .await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(after, limit).await
    }

    async fn read_at(&self, position: Position) -> Result<Option<RecordedEvent>, StoreError> {
        self.inner.read_at(position).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }

    fn commits(&self) -> watch::Receiver<Position> {
        self.inner.commits()
    }
}
