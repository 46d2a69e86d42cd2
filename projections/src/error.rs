//! What can stop a projection.

use store::StoreError;
use store::codec::DecodeError;

/// Why a projection could not make progress. Database and store failures are
/// operating conditions (the runner retries); `Inconsistent` means the log
/// holds something the read model cannot represent and needs an operator.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// Reading the event log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The read-model database failed.
    #[error("read-model database failure: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored event could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// An event does not fit the rows built so far (for example, an order
    /// confirmed that was never reserved).
    #[error("event at position {position} does not fit the read model: {reason}")]
    Inconsistent {
        /// Where.
        position: i64,
        /// What does not fit.
        reason: String,
    },
    /// No projection has this name.
    #[error("no projection is named {0:?} (known: sale_progress, accounts, orders, payouts)")]
    UnknownProjection(String),
    /// A stored row could not be read back.
    #[error("corrupt read-model row in {table}: {reason}")]
    CorruptRow {
        /// The table.
        table: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The read models were built by newer code than this process runs.
    #[error(
        "projection {projection} has table shape {stored}, this build knows up to {known}: run the newer ledger"
    )]
    SchemaNewer {
        /// The projection.
        projection: &'static str,
        /// The stored shape.
        stored: i64,
        /// The newest shape this build knows.
        known: i64,
    },
    /// Another rebuild of the projection is running.
    #[error(
        "another rebuild of {projection} is running ({owner}, lease until {expires_at}); wait for it, or for its lease to expire"
    )]
    RebuildRunning {
        /// The projection.
        projection: &'static str,
        /// Who holds the lease.
        owner: String,
        /// When the lease expires unless renewed.
        expires_at: String,
    },
    /// Another rebuild swapped the projection first.
    #[error("projection {0} changed generation during the rebuild; run it again")]
    RebuildRaced(&'static str),
}

impl ProjectionError {
    /// A shorthand for `Inconsistent`.
    pub fn inconsistent(position: i64, reason: impl Into<String>) -> ProjectionError {
        ProjectionError::Inconsistent {
            position,
            reason: reason.into(),
        }
    }
}
