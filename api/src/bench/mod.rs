//! Benchmarks: each prints its setup and figures (or one JSON object with
//! `--json`) and verifies the invariants it can check afterwards.

pub mod append;
pub mod attack;
pub mod http;
pub mod lag;
pub mod lookups;
pub mod payouts;
pub mod purchases;
pub mod rebuild;
pub mod redis_seckill;
pub mod wrk;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::time::Duration;
use store::Backend;
use store::scratch::ScratchPostgres;

/// Which backend a benchmark runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchBackend {
    /// A fresh SQLite file in a temporary folder.
    Sqlite,
    /// A fresh scratch database beside the one `--database-url` names.
    Postgres,
}

/// A fresh, empty database for one benchmark run, removed afterwards.
pub enum BenchDatabase {
    /// SQLite file in a temporary folder.
    Sqlite(tempfile::TempDir),
    /// Scratch PostgreSQL database.
    Postgres(ScratchPostgres),
}

impl BenchDatabase {
    /// Creates the database; PostgreSQL needs a URL to create it next to.
    pub async fn create(
        backend: BenchBackend,
        database_url: Option<&str>,
    ) -> anyhow::Result<BenchDatabase> {
        Ok(match backend {
            BenchBackend::Sqlite => BenchDatabase::Sqlite(tempfile::tempdir()?),
            BenchBackend::Postgres => {
                let url = database_url.ok_or_else(|| {
                    anyhow::anyhow!("--backend postgres needs --database-url or DATABASE_URL")
                })?;
                BenchDatabase::Postgres(ScratchPostgres::create(url, "ledger_bench").await?)
            }
        })
    }

    /// The backend on this database.
    pub fn backend(&self) -> Backend {
        match self {
            BenchDatabase::Sqlite(folder) => Backend::Sqlite(folder.path().join("bench.db")),
            BenchDatabase::Postgres(scratch) => Backend::Postgres(scratch.url.clone()),
        }
    }

    /// How the backend is configured, for the printed setup.
    pub fn describe(&self) -> &'static str {
        match self {
            BenchDatabase::Sqlite(_) => "sqlite (fresh file, WAL, synchronous=FULL)",
            BenchDatabase::Postgres(_) => {
                "postgres (fresh scratch database, synchronous_commit as configured)"
            }
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

/// A microsecond histogram from 1 µs to 10 minutes.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("BUG: static histogram bounds")
}

/// Records one duration.
pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(micros);
}

impl Latency {
    /// Percentiles of a microsecond histogram.
    pub fn of(histogram: &Histogram<u64>) -> Latency {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Latency {
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

/// A progress bar on standard error, or a hidden one for `--json` runs.
pub fn progress(length: u64, prefix: String, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length).with_prefix(prefix);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("BUG: static progress template")
            .progress_chars("=> "),
    );
    bar
}
