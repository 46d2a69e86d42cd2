//! Operational errors of the store.

use crate::model::VersionConflict;
use uuid::Uuid;

/// What can go wrong talking to the store. Conflicts are expected operating
/// conditions; `Unavailable` is transient; `Database` is anything else.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A single-stream append met a different stream version.
    #[error(transparent)]
    Conflict(#[from] VersionConflict),
    /// The append is malformed (empty, too large, a stream twice, bad names).
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    /// Some of these event ids were stored before, but not as this very append.
    #[error("event id {0} was already used by another append")]
    EventIdReused(Uuid),
    /// The database could not be reached or timed out.
    #[error("event store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database failure.
    #[error("event store failure: {0}")]
    Database(#[source] sqlx::Error),
    /// A stored row could not be read back (bad JSON, bad UUID).
    #[error("corrupt stored event at position {position}: {reason}")]
    Corrupt {
        /// Where.
        position: i64,
        /// What is wrong.
        reason: String,
    },
    /// A fault injected by a test hook.
    #[error("injected fault: {0}")]
    Injected(String),
    /// A remote event store (EventStoreDB) could not be reached, timed out,
    /// or has no leader right now.
    #[error("event store unavailable: {0}")]
    RemoteUnavailable(#[source] BoxError),
    /// Any other failure of a remote event store (EventStoreDB).
    #[error("event store failure: {0}")]
    Remote(#[source] BoxError),
    /// The backend cannot do this at all: EventStoreDB keeps no hash chain
    /// to verify, a build without the `eventstoredb` feature cannot open
    /// EventStoreDB.
    #[error("not supported by this event store: {0}")]
    Unsupported(String),
}

/// An error from a backend's client library, kept as its source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl StoreError {
    /// True when a unique constraint refused a row (an event id stored before).
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(db)) if db.is_unique_violation())
    }

    /// True for errors worth retrying after a pause (the database is down or busy).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::RemoteUnavailable(_)
        )
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if is_unavailable(&error) || is_transient_conflict(&error) {
            StoreError::Unavailable(error)
        } else {
            StoreError::Database(error)
        }
    }
}

/// True when a database error means the database is down, restarting,
/// unreachable or busy (worth a 503 and a retry), not that the statement
/// is wrong. Every layer that talks to a database classifies with this.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => is_busy(db.code().as_deref()),
        _ => false,
    }
}

/// True when PostgreSQL aborted the transaction to break a conflict with
/// another one: a deadlock (SQLSTATE 40P01) or a serialization failure
/// (40001). Nothing is wrong with the statement; the whole transaction is
/// worth running again (bounded, with jitter), and if
/// the retries run out the answer is a 503 (busy), never a 500.
pub fn is_transient_conflict(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001"))
    )
}

/// SQLite busy/locked (with their extended codes), PostgreSQL shutdown,
/// connection, lock-timeout and statement-timeout codes.
fn is_busy(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "5" | "6"
                | "261"
                | "262"
                | "517"
                | "57P01"
                | "57P02"
                | "57P03"
                | "08000"
                | "08003"
                | "08006"
                | "53300"
                | "55P03"
                | "57014"
        )
    )
}
