//! The `ledger` binary run as a user would: `migrate` on empty databases and
//! the append benchmark's JSON report.

use serde_json::json;
use std::process::Command;
use store::EventStore as _;
use store::testing::TestPostgres;

fn ledger() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ledger"));
    command
        .env_remove("DATABASE_URL")
        .env_remove("LEDGER_EVENT_STORE")
        .env("RUST_LOG", "warn");
    command
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("ledger runs");
    assert!(
        output.status.success(),
        "ledger failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[tokio::test]
async fn migrate_creates_the_schema_on_an_empty_sqlite_file() {
    let folder = tempfile::tempdir().unwrap();
    let data_dir = folder.path().join("fresh");
    for _ in 0..2 {
        let printed = run(ledger().arg("migrate").arg("--data-dir").arg(&data_dir));
        assert!(printed.contains("0001 events"), "{printed}");
    }
    let url = format!("sqlite://{}", data_dir.join("ledger.db").display());
    let mut connection = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&mut connection)
            .await
            .unwrap();
    assert!(tables.contains(&"events".to_string()), "{tables:?}");
}

#[tokio::test]
async fn migrate_creates_the_schema_on_an_empty_postgres_database() {
    let Some(database) =
        TestPostgres::create("migrate_creates_the_schema_on_an_empty_postgres_database").await
    else {
        return;
    };
    for _ in 0..2 {
        let printed = run(ledger()
            .arg("migrate")
            .arg("--database-url")
            .arg(&database.url));
        assert!(printed.contains("0001 events"), "{printed}");
    }
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&database.url)
        .await
        .unwrap();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public.events') IS NOT NULL")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert!(exists);
}

