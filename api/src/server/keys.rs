//! Idempotency keys written in batches: one task takes every pending key
//! operation (claims, answers, releases) and applies them in one
//! transaction, so a thousand concurrent purchases cost a few commits, not
//! two thousand, and never fight each other for SQLite's write lock.

use super::access::{AccessDb, Begun, KeyOp};
use tokio::sync::{mpsc, oneshot};

/// Most operations applied in one transaction.
pub const KEY_BATCH_MAX: usize = 1_024;
/// Operations waiting for the writer before callers wait to enqueue.
pub const KEY_QUEUE_MAX: usize = 16_384;

/// Why a key operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    /// The database could not be reached, or the batch kept losing
    /// deadlocks or serialization conflicts after its retries (answered
    /// 503 with `Retry-After`).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Anything else (answered 500).
    #[error("idempotency key storage failed: {0}")]
    Failed(String),
}

impl From<&sqlx::Error> for KeyError {
    fn from(error: &sqlx::Error) -> KeyError {
        if store::error::is_unavailable(error) || store::error::is_transient_conflict(error) {
            KeyError::Unavailable(error.to_string())
        } else {
            KeyError::Failed(error.to_string())
        }
    }
}

type Reply = oneshot::Sender<Result<Begun, KeyError>>;

/// The batching writer of idempotency keys.
#[derive(Clone)]
pub struct KeyLog {
    queue: mpsc::Sender<(KeyOp, Reply)>,
}

impl KeyLog {
    /// Starts the writer; it stops when every handle is dropped.
    pub fn start(db: AccessDb) -> KeyLog {
        let (queue, receiver) = mpsc::channel(KEY_QUEUE_MAX);
        tokio::spawn(write(db, receiver));
        KeyLog { queue }
    }

    /// Applies one operation, batched with whatever else is waiting.
    pub async fn apply(&self, op: KeyOp) -> Result<Begun, KeyError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((op, reply))
            .await
            .map_err(|_| KeyError::Unavailable("the key writer stopped".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(KeyError::Unavailable("the key writer stopped".into())))
    }
}

async fn write(db: AccessDb, mut receiver: mpsc::Receiver<(KeyOp, Reply)>) {
    let mut batch = Vec::with_capacity(KEY_BATCH_MAX);
    while receiver.recv_many(&mut batch, KEY_BATCH_MAX).await > 0 {
        let (ops, replies): (Vec<KeyOp>, Vec<Reply>) = batch.drain(..).unzip();
        metrics::histogram!("ledger_idempotency_batch_size").record(ops.len() as f64);
        match db.apply_key_ops(&ops).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(error) => {
                tracing::warn!(%error, operations = ops.len(), "idempotency key batch failed");
                let error = KeyError::from(&error);
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
