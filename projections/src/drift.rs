//! The drift check: rebuild every read model into a scratch database up to
//! the live checkpoints, compare row by row with the live read models (read
//! in one snapshot), and run the trial balance on the same snapshot.

use crate::apply::{FillPlan, Target, fill, install};
use crate::db::{Checkpoint, ReadDb};
use crate::error::ProjectionError;
use crate::projection::Projection;
use crate::rebuild::REBUILD_BATCH_DEFAULT;
use crate::schema::{ACCOUNT_BALANCES, Dialect, LEDGER_ENTRIES, Table};
use crate::trial::{PostingSums, StoredBalance, TrialBalance};
use futures::stream::{BoxStream, StreamExt};
use serde_json::{Map, Value};
use sqlx::{Postgres, Sqlite, Transaction};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;
use store::EventStore;

/// Differences kept per table for the report (all are counted).
pub const DRIFT_EXAMPLES_MAX: usize = 20;

const CHECKPOINTS_ALL: &str =
    "SELECT projection, generation, schema_version, position FROM projection_checkpoints";
/// Balances with their entries' sum and last `balance_after`, over one
/// generation of the accounts tables (named from constants and a number).
fn stored_balances(generation: i64) -> String {
    let entries = LEDGER_ENTRIES.physical(generation);
    let balances = ACCOUNT_BALANCES.physical(generation);
    format!(
        "SELECT a.account_id, a.available, \
         CAST((SELECT COALESCE(SUM(e.amount), 0) FROM {entries} e \
               WHERE e.account_id = a.account_id) AS BIGINT), \
         (SELECT e.balance_after FROM {entries} e WHERE e.account_id = a.account_id \
          ORDER BY e.position DESC, e.seq DESC LIMIT 1) \
         FROM {balances} a"
    )
}

/// A consistent read-only view of the live read models.
pub enum Snapshot {
    /// An SQLite read transaction (WAL keeps its snapshot).
    Sqlite(Transaction<'static, Sqlite>),
    /// A PostgreSQL repeatable-read transaction.
    Postgres(Transaction<'static, Postgres>),
}

type Rows<'a> = BoxStream<'a, Result<String, sqlx::Error>>;

impl Snapshot {
    /// Opens a snapshot.
    pub async fn open(db: &ReadDb) -> Result<Snapshot, ProjectionError> {
        Ok(match db {
            ReadDb::Sqlite { read, .. } => Snapshot::Sqlite(read.begin().await?),
            ReadDb::Postgres { read, .. } => Snapshot::Postgres(
                read.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?,
            ),
        })
    }

    /// Every projection's checkpoint.
    pub async fn checkpoints(
        &mut self,
    ) -> Result<BTreeMap<Projection, Checkpoint>, ProjectionError> {
        let rows: Vec<(String, i64, i64, i64)> = match self {
            Snapshot::Sqlite(tx) => sqlx::query_as(CHECKPOINTS_ALL).fetch_all(&mut **tx).await?,
            Snapshot::Postgres(tx) => sqlx::query_as(CHECKPOINTS_ALL).fetch_all(&mut **tx).await?,
        };
        let mut checkpoints = BTreeMap::new();
        for (name, generation, schema_version, position) in rows {
            if let Ok(projection) = name.parse::<Projection>() {
                let checkpoint = Checkpoint {
                    generation,
                    schema_version,
                    position,
                };
                checkpoints.insert(projection, checkpoint);
            }
        }
        Ok(checkpoints)
    }

    fn scan(&mut self, table: &Table, generation: i64) -> Rows<'_> {
        let sql = sqlx::AssertSqlSafe(table.scan_generation(generation, self.dialect()));
        match self {
            Snapshot::Sqlite(tx) => sqlx::query_scalar(sql).fetch(&mut **tx),
            Snapshot::Postgres(tx) => sqlx::query_scalar(sql).fetch(&mut **tx),
        }
    }

    fn dialect(&self) -> Dialect {
        match self {
            Snapshot::Sqlite(_) => Dialect::Sqlite,
            Snapshot::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Every customer account's stored balance, entry sum and last entry.
    pub async fn balances(
        &mut self,
        generation: i64,
    ) -> Result<Vec<StoredBalance>, ProjectionError> {
        let sql = stored_balances(generation);
        let rows: Vec<(String, i64, i64, Option<i64>)> = match self {
            Snapshot::Sqlite(tx) => {
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&mut **tx)
                    .await?
            }
            Snapshot::Postgres(tx) => {
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&mut **tx)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(
                |(account_id, available, entries, last_balance_after)| StoredBalance {
                    account_id,
                    available,
                    entries,
                    last_balance_after,
                },
            )
            .collect())
    }
}

fn scan_db<'a>(db: &'a ReadDb, table: &Table) -> Rows<'a> {
    let sql = sqlx::AssertSqlSafe(table.scan(db.dialect()));
    match db {
        ReadDb::Sqlite { read, .. } => sqlx::query_scalar(sql).fetch(read),
        ReadDb::Postgres { read, .. } => sqlx::query_scalar(sql).fetch(read),
    }
}

