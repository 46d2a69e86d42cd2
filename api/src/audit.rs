//! `ledger audit verify` and `ledger audit export`: the hash chain walked
//! in the database or in an export file, and the log written as JSON Lines.
//!
//! Export format: one JSON object per line, in position order:
//! `position`, `stream`, `version`, `event_id`, `type`, `schema_version`,
//! `recorded_at` (RFC 3339, microseconds), `data`, `metadata` (actor, role,
//! request, correlation and causation ids), `previous_hash` and `hash`.
//! `hash` = SHA-256 of the JSON array `[previous_hash, stream, version,
//! event_id, type, schema_version, data as compact JSON, metadata as compact
//! JSON, recorded_at]` (see `store::chain`), so a file can be verified
//! offline, without the database.

use crate::cli::StoreArgs;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use store::chain::{ChainReport, Link, Verifier, time_text};
use store::{EventStore, Metadata, RecordedEvent};

/// Events read per page while exporting.
const EXPORT_PAGE: usize = 5_000;

/// One exported event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportedEvent {
    /// Global position.
    pub position: i64,
    /// The stream.
    pub stream: String,
    /// Version within the stream.
    pub version: i64,
    /// The event's id.
    pub event_id: String,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Version of the data's shape.
    pub schema_version: i32,
    /// When the store recorded it (RFC 3339, microseconds).
    pub recorded_at: String,
    /// The event's body.
    pub data: serde_json::Value,
    /// Who and why: actor, role, request, correlation and causation ids.
    #[schema(value_type = Object)]
    pub metadata: Metadata,
    /// The previous event's hash (64 zeros before the first event).
    pub previous_hash: String,
    /// This event's hash.
    pub hash: Option<String>,
}

impl ExportedEvent {
    /// An event as exported, after `previous_hash`.
    pub fn from_recorded(event: RecordedEvent, previous_hash: String) -> ExportedEvent {
        ExportedEvent {
            position: event.position,
            stream: event.stream_id,
            version: event.version,
            event_id: event.event_id.to_string(),
            event_type: event.event_type,
            schema_version: event.schema_version,
            recorded_at: time_text(event.recorded_at),
            data: event.data,
            metadata: event.metadata,
            previous_hash,
            hash: event.hash,
        }
    }
}

