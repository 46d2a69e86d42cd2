//! The API's own tables (migration 0004): users, sessions and idempotency
//! keys, in the same database as the log. Every statement is static SQL with
//! bound parameters; the `$N` placeholders work on SQLite and PostgreSQL.

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;
use store::Backend;
use store::sql::{AnyConnection, AnyPool, Cell, ColumnKind, Either, RowBatch};

/// Connections the API's tables may hold (per process).
pub const ACCESS_CONNECTIONS_MAX: u32 = 8;
/// How long to wait for a connection before answering 503.
pub const ACCESS_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handle on the API's tables.
#[derive(Clone, Debug)]
pub enum AccessDb {
    /// In the embedded SQLite file, with the file's write gate (see
    /// `store::sqlite::write_gate`).
    Sqlite(SqlitePool, store::sqlite::WriteGate),
    /// In PostgreSQL.
    Postgres(PgPool),
}

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    /// Its id.
    pub user_id: String,
    /// The login name, exactly as created.
    pub username: String,
    /// The argon2id PHC string.
    pub password_hash: String,
    /// Its role's name.
    pub role: String,
    /// A customer's account.
    pub account_id: Option<String>,
}

/// What a session token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// The user.
    pub user_id: String,
    /// Their role's name.
    pub role: String,
    /// A customer's account.
    pub account_id: Option<String>,
    /// When the session ends.
    pub expires_at_ms: i64,
}

/// Where an idempotent request stands after `begin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// This request runs it (first use of the key, or a takeover of an
    /// abandoned one).
    Run,
    /// It ran before: answer what it answered.
    Replay {
        /// The stored status code.
        status: u16,
        /// The stored body.
        body: String,
    },
    /// Another request with this key is still running.
    InFlight,
    /// The key was used for another request.
    Reused,
}

type IdempotencyRow = (String, Option<i64>, Option<String>, i64);

const USER_INSERT: &str = "INSERT INTO users \
     (user_id, username, password_hash, role, account_id, created_at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (username) DO NOTHING";
const USER_DELETE: &str = "DELETE FROM users WHERE user_id = $1";
const USER_BY_NAME: &str = "SELECT user_id, username, password_hash, role, account_id \
     FROM users WHERE username = $1";
const USER_BY_ACCOUNT: &str = "SELECT user_id, username FROM users WHERE account_id = $1 \
     ORDER BY user_id LIMIT 1";
const USER_COUNT: &str = "SELECT COUNT(*) FROM users";
const SESSION_INSERT: &str = "INSERT INTO sessions \
     (token_hash, user_id, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4)";
const SESSION_SELECT: &str = "SELECT u.user_id, u.role, u.account_id, s.expires_at_ms \
     FROM sessions s JOIN users u ON u.user_id = s.user_id \
     WHERE s.token_hash = $1 AND s.expires_at_ms > $2";
const SESSION_PURGE: &str = "DELETE FROM sessions WHERE expires_at_ms <= $1";
const SESSION_END: &str =
    "UPDATE sessions SET expires_at_ms = $2 WHERE token_hash = $1 AND expires_at_ms > $2";
const SESSIONS_ENDED: &str = "SELECT token_hash FROM sessions \
     WHERE expires_at_ms > $1 AND expires_at_ms <= $2 ORDER BY expires_at_ms DESC LIMIT $3";
const KEY_PURGE: &str = "DELETE FROM idempotency_keys WHERE (user_id, idempotency_key) IN \
     (SELECT user_id, idempotency_key FROM idempotency_keys \
      WHERE created_at_ms <= $1 AND (status IS NOT NULL OR locked_until_ms <= $2) LIMIT $3)";
/// The purge on PostgreSQL, where several nodes purge while key batches
/// run: it skips rows another transaction holds, so it never waits for a
/// row lock and cannot take part in a deadlock.
const KEY_PURGE_POSTGRES: &str = "DELETE FROM idempotency_keys WHERE (user_id, idempotency_key) IN \
     (SELECT user_id, idempotency_key FROM idempotency_keys \
      WHERE created_at_ms <= $1 AND (status IS NOT NULL OR locked_until_ms <= $2) LIMIT $3 \
      FOR UPDATE SKIP LOCKED)";
const KEY_INSERT: &str = "INSERT INTO idempotency_keys \
     (user_id, idempotency_key, request_hash, locked_until_ms, created_at_ms) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, idempotency_key) DO NOTHING";