/// One row that differs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    /// The row's key.
    pub key: Vec<Value>,
    /// The live row (absent: missing from the live read model).
    pub live: Option<Value>,
    /// The rebuilt row (absent: the live read model has a row the log does not explain).
    pub rebuilt: Option<Value>,
}

/// How one table compares.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableDrift {
    /// The table.
    pub table: &'static str,
    /// Rows in the live table.
    pub rows_live: u64,
    /// Rows in the rebuilt table.
    pub rows_rebuilt: u64,
    /// Rows that differ, are missing or are extra.
    pub differences: u64,
    /// The first differences.
    pub examples: Vec<Difference>,
}

/// The drift check's findings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DriftReport {
    /// The log's head when the check started.
    pub head: i64,
    /// The live checkpoint each projection was compared at.
    pub checkpoints: BTreeMap<&'static str, i64>,
    /// Per table.
    pub tables: Vec<TableDrift>,
    /// The trial balance on the live read models.
    pub trial_balance: TrialBalance,
}

impl DriftReport {
    /// Total differing rows.
    pub fn differences(&self) -> u64 {
        self.tables.iter().map(|t| t.differences).sum()
    }

    /// No drift and a holding trial balance.
    pub fn clean(&self) -> bool {
        self.differences() == 0 && self.trial_balance.holds()
    }
}

/// Runs the drift check of `live` against a rebuild into the empty `scratch`.
pub async fn check_drift(
    store: Arc<dyn EventStore>,
    live: &ReadDb,
    scratch: &ReadDb,
    progress: &mut (dyn FnMut(i64, i64) + Send),
) -> Result<DriftReport, ProjectionError> {
    install(live).await?;
    install(scratch).await?;
    let head = store.head().await?;
    let mut snapshot = Snapshot::open(live).await?;
    let checkpoints = snapshot.checkpoints().await?;
    let checkpoint = |p: Projection| checkpoints.get(&p).map_or(0, |c| c.position);
    let targets: Vec<Target> = Projection::ALL
        .iter()
        .map(|p| Target {
            projection: *p,
            generation: 1,
            until: checkpoint(*p),
        })
        .collect();
    let until_max = targets.iter().map(|t| t.until).max().unwrap_or(0);
    let mut sums = PostingSums::until(checkpoint(Projection::Accounts));
    let plan = FillPlan {
        targets: &targets,
        after: 0,
        batch: REBUILD_BATCH_DEFAULT,
        lease: None,
    };
    fill(store, scratch, plan, &mut sums, &mut |position, _| {
        progress(position, until_max)
    })
    .await?;
    let mut tables = Vec::new();
    let generation = |p: Projection| checkpoints.get(&p).map_or(1, |c| c.generation);
    for projection in Projection::ALL {
        for table in projection.tables() {
            // A rebuild that swapped and dropped this generation since the
            // snapshot makes this scan fail ("no such table"): run again.
            let live_rows = snapshot.scan(table, generation(projection));
            let rebuilt_rows = scan_db(scratch, table);
            tables.push(compare_table(table, live_rows, rebuilt_rows).await?);
        }
    }
    let balances = snapshot.balances(generation(Projection::Accounts)).await?;
    Ok(DriftReport {
        head,
        checkpoints: Projection::ALL
            .iter()
            .map(|p| (p.name(), checkpoint(*p)))
            .collect(),
        tables,
        trial_balance: TrialBalance::compare(sums, balances),
    })
}

