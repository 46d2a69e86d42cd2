//! A bot army against one node, sized for CI: `ledger bench attack --json`
//! (honest buyers from 127.0.0.1, attackers from 127.0.0.2 and up running
//! slowloris and login, random-token and made-up-product floods). Checks
//! what is not a timing: no honest request failed, the invariants held,
//! the server's memory stayed under its bound, and the attack was met
//! (slow connections cut off, floods refused).

use super::report::Report;
use serde_json::Value;
use std::process::Command;

/// The node's peak resident memory must stay under this (MiB).
const RSS_BOUND_MIB: &str = "512";

/// Runs the scenario on SQLite.
pub fn run(report: &mut Report) {
    let output = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args([
            "bench",
            "attack",
            "--json",
            "--clients",
            "40",
            "--quota",
            "60000",
            "--amount",
            "100",
            "--seconds",
            "60",
            "--slowloris",
            "1000",
            "--login-rate",
            "100",
            "--token-rate",
            "500",
            "--product-rate",
            "200",
            "--rss-bound-mib",
            RSS_BOUND_MIB,
        ])
        .env_remove("DATABASE_URL")
        .output()
        .expect("running ledger bench attack");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result: Value = match serde_json::from_str(stdout.trim()) {
        Ok(result) => result,
        Err(error) => {
            report.check(
                "the benchmark reported",
                false,
                format!(
                    "{error}: {stdout} {}",
                    String::from_utf8_lossy(&output.stderr)
                ),
            );
            return;
        }
    };
    let (baseline, under) = (&result["baseline"], &result["under_attack"]);
    let attackers = &result["attackers"];
    let checks = &result["checks"];
    report.requests =
        baseline["requests"].as_u64().unwrap_or(0) + under["requests"].as_u64().unwrap_or(0);
    report.outcome = format!(
        "{} buyers; {} half-open connections, floods of {}; {} and {} confirmed/s without and with",
        result["clients"],
        result["attack"]["slowloris_connections"],
        result["attack"],
        baseline["confirmed_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            .round(),
        under["confirmed_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            .round(),
    );
    let held = |name: &str| checks[name].as_bool() == Some(true);
    report.check(
        "no honest request failed but for sold out",
        held("no_honest_failures"),
        format!(
            "baseline {}, under attack {}",
            baseline["answers"], under["answers"]
        ),
    );
    report.check(
        "both sales sold out",
        baseline["sold_out"] == Value::Bool(true) && under["sold_out"] == Value::Bool(true),
        format!(
            "{} and {} confirmed",
            baseline["confirmed"], under["confirmed"]
        ),
    );
    report.check(
        "server RSS under its bound",
        held("rss_within_bound"),
        format!(
            "peak {} MiB (bound {RSS_BOUND_MIB}); {} fds at most",
            under["server_rss_peak_mib"], under["server_fds_peak"]
        ),
    );
    report.check(
        "quota conserved and confirmed = 201 answers",
        held("quotas_conserved"),
        "checked on both products",
    );
    report.check("hash chain verified", held("chain_verified"), "");
    report.check(
        "ledger audit drift clean",
        held("drift_clean"),
        "read models = rebuild, trial balance",
    );
    let count = |answers: &Value, prefix: &str| -> u64 {
        answers
            .as_object()
            .map(|map| {
                map.iter()
                    .filter(|(label, _)| label.starts_with(prefix))
                    .map(|(_, n)| n.as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    };
    report.check(
        "slow connections cut off",
        attackers["slowloris_cut_off"].as_u64().unwrap_or(0) > 0,
        format!(
            "{} of {} opened",
            attackers["slowloris_cut_off"], attackers["slowloris_opened"]
        ),
    );
    report.check(
        "floods refused (no 2xx, no 5xx but 503)",
        ["login_answers", "token_answers", "product_answers"]
            .iter()
            .all(|flood| {
                count(&attackers[flood], "2") == 0
                    && count(&attackers[flood], "5") == count(&attackers[flood], "503")
            }),
        format!(
            "login {}, tokens {}, products {}",
            attackers["login_answers"], attackers["token_answers"], attackers["product_answers"]
        ),
    );
}