/// Options of `ledger audit verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyOptions {
    /// Where the log lives (ignored with `--file`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Verify this export (JSON Lines) instead of the database, offline.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A hash published earlier, `POSITION:HASH` (from a previous verify's
    /// head): the event there must still carry it. Catches a history cut
    /// short or re-chained from scratch, which the chain alone cannot see.
    #[arg(long)]
    pub anchor: Option<Anchor>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A published `position:hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The event's position.
    pub position: i64,
    /// Its hash then.
    pub hash: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    fn from_str(text: &str) -> Result<Anchor, String> {
        let (position, hash) = text.split_once(':').ok_or("an anchor is POSITION:HASH")?;
        let position: i64 = position
            .parse()
            .map_err(|_| "the anchor's position is not a number")?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the anchor's hash is 64 hex digits".into());
        }
        Ok(Anchor {
            position,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// Whether the event at the anchor's position still carries its hash.
async fn anchor_holds(store: &dyn EventStore, anchor: &Anchor) -> anyhow::Result<bool> {
    let found = store.read_at(anchor.position).await?;
    Ok(found.is_some_and(|e| e.hash.as_deref() == Some(&anchor.hash)))
}

/// Options of `ledger audit export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportOptions {
    /// Where the log lives.
    #[command(flatten)]
    pub store: StoreArgs,
    /// First position to export.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    pub from: i64,
    /// Last position to export (default: the head).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub to: Option<i64>,
    /// Write here instead of standard output.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Walks the chain in the database or a file; exits 1 when it is broken.
pub async fn verify(options: VerifyOptions) -> anyhow::Result<ExitCode> {
    let (report, source) = match &options.file {
        Some(path) => (verify_file(path)?, path.display().to_string()),
        None => {
            let store = options.store.open_log().await?;
            let head = store.head().await?;
            let bar = crate::read_models::replay_bar("verify", options.json);
            bar.set_length(u64::try_from(head).unwrap_or(0));
            let mut report = store
                .verify_chain(&|position| bar.set_position(position as u64))
                .await?;
            bar.finish_and_clear();
            if let Some(anchor) = &options.anchor
                && !anchor_holds(store.as_ref(), anchor).await?
            {
                eprintln!(
                    "the event at position {} no longer carries the anchored hash",
                    anchor.position
                );
                report.ok = false;
                report.first_bad_position = Some(
                    report
                        .first_bad_position
                        .map_or(anchor.position, |p| p.min(anchor.position)),
                );
            }
            (report, options.store.describe()?)
        }
    };
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report, &source);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(report: &ChainReport, source: &str) {
    match report.first_bad_position {
        None => println!(
            "hash chain intact in {source}: {} events checked; head hash {}",
            report.events_checked,
            report.head_hash.as_deref().unwrap_or("(empty log)")
        ),
        Some(position) => println!(
            "hash chain BROKEN in {source}: first bad event at position {position} ({} events checked)",
            report.events_checked
        ),
    }
}

/// Verifies an export without the database: each line's hash against its
/// content and `previous_hash`, and each `previous_hash` against the line
/// before.
pub fn verify_file(path: &std::path::Path) -> anyhow::Result<ChainReport> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut verifier: Option<Verifier> = None;
    let mut last_hash: Option<String> = None;
    let mut first_bad = None;
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event: ExportedEvent = serde_json::from_str(&line)
            .with_context(|| format!("line {} is not an exported event", index + 1))?;
        let verifier = verifier.get_or_insert_with(|| Verifier::starting_at(&event.previous_hash));
        if last_hash
            .as_ref()
            .is_some_and(|h| *h != event.previous_hash)
            && first_bad.is_none()
        {
            first_bad = Some(event.position);
        }
        let data = serde_json::to_string(&event.data)?;
        let metadata = store::metadata_text(&event.metadata);
        let recorded_at = chrono::DateTime::parse_from_rfc3339(&event.recorded_at)
            .with_context(|| format!("line {}: recorded_at", index + 1))?
            .with_timezone(&chrono::Utc);
        let event_id = uuid::Uuid::parse_str(&event.event_id)
            .with_context(|| format!("line {}: event_id", index + 1))?;
        let link = Link {
            stream_id: &event.stream,
            version: event.version,
            event_id,
            event_type: &event.event_type,
            schema_version: event.schema_version,
            data: &data,
            metadata: &metadata,
            recorded_at,
        };
        verifier.check(event.position, &link, event.hash.as_deref());
        last_hash = event.hash.clone();
    }
    let mut report = verifier.map(|v| v.report()).unwrap_or(ChainReport {
        ok: true,
        events_checked: 0,
        first_bad_position: None,
        head_hash: None,
    });
    if let Some(position) = first_bad
        && report.first_bad_position.is_none_or(|p| position < p)
    {
        report.first_bad_position = Some(position);
        report.ok = false;
    }
    Ok(report)
}