#[test]
fn append_benchmark_reports_its_figures_and_checks_as_json() {
    let printed = run(ledger().args([
        "bench",
        "append",
        "--backend",
        "sqlite",
        "--events",
        "120",
        "--seconds",
        "20",
        "--writers",
        "4",
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_str(printed.trim()).expect("one JSON object");
    assert_eq!(report["checks"]["ok"], true, "{report}");
    let scenarios = report["scenarios"].as_array().unwrap();
    assert_eq!(
        scenarios.len(),
        5,
        "four batch sizes and the many-writers scenario"
    );
    let appended: u64 = scenarios
        .iter()
        .map(|s| s["events"].as_u64().unwrap())
        .sum();
    assert_eq!(appended, 5 * 120);
    assert_eq!(report["checks"]["events_in_log"], appended);
}

#[test]
fn an_event_store_this_binary_cannot_use_is_refused_by_name() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let migrate = |event_store: &str| {
        let output = ledger()
            .args([
                "migrate",
                "--data-dir",
                data_dir,
                "--event-store",
                event_store,
            ])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{event_store} was accepted");
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!said.contains("secret"), "credentials shown: {said}");
        said
    };
    let said = migrate("postgres://ledger:secret@localhost/ledger");
    assert!(said.contains("esdb://"), "{said}");
    // Nothing listens on port 1: with the feature the connection fails,
    // without it the binary says what it lacks.
    let said = migrate("esdb://admin:secret@127.0.0.1:1?tls=false&maxDiscoverAttempts=1");
    if cfg!(feature = "eventstoredb") {
        assert!(said.contains("event store"), "{said}");
    } else {
        assert!(said.contains("`eventstoredb` feature"), "{said}");
    }
}

#[test]
fn bad_arguments_are_refused_with_a_clear_message() {
    let output = ledger()
        .args(["bench", "append", "--batch-sizes", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("batch sizes must be"));
    let output = ledger()
        .args(["bench", "append", "--writers", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
}

#[test]
fn purchase_benchmark_sells_out_and_verifies_its_invariants_in_both_modes() {
    let printed = run(ledger().args([
        "bench",
        "purchases",
        "--backend",
        "sqlite",
        "--buyers",
        "40",
        "--quota",
        "4000",
        "--amount",
        "100",
        "--seconds",
        "20",
        "--rejections-per-buyer",
        "3",
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_str(printed.trim()).expect("one JSON object");
    let modes = report["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2, "engine and naive");
    // CI has no Redis: without --redis-url the baseline is skipped, and says so.
    assert_eq!(report["redis_baseline"], serde_json::Value::Null);
    assert_eq!(report["redis_skipped"], "no --redis-url given");
    assert_eq!(report["engine_over_redis"], serde_json::Value::Null);
    let engine = &modes[0];
    assert_eq!(engine["mode"], "engine");
    assert_eq!(engine["sold_out"], true, "{report}");
    assert_eq!(engine["confirmed_purchases"], 40);
    assert_eq!(engine["rejections_after_sell_out"], 40 * 3);
    for mode in modes {
        assert_eq!(mode["checks"]["ok"], true, "{mode}");
        assert_eq!(mode["checks"]["confirmed_in_log"], mode["confirmed_amount"]);
        // The oracle's figures over the raw log: nothing pending, nothing
        // left, never more reserved than the quota at any position.
        assert_eq!(mode["checks"]["never_oversold"], true, "{mode}");
        assert_eq!(
            mode["checks"]["violations"],
            serde_json::json!([]),
            "{mode}"
        );
        let peak = mode["checks"]["held_peak_in_log"].as_i64().unwrap();
        let confirmed = mode["confirmed_amount"].as_i64().unwrap();
        assert!(
            (confirmed..=4_000).contains(&peak),
            "at least what was sold was reserved, never more than the quota: {mode}"
        );
    }
    let naive = &modes[1];
    assert_eq!(naive["mode"], "naive");
    // The ratio is the two modes' own rates divided (no claim on speed,
    // which this machine's load decides), so it is checked as arithmetic.
    let rate = |mode: &serde_json::Value| mode["confirmed_per_second"].as_f64().unwrap();
    let ratio = report["engine_over_naive"].as_f64().unwrap();
    assert!(rate(engine) > 0.0 && rate(naive) > 0.0, "{report}");
    let expected = rate(engine) / rate(naive);
    assert!(
        (ratio - expected).abs() <= expected * 1e-9,
        "engine_over_naive {ratio} is not {expected}"
    );
}

/// A log with a generated history of about `events` events.
async fn generated_log(
    store: &dyn store::EventStore,
    events: usize,
) -> projections::history::History {
    let mut history = projections::history::History::new(projections::history::Shape {
        accounts: 60,
        products: 2,
        seed: 11,
    });
    let mut written = 0;
    while written < events {
        let appends = history.next_batch(250);
        written += appends.iter().map(|a| a.events.len()).sum::<usize>();
        store.append_batch(appends).await.expect("append");
    }
    history
}

fn json(printed: &str) -> serde_json::Value {
    serde_json::from_str(printed.trim()).unwrap_or_else(|e| panic!("{e}: {printed}"))
}

/// `rebuild`, `projections` and `audit drift` on one database, found clean,
/// then tampered with, then repaired by a rebuild of the damaged projection.
fn read_model_commands(location: &[&str], tamper: impl FnOnce()) {
    let with = |args: &[&str]| {
        let mut command = ledger();
        command.args(args).args(location);
        command
    };
    let status = json(&run(&mut with(&["projections", "status", "--json"])));
    assert!(
        status["projections"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["lag"].as_i64() > Some(1_000))
    );
    let rebuilt = json(&run(&mut with(&["rebuild", "--json"])));
    assert!(rebuilt["events"].as_i64() >= Some(2_000), "{rebuilt}");
    let status = json(&run(&mut with(&["projections", "status", "--json"])));
    for projection in status["projections"].as_array().unwrap() {
        assert_eq!(projection["lag"], 0, "{projection}");
        assert_eq!(projection["generation"], 2, "{projection}");
    }
    let clean = json(&run(&mut with(&["audit", "drift", "--json"])));
    assert_eq!(clean["trial_balance"]["net"], 0);
    tamper();
    let output = with(&["audit", "drift"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "drift exits 1");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("DRIFT") && printed.contains("MISMATCH"),
        "{printed}"
    );
    run(&mut with(&["rebuild", "--projection", "accounts"]));
    run(&mut with(&["audit", "drift"]));
    let output = with(&["rebuild", "--projection", "balances"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("no projection is named") && message.contains("accounts"),
        "{message}"
    );
}

const TAMPER: &str = "UPDATE account_balances_g2 SET available = available + 7 \
                      WHERE account_id = (SELECT MIN(account_id) FROM account_balances_g2)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_model_commands_rebuild_check_and_repair_on_sqlite() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("ledger.db");
    let store = store::SqliteEventStore::open(&path).await.unwrap();
    generated_log(&store, 2_000).await;
    let data_dir = folder.path().to_str().unwrap().to_owned();
    let read_models = projections::db::sqlite_read_models(&path);
    let url = format!("sqlite://{}", read_models.display());
    tokio::task::spawn_blocking(move || {
        read_model_commands(&["--data-dir", &data_dir], || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let mut connection = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
                    .await
                    .unwrap();
                sqlx::query(TAMPER).execute(&mut connection).await.unwrap();
            });
        });
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_model_commands_rebuild_check_and_repair_on_postgres() {
    let Some(database) =
        TestPostgres::create("read_model_commands_rebuild_check_and_repair_on_postgres").await
    else {
        return;
    };
    generated_log(&database.store().await, 2_000).await;
    let url = database.url.clone();
    tokio::task::spawn_blocking(move || {
        read_model_commands(&["--database-url", &url], || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                    .await
                    .unwrap();
                sqlx::query(TAMPER).execute(&mut connection).await.unwrap();
            });
        });
    })
    .await
    .unwrap();
}

#[test]
fn rebuild_benchmark_reports_figures_and_checks_as_json() {
    let printed = run(ledger().args([
        "bench",
        "rebuild",
        "--events",
        "3000",
        "--accounts",
        "100",
        "--products",
        "2",
        "--json",
    ]));
    let report = json(&printed);
    assert_eq!(report["benchmark"], "rebuild");
    assert!(report["events"].as_i64() >= Some(3_000), "{report}");
    assert!(report["events_per_second"].as_f64() > Some(0.0), "{report}");
    assert_eq!(report["checks"]["ok"], true, "{report}");
    assert_eq!(report["checks"]["drift_differences"], 0, "{report}");
}

#[test]
fn lookup_benchmark_times_every_console_lookup_and_checks_the_answers() {
    let printed = run(ledger().args([
        "bench",
        "lookups",
        "--events",
        "3000",
        "--accounts",
        "100",
        "--products",
        "2",
        "--samples",
        "20",
        "--json",
    ]));
    let report = json(&printed);
    assert_eq!(report["benchmark"], "lookups");
    assert!(report["events"].as_i64() >= Some(3_000), "{report}");
    assert_eq!(report["wrong_answers"], 0, "{report}");
    let lookups = report["lookups"].as_array().unwrap();
    assert_eq!(lookups.len(), 6, "{report}");
    for lookup in lookups {
        assert!(lookup["latency"]["p99_ms"].as_f64() > Some(0.0), "{report}");
    }
}

/// Payday through a lying, rate-limited gateway: every holder paid once,
/// checked against the gateway's own record.
#[test]
fn payout_benchmark_pays_every_holder_once_through_a_lying_gateway() {
    let printed = run(ledger().args([
        "bench",
        "payouts",
        "--holders",
        "300",
        "--gateway-latency-ms",
        "5",
        "--concurrency",
        "16",
        "--error-after-pay-rate",
        "0.1",
        "--late-pay-rate",
        "0.05",
        "--hang-ms",
        "600",
        "--gateway-timeout-ms",
        "300",
        "--lease-ms",
        "1000",
        "--gateway-rate-limit",
        "400",
        "--json",
    ]));
    let report = json(&printed);
    assert_eq!(report["benchmark"], "payouts");
    assert_eq!(report["completed"], true, "{report}");
    assert_eq!(report["checks"]["ok"], true, "{report}");
    assert_eq!(report["checks"]["payouts_succeeded"], 300, "{report}");
    assert_eq!(report["checks"]["gateway_payments"], 300, "{report}");
    assert!(report["unknown_outcomes"].as_u64() > Some(0), "{report}");
    assert!(
        report["peak_concurrent_calls"].as_u64() > Some(1),
        "{report}"
    );
}

#[test]
fn http_benchmark_sells_out_over_http_and_verifies_on_both_backends() {
    let mut backends = vec![vec![]];
    match std::env::var("DATABASE_URL") {
        Ok(url) => backends.push(vec![
            "--backend".to_owned(),
            "postgres".to_owned(),
            "--database-url".to_owned(),
            url,
        ]),
        Err(_) => eprintln!("skipped bench http on PostgreSQL: DATABASE_URL is not set"),
    }
    for backend in backends {
        let printed = run(ledger()
            .args(["bench", "http", "--clients", "40", "--quota", "30000"])
            .args(["--amount", "100", "--seconds", "60", "--json"])
            .args(&backend));
        let report = json(&printed);
        assert_eq!(report["benchmark"], "http");
        assert_eq!(report["sold_out"], true, "{report}");
        assert_eq!(report["confirmed_purchases"], 300, "{report}");
        assert_eq!(report["answers"]["201"], 300, "{report}");
        assert!(
            report["confirmed_per_second"].as_f64() > Some(0.0),
            "{report}"
        );
        assert_eq!(report["checks"]["ok"], true, "{report}");
        assert_eq!(report["checks"]["orders_distinct"], true, "{report}");
        assert_lag_reported(&report);
    }
}

/// The lag sampler's report: the read models caught up with the log after
/// the storm (how fast is this machine's business, not the test's).
fn assert_lag_reported(report: &serde_json::Value) {
    let lag = &report["lag"];
    assert_eq!(lag["period_ms"], 100, "{report}");
    assert!(lag["head_at_storm_end"].as_i64() > Some(0), "{report}");
    assert!(lag["catch_up_seconds"].as_f64().is_some(), "{report}");
    assert!(
        lag["progress_lag_seconds_max"].as_f64() >= Some(0.0),
        "{report}"
    );
    assert!(lag["read_model_lag_seconds_max"].is_object(), "{report}");
}

#[test]
fn http_benchmark_with_wrk_counts_its_answers_and_samples_the_lag() {
    if std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped bench http --external wrk: wrk is not installed");
        return;
    }
    let printed = run(ledger()
        .args(["bench", "http", "--external", "wrk", "--clients", "20"])
        .args([
            "--quota",
            "30000",
            "--amount",
            "100",
            "--seconds",
            "3",
            "--json",
        ]));
    let report = json(&printed);
    assert_eq!(report["benchmark"], "http");
    let created = report["answers"]["201"].as_u64().expect("some 201 answers");
    assert_eq!(report["confirmed_purchases"], created, "{report}");
    // The log's confirmed units are the 201 answers' (checked by the
    // benchmark), and wrk keeps no order ids to compare.
    assert_eq!(report["checks"]["ok"], true, "{report}");
    assert_eq!(report["checks"]["orders_distinct"], serde_json::Value::Null);
    assert!(report["generator"].as_str().unwrap().starts_with("wrk"));
    assert_lag_reported(&report);
}

fn lag(data_dir: &str) -> i64 {
    let status = json(&run(ledger().args([
        "projections",
        "status",
        "--json",
        "--data-dir",
        data_dir,
    ])));
    status["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_i64().unwrap())
        .max()
        .unwrap()
}

fn wait_for_no_lag(data_dir: &str) {
    for _ in 0..600 {
        if lag(data_dir) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the projections never caught up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_run_follows_another_process_and_survives_kill_9() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("ledger.db");
    let store = store::SqliteEventStore::open(&path).await.unwrap();
    let mut history = generated_log(&store, 1_000).await;
    let data_dir = folder.path().to_str().unwrap().to_owned();
    let mut runner = ledger()
        .args([
            "projections",
            "run",
            "--batch",
            "97",
            "--data-dir",
            &data_dir,
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dir = data_dir.clone();
    tokio::task::spawn_blocking(move || wait_for_no_lag(&dir))
        .await
        .unwrap();
    // More appends from this process (the same history going on: a second
    // generator would list the same products again, and its sales would
    // conflict while its payouts landed): the runner wakes by its poll.
    for _ in 0..8 {
        store.append_batch(history.next_batch(200)).await.unwrap();
    }
    let dir = data_dir.clone();
    tokio::task::spawn_blocking(move || wait_for_no_lag(&dir))
        .await
        .unwrap();
    for _ in 0..8 {
        store.append_batch(history.next_batch(200)).await.unwrap();
    }
    // Killed mid-stream: whatever it committed must be whole.
    runner.kill().unwrap();
    runner.wait().unwrap();
    let dir = data_dir.clone();
    tokio::task::spawn_blocking(move || {
        run(ledger().args(["audit", "drift", "--data-dir", &dir]));
    })
    .await
    .unwrap();
}

fn run_status(command: &mut Command) -> (bool, String) {
    let output = command.output().expect("ledger runs");
    (
        output.status.success(),
        String::from_utf8(output.stdout).expect("utf-8 output")
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_verifies_offline_and_tampering_is_reported() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("ledger.db");
    let store = store::SqliteEventStore::open(&path).await.unwrap();
    generated_log(&store, 300).await;
    let head = store.head().await.unwrap();
    let data_dir = folder.path().to_str().unwrap().to_owned();

    let verified = json(&run(ledger().args([
        "audit",
        "verify",
        "--json",
        "--data-dir",
        &data_dir,
    ])));
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["events_checked"], head);

    let export = folder.path().join("export.jsonl");
    run(ledger()
        .args(["audit", "export", "--data-dir", &data_dir, "--output"])
        .arg(&export));
    let text = std::fs::read_to_string(&export).unwrap();
    assert_eq!(text.lines().count() as i64, head);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for field in [
        "position", "stream", "version", "event_id", "type", "data", "metadata", "hash",
    ] {
        assert!(first.get(field).is_some(), "{field} missing: {first}");
    }
    let offline = json(&run(ledger()
        .args(["audit", "verify", "--json", "--file"])
        .arg(&export)));
    assert_eq!(offline["ok"], true, "{offline}");
    assert_eq!(offline["head_hash"], verified["head_hash"]);

    // A range verifies on its own, from the hash before it.
    let range = folder.path().join("range.jsonl");
    run(ledger()
        .args([
            "audit",
            "export",
            "--data-dir",
            &data_dir,
            "--from",
            "10",
            "--to",
            "20",
            "--output",
        ])
        .arg(&range));
    let partial = json(&run(ledger()
        .args(["audit", "verify", "--json", "--file"])
        .arg(&range)));
    assert_eq!(
        (partial["ok"].clone(), partial["events_checked"].clone()),
        (json!(true), json!(11))
    );

    // An edited export line is found offline, at its position.
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut edited: serde_json::Value = serde_json::from_str(&lines[4]).unwrap();
    edited["metadata"]["actor_id"] = json!("someone-else");
    let position = edited["position"].as_i64().unwrap();
    lines[4] = edited.to_string();
    let tampered = folder.path().join("tampered.jsonl");
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let (ok, printed) = run_status(
        ledger()
            .args(["audit", "verify", "--json", "--file"])
            .arg(&tampered),
    );
    let report = json(&printed);
    assert!(!ok);
    assert_eq!(report["first_bad_position"], position, "{report}");

    // An anchor published from the head: it holds now; after the tail is
    // cut, it does not.
    let head_hash = verified["head_hash"].as_str().unwrap().to_owned();
    let anchor = format!("{head}:{head_hash}");
    let (ok, printed) = run_status(ledger().args([
        "audit",
        "verify",
        "--data-dir",
        &data_dir,
        "--anchor",
        &anchor,
    ]));
    assert!(
        ok,
        "the anchor holds on the untouched log: {anchor}: {printed}"
    );
    // A row edited in the database behind the ledger's back.
    let url = format!("sqlite://{}", path.display());
    let mut connection = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    for sql in [
        "DROP TRIGGER events_no_update",
        "UPDATE events SET data = replace(data, '1', '2') WHERE position = 7",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut connection)
            .await
            .unwrap();
    }
    let (ok, printed) = run_status(ledger().args(["audit", "verify", "--data-dir", &data_dir]));
    assert!(!ok, "{printed}");
    assert!(
        printed.contains("first bad event at position 7"),
        "{printed}"
    );
    // The last events deleted: the chain alone cannot tell, the anchor can.
    for sql in [
        "DROP TRIGGER events_no_delete",
        "DELETE FROM events WHERE position > 290",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut connection)
            .await
            .unwrap();
    }
    let (ok, printed) = run_status(ledger().args([
        "audit",
        "verify",
        "--data-dir",
        &data_dir,
        "--anchor",
        &anchor,
    ]));
    assert!(!ok, "a cut tail breaks the anchor: {printed}");
    assert!(
        printed.contains("first bad event at position 7"),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_replay_gives_the_balances_and_progress_of_a_past_position() {
    use domain::Decider;
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("ledger.db");
    let store = store::SqliteEventStore::open(&path).await.unwrap();
    generated_log(&store, 600).await;
    let position = store.head().await.unwrap() / 2;
    let data_dir = folder.path().to_str().unwrap().to_owned();
    let output = folder.path().join("replay.db");
    let report = json(&run(ledger()
        .args(["audit", "replay", "--json", "--data-dir", &data_dir])
        .args(["--until", &position.to_string(), "--output"])
        .arg(&output)));
    assert_eq!(report["position"], position);
    assert!(output.exists(), "the replayed read models stay in --output");
    // What the deciders say of every stream's events up to that position.
    let events = store.read_all(0, 10_000).await.unwrap();
    let mut accounts: std::collections::BTreeMap<String, domain::account::AccountState> =
        Default::default();
    let mut products: std::collections::BTreeMap<String, domain::product::ProductState> =
        Default::default();
    for event in events.iter().filter(|e| e.position <= position) {
        if let Some(id) = event.stream_id.strip_prefix("account-") {
            let decoded =
                engine::aggregate::decode::<domain::account::CustomerAccount>(event).unwrap();
            let state = accounts.remove(id).unwrap_or_default();
            accounts.insert(
                id.to_owned(),
                domain::account::CustomerAccount::evolve(state, &decoded),
            );
        } else if let Some(id) = event.stream_id.strip_prefix("product-") {
            let decoded = engine::aggregate::decode::<domain::product::ProductSale>(event).unwrap();
            let state = products.remove(id).unwrap_or_default();
            products.insert(
                id.to_owned(),
                domain::product::ProductSale::evolve(state, &decoded),
            );
        }
    }
    let replayed = report["accounts"].as_array().unwrap();
    assert_eq!(
        replayed.len(),
        accounts.values().filter(|a| a.account.is_some()).count()
    );
    for row in replayed {
        let state = accounts[row["account_id"].as_str().unwrap()]
            .account
            .as_ref()
            .unwrap();
        assert_eq!(row["available"], state.available.minor(), "{row}");
        assert_eq!(
            row["total_deposited"],
            state.total_deposited.minor(),
            "{row}"
        );
        assert_eq!(row["total_paid_out"], state.total_paid_out.minor(), "{row}");
    }
    for row in report["products"].as_array().unwrap() {
        let sale = products[row["product_id"].as_str().unwrap()]
            .sale
            .as_ref()
            .unwrap();
        assert_eq!(row["confirmed"], sale.confirmed.minor(), "{row}");
        assert_eq!(row["reserved"], sale.pending.minor(), "{row}");
        assert_eq!(row["available"], sale.available().minor(), "{row}");
    }
    // A time works too: the log's first event's time gives its prefix.
    let first_time = store::chain::time_text(events[0].recorded_at);
    let early = json(&run(ledger().args([
        "audit",
        "replay",
        "--json",
        "--data-dir",
        &data_dir,
        "--until",
        &first_time,
    ])));
    assert!(early["position"].as_i64().unwrap() >= 1);
    assert!(early["position"].as_i64().unwrap() < position * 2);
}