/// A key part, ordered as the scan orders it (integers numerically, text by bytes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart {
    Integer(i64),
    Text(String),
}

fn parse_row(
    table: &Table,
    text: &str,
) -> Result<(Vec<KeyPart>, Map<String, Value>), ProjectionError> {
    let corrupt = |reason: String| ProjectionError::CorruptRow {
        table: table.name,
        reason,
    };
    let row: Map<String, Value> = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    let mut key = Vec::with_capacity(table.key.len());
    for column in table.key {
        key.push(match row.get(*column) {
            Some(Value::Number(n)) => KeyPart::Integer(
                n.as_i64()
                    .ok_or_else(|| corrupt(format!("{column} is not an integer")))?,
            ),
            Some(Value::String(s)) => KeyPart::Text(s.clone()),
            other => return Err(corrupt(format!("key {column} is {other:?}"))),
        });
    }
    Ok((key, row))
}

fn key_json(key: &[KeyPart]) -> Vec<Value> {
    key.iter()
        .map(|part| match part {
            KeyPart::Integer(n) => Value::from(*n),
            KeyPart::Text(s) => Value::from(s.clone()),
        })
        .collect()
}

async fn next_row(
    table: &Table,
    rows: &mut Rows<'_>,
    count: &mut u64,
) -> Result<Option<(Vec<KeyPart>, Map<String, Value>)>, ProjectionError> {
    match rows.next().await {
        None => Ok(None),
        Some(text) => {
            *count += 1;
            parse_row(table, &text?).map(Some)
        }
    }
}

/// Merges two key-ordered scans and records every difference.
async fn compare_table(
    table: &'static Table,
    mut live: Rows<'_>,
    mut rebuilt: Rows<'_>,
) -> Result<TableDrift, ProjectionError> {
    let mut drift = TableDrift {
        table: table.name,
        rows_live: 0,
        rows_rebuilt: 0,
        differences: 0,
        examples: Vec::new(),
    };
    let mut left = next_row(table, &mut live, &mut drift.rows_live).await?;
    let mut right = next_row(table, &mut rebuilt, &mut drift.rows_rebuilt).await?;
    loop {
        let order = match (&left, &right) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        let difference = match order {
            Ordering::Equal => {
                let (key, a) = left.take().expect("BUG: compared");
                let (_, b) = right.take().expect("BUG: compared");
                left = next_row(table, &mut live, &mut drift.rows_live).await?;
                right = next_row(table, &mut rebuilt, &mut drift.rows_rebuilt).await?;
                if a == b {
                    continue;
                }
                Difference {
                    key: key_json(&key),
                    live: Some(Value::Object(a)),
                    rebuilt: Some(Value::Object(b)),
                }
            }
            Ordering::Less => {
                let (key, a) = left.take().expect("BUG: compared");
                left = next_row(table, &mut live, &mut drift.rows_live).await?;
                Difference {
                    key: key_json(&key),
                    live: Some(Value::Object(a)),
                    rebuilt: None,
                }
            }
            Ordering::Greater => {
                let (key, b) = right.take().expect("BUG: compared");
                right = next_row(table, &mut rebuilt, &mut drift.rows_rebuilt).await?;
                Difference {
                    key: key_json(&key),
                    live: None,
                    rebuilt: Some(Value::Object(b)),
                }
            }
        };
        drift.differences += 1;
        if drift.examples.len() < DRIFT_EXAMPLES_MAX {
            drift.examples.push(difference);
        }
    }
    Ok(drift)
}
