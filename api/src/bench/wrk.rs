//! `ledger bench http --external wrk`: the purchase storm from `wrk`, an
//! external load generator, instead of in-process clients.
//!
//! The clients' tokens go to a file; a Lua script gives each thread its
//! share of them and each request the next token of its share in turn, a
//! fresh `Idempotency-Key` and the purchase body, and counts the answers
//! (201, refused as sold out, overloaded, other 4xx, other 5xx). wrk runs
//! for `--seconds` with one keep-alive connection per client; its `done`
//! hook prints one line of JSON that this module reads back.

use super::http::{HttpBenchOptions, Outcome};
use super::{Latency, histogram};
use anyhow::Context as _;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// The marker before the Lua script's JSON line on wrk's output.
const RESULT_MARKER: &str = "LEDGER_WRK_RESULT ";

/// The Lua script wrk runs (see the module's documentation).
const SCRIPT: &str = r#"
local threads = {}
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
function init(args)
  local total = tonumber(os.getenv("LEDGER_WRK_THREADS"))
  tokens = {}
  local index = 0
  for line in io.lines(os.getenv("LEDGER_WRK_TOKENS")) do
    if index % total == id then table.insert(tokens, line) end
    index = index + 1
  end
  path = os.getenv("LEDGER_WRK_PATH")
  body = os.getenv("LEDGER_WRK_BODY")
  next_token = 1
  sequence = 0
  created, sold_out, overloaded, client_errors, server_errors = 0, 0, 0, 0, 0
end
function request()
  sequence = sequence + 1
  local token = tokens[next_token]
  next_token = next_token % #tokens + 1
  return wrk.format("POST", path, {
    ["authorization"] = "Bearer " .. token,
    ["idempotency-key"] = "w" .. id .. "-" .. sequence,
    ["content-type"] = "application/json",
  }, body)
end
function response(status, headers, response_body)
  if status == 201 then
    created = created + 1
  elseif status == 409 and (string.find(response_body, "sold_out", 1, true)
      or string.find(response_body, "insufficient_quota", 1, true)) then
    sold_out = sold_out + 1
  elseif status == 503 and string.find(response_body, "overloaded", 1, true) then
    overloaded = overloaded + 1
  elseif status >= 500 then
    server_errors = server_errors + 1
  else
    client_errors = client_errors + 1
  end
end
function done(summary, latency, requests)
  local totals = { created = 0, sold_out = 0, overloaded = 0, client_errors = 0, server_errors = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + thread:get(name)
    end
  end
  io.write(string.format(
    '%s{"created":%d,"sold_out":%d,"overloaded":%d,"client_errors":%d,"server_errors":%d,' ..
    '"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
    os.getenv("LEDGER_WRK_MARKER"), totals.created, totals.sold_out, totals.overloaded,
    totals.client_errors, totals.server_errors, summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
"#;

/// What the Lua script's `done` hook prints.
#[derive(Debug, Deserialize)]
struct WrkResult {
    created: u64,
    sold_out: u64,
    overloaded: u64,
    client_errors: u64,
    server_errors: u64,
    requests: u64,
    duration_us: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    connect_errors: u64,
    read_errors: u64,
    write_errors: u64,
    timeouts: u64,
}

/// Runs wrk against the purchase route for `--seconds` and reads back its
/// counts. Latencies are per request (a 503 is not retried).
pub(super) async fn drive(
    address: SocketAddr,
    product: &str,
    tokens: Vec<String>,
    options: &HttpBenchOptions,
) -> anyhow::Result<Outcome> {
    let folder = tempfile::tempdir()?;
    let tokens_path = folder.path().join("tokens.txt");
    let script_path = folder.path().join("purchase.lua");
    std::fs::write(&tokens_path, tokens.join("\n") + "\n")?;
    std::fs::write(&script_path, SCRIPT)?;
    let threads = options.wrk_threads.min(options.clients);
    let started = std::time::Instant::now();
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{}", options.clients))
        .arg(format!("-d{}s", options.seconds))
        .arg("--timeout")
        .arg("30s")
        .arg("-s")
        .arg(&script_path)
        .arg(format!("http://{address}/"))
        .env("LEDGER_WRK_THREADS", threads.to_string())
        .env("LEDGER_WRK_TOKENS", &tokens_path)
        .env(
            "LEDGER_WRK_PATH",
            format!("/v1/products/{product}/purchases"),
        )
        .env(
            "LEDGER_WRK_BODY",
            serde_json::json!({ "amount": options.amount }).to_string(),
        )
        .env("LEDGER_WRK_MARKER", RESULT_MARKER)
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk (install it: apt-get install -y wrk)")?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "wrk failed ({}): {}{}",
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix(RESULT_MARKER))
        .ok_or_else(|| anyhow::anyhow!("wrk printed no result line: {stdout}"))?;
    let result: WrkResult = serde_json::from_str(line)
        .with_context(|| format!("wrk's result line is not the expected JSON: {line}"))?;
    Ok(outcome(result, options.amount, elapsed))
}

fn outcome(result: WrkResult, amount: i64, elapsed: Duration) -> Outcome {
    let mut answers = BTreeMap::new();
    let counted = [
        ("201", result.created),
        ("409 sold_out or insufficient_quota", result.sold_out),
        ("503 overloaded", result.overloaded),
        ("other 4xx (or 3xx)", result.client_errors),
        ("5xx", result.server_errors),
        ("transport error (connect)", result.connect_errors),
        ("transport error (read)", result.read_errors),
        ("transport error (write)", result.write_errors),
        ("timeout", result.timeouts),
    ];
    for (label, count) in counted {
        if count > 0 {
            answers.insert(label.to_owned(), count);
        }
    }
    answers.insert("requests (all)".to_owned(), result.requests);
    // wrk measured its own duration; the process ran a little longer.
    let duration = if result.duration_us > 0 {
        Duration::from_micros(result.duration_us)
    } else {
        elapsed
    };
    Outcome {
        confirmed: result.created,
        confirmed_units: i64::try_from(result.created).unwrap_or(i64::MAX) * amount,
        confirmed_orders: None,
        sale_time: duration,
        sold_out: false,
        // Refusals after the sell-out are not timed apart from the sale.
        rejections: 0,
        rejection_time: Duration::ZERO,
        purchase_latency: histogram(),
        // wrk's percentiles are over every request it sent, whatever the
        // answer, and a 503 is not retried.
        request_latency: Some(Latency {
            p50_ms: result.p50_us as f64 / 1e3,
            p99_ms: result.p99_us as f64 / 1e3,
            max_ms: result.max_us as f64 / 1e3,
        }),
        rejection_latency: histogram(),
        answers,
    }
}