/// Writes the log (or a range of it) as JSON Lines.
pub async fn export(options: ExportOptions) -> anyhow::Result<ExitCode> {
    let store = options.store.open_log().await?;
    let head = store.head().await?;
    let to = options.to.unwrap_or(head).min(head);
    let bar = crate::read_models::replay_bar("export", options.output.is_none());
    bar.set_length(u64::try_from(to).unwrap_or(0));
    let output: Box<dyn Write> = match &options.output {
        Some(path) => Box::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut output = BufWriter::new(output);
    let written = write_range(store.as_ref(), options.from, to, &mut output, &|p| {
        bar.set_position(p as u64)
    })
    .await?;
    output.flush()?;
    bar.finish_and_clear();
    if let Some(path) = &options.output {
        eprintln!(
            "exported {written} events (positions {} to {to}) to {}",
            options.from,
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes events `from..=to`, each with the hash before it; returns how
/// many. Earlier events are read (not written) for the first one's
/// `previous_hash`.
pub async fn write_range(
    store: &dyn EventStore,
    from: i64,
    to: i64,
    output: &mut dyn Write,
    progress: &dyn Fn(i64),
) -> anyhow::Result<u64> {
    // A log without a hash chain (EventStoreDB) exports empty hashes.
    let mut previous = if store.keeps_hash_chain() {
        store::chain::GENESIS.to_owned()
    } else {
        String::new()
    };
    let mut after = 0;
    let mut written = 0;
    'pages: loop {
        let page = store.read_all(after, EXPORT_PAGE).await?;
        if page.is_empty() {
            break;
        }
        for event in page {
            after = event.position;
            if event.position > to {
                break 'pages;
            }
            let hash = event.hash.clone().unwrap_or_default();
            if event.position >= from {
                let line = ExportedEvent::from_recorded(event, previous);
                serde_json::to_writer(&mut *output, &line)?;
                output.write_all(b"\n")?;
                written += 1;
            }
            previous = hash;
        }
        progress(after);
    }
    Ok(written)
}

/// A point in the log's history: a position, or a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Every event up to and including this position.
    Position(i64),
    /// Every event recorded at or before this time.
    Time(chrono::DateTime<chrono::Utc>),
}

impl std::str::FromStr for AsOf {
    type Err = String;

    fn from_str(text: &str) -> Result<AsOf, String> {
        if let Ok(position) = text.parse::<i64>() {
            return if position >= 0 {
                Ok(AsOf::Position(position))
            } else {
                Err("a position is not negative".into())
            };
        }
        chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| AsOf::Time(t.with_timezone(&chrono::Utc)))
            .map_err(|_| format!("{text:?} is neither a position nor an RFC 3339 time"))
    }
}

impl AsOf {
    /// Whether an event falls within this point of history.
    pub fn covers(&self, event: &RecordedEvent) -> bool {
        match self {
            AsOf::Position(position) => event.position <= *position,
            AsOf::Time(time) => event.recorded_at <= *time,
        }
    }

    /// The last position of the log's prefix within this point (for a time:
    /// up to the first event recorded after it).
    pub async fn position(&self, store: &dyn EventStore) -> anyhow::Result<i64> {
        match self {
            AsOf::Position(position) => Ok((*position).min(store.head().await?)),
            AsOf::Time(_) => {
                let mut last = 0;
                loop {
                    let page = store.read_all(last, EXPORT_PAGE).await?;
                    if page.is_empty() {
                        return Ok(last);
                    }
                    for event in page {
                        if !self.covers(&event) {
                            return Ok(last);
                        }
                        last = event.position;
                    }
                }
            }
        }
    }
}

/// Options of `ledger audit replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayOptions {
    /// Where the log lives.
    #[command(flatten)]
    pub store: StoreArgs,
    /// A position, or an RFC 3339 time (every event recorded at or before it).
    #[arg(long)]
    pub until: AsOf,
    /// The SQLite file to build the read models in (default: a temporary
    /// file, removed afterwards).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `ledger audit replay` prints.
#[derive(Debug, Serialize)]
pub struct ReplayReport {
    /// The last position replayed.
    pub position: i64,
    /// Where the read models were built (null when temporary).
    pub output: Option<String>,
    /// Every product's sale progress then.
    pub products: Vec<projections::query::Progress>,
    /// Every account's balances then (at most 10,000).
    pub accounts: Vec<projections::query::Balance>,
}

/// Rebuilds the read models as of a point into a separate SQLite file and
/// prints sale progress and balances then.
pub async fn replay(options: ReplayOptions) -> anyhow::Result<ExitCode> {
    let store = options.store.open_log().await?;
    let position = options.until.position(store.as_ref()).await?;
    let folder = tempfile::tempdir()?;
    let path = options
        .output
        .clone()
        .unwrap_or_else(|| folder.path().join("replay.db"));
    anyhow::ensure!(
        !path.exists(),
        "{} exists; replay builds a fresh file",
        path.display()
    );
    let db = projections::ReadDb::open_sqlite(&path).await?;
    projections::install(&db).await?;
    let bar = crate::read_models::replay_bar("replay", options.json);
    bar.set_length(u64::try_from(position).unwrap_or(0));
    projections::catch_up(
        store.as_ref(),
        &db,
        &projections::Projection::ALL,
        Some(position),
    )
    .await?;
    bar.finish_and_clear();
    let report = ReplayReport {
        position,
        output: options.output.as_ref().map(|p| p.display().to_string()),
        products: projections::query::all_progress(&db).await?,
        accounts: projections::query::balances(&db, "").await?,
    };
    db.close().await;
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("read models as of position {position}:");
        for p in &report.products {
            println!(
                "  product {}: quota {}, confirmed {}, reserved {}, available {}, {} orders, {}",
                p.product_id, p.quota, p.confirmed, p.reserved, p.available, p.orders, p.status
            );
        }
        for a in &report.accounts {
            println!(
                "  account {}: available {}, held {}, deposited {}, invested {}, paid out {}",
                a.account_id,
                a.available,
                a.held,
                a.total_deposited,
                a.total_invested,
                a.total_paid_out
            );
        }
        if let Some(output) = &report.output {
            println!("(read models kept in {output})");
        }
    }
    Ok(ExitCode::SUCCESS)
}