const KEY_SELECT: &str = "SELECT request_hash, status, response_body, locked_until_ms \
     FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2";
const KEY_TAKE_OVER: &str = "UPDATE idempotency_keys SET locked_until_ms = $3 \
     WHERE user_id = $1 AND idempotency_key = $2 AND status IS NULL AND locked_until_ms = $4";
const KEY_ABANDON: &str =
    "DELETE FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2 AND status IS NULL";

/// The API's tables on SQLite, in their own file.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite-access");

/// The SQLite file of the API's tables: `access.db` beside the log's file.
pub fn sqlite_path(ledger: &Path) -> PathBuf {
    ledger.with_file_name("access.db")
}

impl AccessDb {
    /// Its pool, for statement code written once for both backends
    /// (`store::on_backend!`).
    fn pool(&self) -> AnyPool<'_> {
        match self {
            AccessDb::Sqlite(pool, _) => Either::Sqlite(pool),
            AccessDb::Postgres(pool) => Either::Postgres(pool),
        }
    }

    /// Connects to the database a backend names and applies the API
    /// tables' migrations: on SQLite, its own file beside the log's (see
    /// `sqlite_path`); on PostgreSQL, the ledger's database, whose migrations
    /// must have run (opening the read models runs them).
    pub async fn open(backend: &Backend) -> Result<AccessDb, sqlx::Error> {
        Ok(match backend {
            Backend::Sqlite(ledger) => {
                let path = sqlite_path(ledger);
                let pool = store::sqlite::connect_migrated(
                    SqlitePoolOptions::new()
                        .max_connections(ACCESS_CONNECTIONS_MAX)
                        .acquire_timeout(ACCESS_ACQUIRE_TIMEOUT),
                    store::sqlite::connect_options(&path),
                    &SQLITE_MIGRATOR,
                )
                .await
                .map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
                AccessDb::Sqlite(pool, store::sqlite::write_gate(&path))
            }
            Backend::Postgres(url) => AccessDb::Postgres(
                PgPoolOptions::new()
                    .max_connections(ACCESS_CONNECTIONS_MAX)
                    .acquire_timeout(ACCESS_ACQUIRE_TIMEOUT)
                    .connect_with(
                        store::postgres::connect_options(url)
                            .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?,
                    )
                    .await?,
            ),
        })
    }

    /// Connects the writer of idempotency keys: one connection. On SQLite
    /// its commits skip the fsync (`synchronous=NORMAL`, still atomic and
    /// safe against a crash of the process; an operating-system crash may
    /// undo the last batches): a lost key only means a retry runs its
    /// command again, which every command behind a POST tolerates.
    pub async fn open_key_writer(backend: &Backend) -> Result<AccessDb, sqlx::Error> {
        Ok(match backend {
            Backend::Sqlite(ledger) => {
                // `open` first: it creates the file and its tables.
                AccessDb::open(backend).await?.close().await;
                let path = sqlite_path(ledger);
                AccessDb::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(1)
                        .acquire_timeout(ACCESS_ACQUIRE_TIMEOUT)
                        .connect_with(
                            store::sqlite::connect_options(&path)
                                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal),
                        )
                        .await?,
                    store::sqlite::write_gate(&path),
                )
            }
            Backend::Postgres(_) => AccessDb::open(backend).await?,
        })
    }

    /// Closes the pools.
    pub async fn close(&self) {
        store::on_backend!(self.pool(), |pool| pool.close().await)
    }

    /// Stores a user; false when the username is taken.
    pub async fn insert_user(&self, user: &UserRow, now_ms: i64) -> Result<bool, sqlx::Error> {
        let inserted = store::on_backend!(self.pool(), |pool| sqlx::query(USER_INSERT)
            .bind(&user.user_id)
            .bind(&user.username)
            .bind(&user.password_hash)
            .bind(&user.role)
            .bind(&user.account_id)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(inserted == 1)
    }

    /// Removes a user that was never usable (its account could not be opened).
    pub async fn delete_user(&self, user_id: &str) -> Result<(), sqlx::Error> {
        let _deleted = store::on_backend!(self.pool(), |pool| sqlx::query(USER_DELETE)
            .bind(user_id)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// The user with exactly this name.
    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRow>, sqlx::Error> {
        let row: Option<(String, String, String, String, Option<String>)> =
            store::on_backend!(self.pool(), |pool| sqlx::query_as(USER_BY_NAME)
                .bind(username)
                .fetch_optional(pool)
                .await?);
        Ok(row.map(
            |(user_id, username, password_hash, role, account_id)| UserRow {
                user_id,
                username,
                password_hash,
                role,
                account_id,
            },
        ))
    }

    /// The user (id and username) an account belongs to, by the index
    /// `users_by_account`.
    pub async fn user_by_account(
        &self,
        account_id: &str,
    ) -> Result<Option<(String, String)>, sqlx::Error> {
        Ok(store::on_backend!(self.pool(), |pool| sqlx::query_as(
            USER_BY_ACCOUNT
        )
        .bind(account_id)
        .fetch_optional(pool)
        .await?))
    }

    /// How many users exist.
    pub async fn user_count(&self) -> Result<i64, sqlx::Error> {
        let (count,): (i64,) = store::on_backend!(self.pool(), |pool| sqlx::query_as(USER_COUNT)
            .fetch_one(pool)
            .await?);
        Ok(count)
    }

    /// Stores a session under its token's hash.
    pub async fn insert_session(
        &self,
        token_hash: &str,
        user_id: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), sqlx::Error> {
        let _inserted = store::on_backend!(self.pool(), |pool| sqlx::query(SESSION_INSERT)
            .bind(token_hash)
            .bind(user_id)
            .bind(now_ms)
            .bind(expires_at_ms)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// The live session a token hash names.
    pub async fn session(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Option<SessionRow>, sqlx::Error> {
        let row: Option<(String, String, Option<String>, i64)> =
            store::on_backend!(self.pool(), |pool| sqlx::query_as(SESSION_SELECT)
                .bind(token_hash)
                .bind(now_ms)
                .fetch_optional(pool)
                .await?);
        Ok(
            row.map(|(user_id, role, account_id, expires_at_ms)| SessionRow {
                user_id,
                role,
                account_id,
                expires_at_ms,
            }),
        )
    }

    /// Ends a session now (a logout); false if it had already ended.
    pub async fn end_session(&self, token_hash: &str, now_ms: i64) -> Result<bool, sqlx::Error> {
        let _gate = self.write_gate().await;
        let ended = store::on_backend!(self.pool(), |pool| sqlx::query(SESSION_END)
            .bind(token_hash)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(ended > 0)
    }

    /// Token hashes of sessions that ended in `(after_ms, until_ms]`
    /// (logouts and expiries), newest first, at most `limit`.
    pub async fn sessions_ended_since(
        &self,
        after_ms: i64,
        until_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        let rows: Vec<(String,)> =
            store::on_backend!(self.pool(), |pool| sqlx::query_as(SESSIONS_ENDED)
                .bind(after_ms)
                .bind(until_ms)
                .bind(limit)
                .fetch_all(pool)
                .await?);
        Ok(rows.into_iter().map(|(hash,)| hash).collect())
    }

    /// Deletes up to `limit` idempotency keys created at or before
    /// `created_before_ms` that are answered or whose claim ran out by
    /// `now_ms`; returns how many.
    pub async fn purge_keys(
        &self,
        created_before_ms: i64,
        now_ms: i64,
        limit: i64,
    ) -> Result<u64, sqlx::Error> {
        let _gate = self.write_gate().await;
        let purge = match self {
            AccessDb::Sqlite(..) => KEY_PURGE,
            AccessDb::Postgres(_) => KEY_PURGE_POSTGRES,
        };
        Ok(store::on_backend!(self.pool(), |pool| sqlx::query(purge)
            .bind(created_before_ms)
            .bind(now_ms)
            .bind(limit)
            .execute(pool)
            .await?
            .rows_affected()))
    }

    /// On SQLite, the file's write gate (writers queue here rather than in
    /// SQLite's busy loop); nothing on PostgreSQL.
    async fn write_gate(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match self {
            AccessDb::Sqlite(_, gate) => Some(gate.clone().lock_owned().await),
            AccessDb::Postgres(_) => None,
        }
    }

    /// Deletes sessions that ended at or before `ended_before_ms`; returns how many.
    pub async fn purge_sessions(&self, ended_before_ms: i64) -> Result<u64, sqlx::Error> {
        let _gate = self.write_gate().await;
        Ok(store::on_backend!(self.pool(), |pool| sqlx::query(
            SESSION_PURGE
        )
        .bind(ended_before_ms)
        .execute(pool)
        .await?
        .rows_affected()))
    }

    /// Claims an idempotency key for a request, or says why not (one
    /// operation in its own transaction; the API batches them with
    /// `apply_key_ops`).
    pub async fn begin(
        &self,
        user_id: &str,
        key: &str,
        request_hash: &str,
        now_ms: i64,
        lock_ms: i64,
    ) -> Result<Begun, sqlx::Error> {
        let op = KeyOp::Begin {
            user_id: user_id.to_owned(),
            key: key.to_owned(),
            request_hash: request_hash.to_owned(),
            now_ms,
            lock_ms,
        };
        self.apply_one(op).await
    }

    /// Stores the answer of a request that ran.
    pub async fn complete(
        &self,
        user_id: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), sqlx::Error> {
        let op = KeyOp::Complete {
            user_id: user_id.to_owned(),
            key: key.to_owned(),
            status,
            body: body.to_owned(),
        };
        self.apply_one(op).await.map(|_| ())
    }

    /// Releases a key whose request ended without a final answer (overload,
    /// an unavailable store), so a retry runs it again.
    pub async fn abandon(&self, user_id: &str, key: &str) -> Result<(), sqlx::Error> {
        let op = KeyOp::Abandon {
            user_id: user_id.to_owned(),
            key: key.to_owned(),
        };
        self.apply_one(op).await.map(|_| ())
    }

    async fn apply_one(&self, op: KeyOp) -> Result<Begun, sqlx::Error> {
        let mut results = self.apply_key_ops(std::slice::from_ref(&op)).await?;
        Ok(results.pop().expect("BUG: one result per operation"))
    }

    /// Applies a batch of idempotency-key operations in one transaction
    /// and answers each (`Begun::Run` stands for done for `Complete` and
    /// `Abandon`). Answers and releases apply first, then claims: a claim
    /// never shares a batch with its own request's answer, and one that
    /// races another request's answer sees it. New claims, answers and
    /// releases are one set-based statement each; a claim that meets an
    /// existing key (a retry) is then looked at on its own.
    ///
    /// Several nodes (or pools) write overlapping keys at once, so every
    /// batch takes its row locks in one global order, by `(user_id, key)`
    /// in byte order (`COLLATE "C"` in the SQL): on PostgreSQL it first
    /// locks the existing rows it touches with `SELECT ... ORDER BY ... FOR
    /// UPDATE`, then inserts new keys from a sorted, de-duplicated input,
    /// and looks at retries in the same order. A deadlock or serialization
    /// failure that still happens (a row committed by another node between
    /// those steps) rolls the transaction back and runs it again, at most
    /// `KEY_BATCH_TRIES` times with jittered backoff; after that the error
    /// is returned (and answered 503, see `store::error::is_transient_conflict`).
    pub async fn apply_key_ops(&self, ops: &[KeyOp]) -> Result<Vec<Begun>, sqlx::Error> {
        let mut attempt = 1;
        loop {
            match self.try_apply_key_ops(ops).await {
                Err(error)
                    if store::error::is_transient_conflict(&error) && attempt < KEY_BATCH_TRIES =>
                {
                    metrics::counter!("ledger_idempotency_batch_retries_total").increment(1);
                    tracing::debug!(%error, attempt, "idempotency key batch conflicted; retrying");
                    tokio::time::sleep(conflict_backoff(attempt)).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn try_apply_key_ops(&self, ops: &[KeyOp]) -> Result<Vec<Begun>, sqlx::Error> {
        let _gate = match self {
            AccessDb::Sqlite(_, gate) => Some(gate.clone().lock_owned().await),
            AccessDb::Postgres(_) => None,
        };
        // Indices of the operations in lock order; stable, so operations
        // on one key keep their arrival order.
        let mut order: Vec<usize> = (0..ops.len()).collect();
        order.sort_by(|&a, &b| ops[a].key().cmp(&ops[b].key()));
        let mut tx = match self {
            AccessDb::Sqlite(pool, _) => KeyTx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            AccessDb::Postgres(pool) => KeyTx::Postgres(pool.begin().await?),
        };
        let mut touched: Vec<(&str, &str)> = order.iter().map(|&i| ops[i].key()).collect();
        touched.dedup();
        tx.lock_existing(&touched).await?;
        // The first answer of each key wins (an answer only fills a key
        // that has none).
        let mut answered = std::collections::HashSet::new();
        let completes: Vec<&KeyOp> = order
            .iter()
            .map(|&i| &ops[i])
            .filter(|op| matches!(op, KeyOp::Complete { .. }) && answered.insert(op.key()))
            .collect();
        tx.complete_all(&completes).await?;
        let abandons: Vec<&KeyOp> = order
            .iter()
            .map(|&i| &ops[i])
            .filter(|op| matches!(op, KeyOp::Abandon { .. }))
            .collect();
        tx.abandon_all(&abandons).await?;
        // The first claim of each key in the batch goes into the bulk insert;
        // a second claim of the same key waits for the slow path.
        let mut first_claims = std::collections::HashSet::new();
        let mut seen = std::collections::HashSet::new();
        for &index in &order {
            if let KeyOp::Begin { .. } = &ops[index]
                && seen.insert(ops[index].key())
            {
                first_claims.insert(index);
            }
        }
        let claims: Vec<&KeyOp> = order
            .iter()
            .filter(|i| first_claims.contains(i))
            .map(|&i| &ops[i])
            .collect();
        let inserted = tx.insert_all(&claims).await?;
        let mut results = vec![Begun::Run; ops.len()];
        for &index in &order {
            let KeyOp::Begin {
                user_id,
                key,
                request_hash,
                now_ms,
                lock_ms,
            } = &ops[index]
            else {
                continue;
            };
            if first_claims.contains(&index) && inserted.contains(&(user_id.clone(), key.clone())) {
                continue; // Run
            }
            results[index] = tx
                .existing(user_id, key, request_hash, *now_ms, *lock_ms)
                .await?;
        }
        match tx {
            KeyTx::Sqlite(tx) => tx.commit().await?,
            KeyTx::Postgres(tx) => tx.commit().await?,
        }
        Ok(results)
    }
}

/// Tries of a batch of key operations that meets deadlocks or
/// serialization failures (the first included).
pub const KEY_BATCH_TRIES: u32 = 5;

/// The pause after failed try `attempt` (from 1): exponential from about
/// 2 ms, with jitter so the transactions that collided do not collide
/// again in step.
fn conflict_backoff(attempt: u32) -> Duration {
    let ceiling_us = 2_000u64 << attempt.min(6);
    Duration::from_micros(rand::random_range(ceiling_us / 4..=ceiling_us))
}

/// One change to the idempotency keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOp {
    /// Claim a key for a request.
    Begin {
        /// The caller.
        user_id: String,
        /// The key.
        key: String,
        /// What the key is bound to.
        request_hash: String,
        /// Now.
        now_ms: i64,
        /// How long the claim holds before another request may take it over.
        lock_ms: i64,
    },
    /// Store a request's answer.
    Complete {
        /// The caller.
        user_id: String,
        /// The key.
        key: String,
        /// The status.
        status: u16,
        /// The body.
        body: String,
    },
    /// Free a key whose request decided nothing.
    Abandon {
        /// The caller.
        user_id: String,
        /// The key.
        key: String,
    },
}

impl KeyOp {
    /// The key it is about: `(user_id, key)`, the order batches lock in.
    pub fn key(&self) -> (&str, &str) {
        match self {
            KeyOp::Begin { user_id, key, .. }
            | KeyOp::Complete { user_id, key, .. }
            | KeyOp::Abandon { user_id, key } => (user_id, key),
        }
    }
}

/// A transaction over the API's tables.
enum KeyTx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// The columns of a batch of claims (`KEY_INSERT_ALL_*`).
const CLAIM_COLUMNS: &[ColumnKind] = &[
    ColumnKind::Text,
    ColumnKind::Text,
    ColumnKind::Text,
    ColumnKind::Integer,
    ColumnKind::Integer,
];
/// The columns of a batch of answers (`KEY_COMPLETE_ALL_*`).
const ANSWER_COLUMNS: &[ColumnKind] = &[
    ColumnKind::Text,
    ColumnKind::Text,
    ColumnKind::Integer,
    ColumnKind::Text,
];

const KEY_INSERT_ALL_SQLITE: &str = "INSERT INTO idempotency_keys \
     (user_id, idempotency_key, request_hash, locked_until_ms, created_at_ms) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 \
     FROM json_each($1) WHERE true ORDER BY key \
     ON CONFLICT (user_id, idempotency_key) DO NOTHING \
     RETURNING user_id, idempotency_key";
const KEY_INSERT_ALL_POSTGRES: &str = "INSERT INTO idempotency_keys \
     (user_id, idempotency_key, request_hash, locked_until_ms, created_at_ms) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) \
          AS claim (user_id, idempotency_key, request_hash, locked_until_ms, created_at_ms) \
     ORDER BY claim.user_id COLLATE \"C\", claim.idempotency_key COLLATE \"C\" \
     ON CONFLICT (user_id, idempotency_key) DO NOTHING \
     RETURNING user_id, idempotency_key";
/// Locks the existing rows of a batch's keys in the global order (the
/// `LockRows` step runs above the sort, so rows are locked as sorted).
const KEY_LOCK_ALL_POSTGRES: &str = "SELECT 1 FROM idempotency_keys \
     WHERE (user_id, idempotency_key) IN (SELECT * FROM UNNEST($1::text[], $2::text[])) \
     ORDER BY user_id COLLATE \"C\", idempotency_key COLLATE \"C\" FOR UPDATE";
// The answers come sorted and de-duplicated; on PostgreSQL their rows are
// already locked (`KEY_LOCK_ALL_POSTGRES`), on SQLite the write gate
// serializes, so the join order of these updates cannot deadlock.
const KEY_COMPLETE_ALL_SQLITE: &str = "UPDATE idempotency_keys \
     SET status = answer.status, response_body = answer.body \
     FROM (SELECT value ->> 0 AS user_id, value ->> 1 AS idempotency_key, \
                  value ->> 2 AS status, value ->> 3 AS body FROM json_each($1)) AS answer \
     WHERE idempotency_keys.user_id = answer.user_id \
       AND idempotency_keys.idempotency_key = answer.idempotency_key \
       AND idempotency_keys.status IS NULL";
const KEY_COMPLETE_ALL_POSTGRES: &str = "UPDATE idempotency_keys \
     SET status = answer.status, response_body = answer.body \
     FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[]) \
          AS answer (user_id, idempotency_key, status, body) \
     WHERE idempotency_keys.user_id = answer.user_id \
       AND idempotency_keys.idempotency_key = answer.idempotency_key \
       AND idempotency_keys.status IS NULL";

impl KeyTx {
    /// Its connection, for statement code written once for both backends
    /// (`store::on_backend!`).
    fn connection(&mut self) -> AnyConnection<'_> {
        match self {
            KeyTx::Sqlite(tx) => Either::Sqlite(&mut **tx),
            KeyTx::Postgres(tx) => Either::Postgres(&mut **tx),
        }
    }

    /// On PostgreSQL, locks the existing rows of these keys (sorted,
    /// distinct) in that order; SQLite's write gate already serializes.
    async fn lock_existing(&mut self, keys: &[(&str, &str)]) -> Result<(), sqlx::Error> {
        let KeyTx::Postgres(tx) = self else {
            return Ok(());
        };
        if keys.is_empty() {
            return Ok(());
        }
        let (user_ids, keys): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        sqlx::query(KEY_LOCK_ALL_POSTGRES)
            .bind(&user_ids)
            .bind(&keys)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Inserts every claim whose key is new; returns the keys inserted.
    async fn insert_all(
        &mut self,
        claims: &[&KeyOp],
    ) -> Result<std::collections::HashSet<(String, String)>, sqlx::Error> {
        if claims.is_empty() {
            return Ok(Default::default());
        }
        let mut batch = RowBatch::new(CLAIM_COLUMNS);
        for op in claims {
            let KeyOp::Begin {
                user_id,
                key,
                request_hash,
                now_ms,
                lock_ms,
            } = op
            else {
                unreachable!("BUG: only claims are inserted");
            };
            batch.push(&[
                Cell::Text(Some(user_id)),
                Cell::Text(Some(key)),
                Cell::Text(Some(request_hash)),
                Cell::Integer(Some(now_ms + lock_ms)),
                Cell::Integer(Some(*now_ms)),
            ]);
        }
        let rows: Vec<(String, String)> = match self {
            KeyTx::Sqlite(tx) => {
                sqlx::query_as(KEY_INSERT_ALL_SQLITE)
                    .bind(batch.json_rows())
                    .fetch_all(&mut **tx)
                    .await?
            }
            KeyTx::Postgres(tx) => {
                batch
                    .bind_arrays(sqlx::query_as(KEY_INSERT_ALL_POSTGRES))
                    .fetch_all(&mut **tx)
                    .await?
            }
        };
        Ok(rows.into_iter().collect())
    }

    /// Stores the answers.
    async fn complete_all(&mut self, completes: &[&KeyOp]) -> Result<(), sqlx::Error> {
        if completes.is_empty() {
            return Ok(());
        }
        let mut batch = RowBatch::new(ANSWER_COLUMNS);
        for op in completes {
            let KeyOp::Complete {
                user_id,
                key,
                status,
                body,
            } = op
            else {
                unreachable!("BUG: only answers are completed");
            };
            batch.push(&[
                Cell::Text(Some(user_id)),
                Cell::Text(Some(key)),
                Cell::Integer(Some(i64::from(*status))),
                Cell::Text(Some(body)),
            ]);
        }
        match self {
            KeyTx::Sqlite(tx) => {
                sqlx::query(KEY_COMPLETE_ALL_SQLITE)
                    .bind(batch.json_rows())
                    .execute(&mut **tx)
                    .await?;
            }
            KeyTx::Postgres(tx) => {
                batch
                    .bind_arrays(sqlx::query(KEY_COMPLETE_ALL_POSTGRES))
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// Frees keys whose requests decided nothing (rare: one at a time).
    async fn abandon_all(&mut self, abandons: &[&KeyOp]) -> Result<(), sqlx::Error> {
        for op in abandons {
            let KeyOp::Abandon { user_id, key } = op else {
                unreachable!("BUG: only releases are abandoned");
            };
            let _released =
                store::on_backend!(self.connection(), |connection| sqlx::query(KEY_ABANDON)
                    .bind(user_id)
                    .bind(key)
                    .execute(connection)
                    .await?
                    .rows_affected());
        }
        Ok(())
    }

    /// A claim of a key that exists (or was claimed earlier in the batch):
    /// replay, refuse, wait, or take over an abandoned claim.
    async fn existing(
        &mut self,
        user_id: &str,
        key: &str,
        request_hash: &str,
        now_ms: i64,
        lock_ms: i64,
    ) -> Result<Begun, sqlx::Error> {
        let row: Option<IdempotencyRow> =
            store::on_backend!(self.connection(), |connection| sqlx::query_as(KEY_SELECT)
                .bind(user_id)
                .bind(key)
                .fetch_optional(connection)
                .await?);
        let Some((stored_hash, status, body, stored_lock_ms)) = row else {
            // Released by an earlier operation of this batch: claim it now.
            let _inserted =
                store::on_backend!(self.connection(), |connection| sqlx::query(KEY_INSERT)
                    .bind(user_id)
                    .bind(key)
                    .bind(request_hash)
                    .bind(now_ms + lock_ms)
                    .bind(now_ms)
                    .execute(connection)
                    .await?
                    .rows_affected());
            return Ok(Begun::Run);
        };
        if stored_hash != request_hash {
            return Ok(Begun::Reused);
        }
        if let (Some(status), Some(body)) = (status, body) {
            let status = u16::try_from(status).expect("BUG: stored status out of range");
            return Ok(Begun::Replay { status, body });
        }
        if stored_lock_ms > now_ms {
            return Ok(Begun::InFlight);
        }
        let taken = store::on_backend!(self.connection(), |connection| sqlx::query(KEY_TAKE_OVER)
            .bind(user_id)
            .bind(key)
            .bind(now_ms + lock_ms)
            .bind(stored_lock_ms)
            .execute(connection)
            .await?
            .rows_affected());
        Ok(if taken == 1 {
            Begun::Run
        } else {
            Begun::InFlight
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The purge's search for old keys goes through the age index, not a
    /// scan of every key kept.
    #[tokio::test]
    async fn the_key_purge_finds_old_keys_by_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let db = AccessDb::open(&Backend::Sqlite(dir.path().join("ledger.db")))
            .await
            .unwrap();
        let AccessDb::Sqlite(pool, _) = &db else {
            unreachable!("opened on SQLite")
        };
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(
            "EXPLAIN QUERY PLAN SELECT user_id, idempotency_key FROM idempotency_keys \
             WHERE created_at_ms <= $1 AND (status IS NOT NULL OR locked_until_ms <= $2) LIMIT $3",
        )
        .bind(0_i64)
        .bind(0_i64)
        .bind(100_i64)
        .fetch_all(pool)
        .await
        .unwrap();
        let details: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
        assert!(
            details
                .iter()
                .any(|d| d.contains("USING INDEX idempotency_keys_created")),
            "{details:?}"
        );
        db.close().await;
    }
}
