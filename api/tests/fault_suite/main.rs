//! The fault suite: the whole system, as the real `ledger` binary on
//! loopback, under the conditions that broke the old platform. Each
//! scenario drives `ledger serve` nodes over HTTP while a fault strikes,
//! then checks the invariants and reports; the suite ends with one table
//! (scenario, backend, requests, outcome, invariants) and fails if any
//! invariant broke.
//!
//! `cargo test -p api --test fault_suite [-- NAME…]` runs it (`cargo test
//! --workspace` too); names filter scenarios by substring. PostgreSQL
//! scenarios need `DATABASE_URL`; the database restart also needs
//! `LEDGER_FAULTS_RESTART_POSTGRES=1`. Skipped scenarios say why; a scenario
//! the environment asks for that cannot run fails (the restart asked for
//! while the local server cannot be controlled), a filter that matches no
//! scenario fails, and the last line counts the scenarios that ran.

#[path = "../hostile/mod.rs"]
mod hostile;
#[path = "../process/mod.rs"]
mod process;

mod attack;
mod client;
mod cluster;
mod hostile_input;
mod payouts;
mod postgres;
mod report;
mod storm;

use cluster::Cluster;
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use report::Report;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::time::Instant;
use storm::{Fault, SERVE_ARGS};

/// A scenario: its name, backend, and what runs it.
struct Scenario {
    name: &'static str,
    backend: &'static str,
    run: fn(Report) -> LocalBoxFuture<'static, Report>,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "crash in a storm",
            backend: "sqlite",
            run: |mut report| {
                async move {
                    let cluster = Cluster::sqlite("crash_in_a_storm", SERVE_ARGS);
                    storm::run(cluster, 1, Fault::KillAndRestart, &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "crash in a storm",
            backend: "postgres",
            run: |mut report| {
                async move {
                    let Some(cluster) = Cluster::postgres("crash_in_a_storm", SERVE_ARGS).await
                    else {
                        return skipped_without_postgres(report);
                    };
                    storm::run(cluster, 1, Fault::KillAndRestart, &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "database restart",
            backend: "postgres",
            run: |mut report| {
                async move {
                    let Some(cluster) = Cluster::postgres("database_restart", SERVE_ARGS).await
                    else {
                        return skipped_without_postgres(report);
                    };
                    if std::env::var(postgres::ALLOW).as_deref() != Ok("1") {
                        report.skipped = Some(format!(
                            "set {}=1 to let the suite stop and start the local PostgreSQL",
                            postgres::ALLOW
                        ));
                        return report;
                    }
                    // Asked for by the environment: not being able to run
                    // it is a failure, never a skip.
                    let url = std::env::var("DATABASE_URL").unwrap_or_default();
                    let control = match postgres::Control::local(&url) {
                        Ok(control) => control,
                        Err(why) => {
                            report.outcome = "could not run".into();
                            report.check(
                                format!("the restart {}=1 asks for can run", postgres::ALLOW),
                                false,
                                why,
                            );
                            return report;
                        }
                    };
                    let fault = Fault::RestartPostgres(control);
                    storm::run(cluster, 1, fault, &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "three nodes, one killed",
            backend: "postgres",
            run: |mut report| {
                async move {
                    let Some(cluster) = Cluster::postgres("three_nodes", SERVE_ARGS).await else {
                        return skipped_without_postgres(report);
                    };
                    storm::run(cluster, 3, Fault::KillOneOfThree, &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "three members, owner killed",
            backend: "postgres",
            run: |mut report| {
                async move {
                    let Some(mut cluster) = Cluster::postgres("owner_killed", SERVE_ARGS).await
                    else {
                        return skipped_without_postgres(report);
                    };
                    cluster.members();
                    storm::run(cluster, 3, Fault::KillOwner, &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "three members, owner stopped",
            backend: "postgres",
            run: |mut report| {
                async move {
                    let Some(mut cluster) = Cluster::postgres("owner_stopped", SERVE_ARGS).await
                    else {
                        return skipped_without_postgres(report);
                    };
                    cluster.members();
                    storm::run(cluster, 3, Fault::StopOwner, &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "payout storm",
            backend: "sqlite",
            run: |mut report| {
                async move {
                    payouts::run(Cluster::sqlite("payout_storm", &[]), 1, &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "payout storm",
            backend: "postgres",
            run: |mut report| {
                async move {
                    let Some(cluster) = Cluster::postgres("payout_storm", &[]).await else {
                        return skipped_without_postgres(report);
                    };
                    payouts::run(cluster, 2, &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "hostile input",
            backend: "sqlite",
            run: |mut report| {
                async move {
                    hostile_input::run(Cluster::sqlite("hostile_input", &[]), &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "hostile input",
            backend: "postgres",
            run: |mut report| {
                async move {
                    let Some(cluster) = Cluster::postgres("hostile_input", &[]).await else {
                        return skipped_without_postgres(report);
                    };
                    hostile_input::run(cluster, &mut report).await;
                    report
                }
                .boxed_local()
            },
        },
        Scenario {
            name: "bot army",
            backend: "sqlite",
            run: |mut report| {
                async move {
                    // The benchmark is a process of its own: run it off
                    // this thread's runtime.
                    tokio::task::spawn_blocking(move || {
                        attack::run(&mut report);
                        report
                    })
                    .await
                    .expect("the bot army scenario panicked")
                }
                .boxed_local()
            },
        },
    ]
}

fn skipped_without_postgres(mut report: Report) -> Report {
    report.skipped = Some("DATABASE_URL is not set".into());
    report
}

fn main() -> ExitCode {
    // Names to run (substrings of "scenario backend"); flags cargo passes
    // to every test binary (`--nocapture`, …) mean nothing here.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let all = scenarios();
    let total = all.len();
    let chosen: Vec<Scenario> = all
        .into_iter()
        .filter(|s| {
            let label = format!("{} {}", s.name, s.backend);
            filters.is_empty() || filters.iter().any(|f| label.contains(f.as_str()))
        })
        .collect();
    if chosen.is_empty() {
        println!("fault suite: FAILED: no scenario matches {filters:?}");
        return ExitCode::FAILURE;
    }
    let mut reports = Vec::new();
    for scenario in chosen {
        let label = format!("{} {}", scenario.name, scenario.backend);
        println!("fault suite: {label} …");
        let started = Instant::now();
        let report = Report::new(scenario.name, scenario.backend);
        // Run on this thread, so a panic (a failed `assert!` in the
        // scenario's own steps) ends only that scenario.
        let run = AssertUnwindSafe((scenario.run)(report)).catch_unwind();
        let mut report = match runtime.block_on(run) {
            Ok(report) => report,
            Err(failure) => {
                let mut report = Report::new(scenario.name, scenario.backend);
                let why = failure
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| failure.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "a panic".into());
                report.outcome = "aborted".into();
                report.check("the scenario ran to its end", false, why);
                report
            }
        };
        if report.skipped.is_none() {
            report.outcome = format!(
                "{} ({:.0}s)",
                report.outcome,
                started.elapsed().as_secs_f64()
            );
        }
        println!(
            "fault suite: {label}: {}",
            if report.skipped.is_some() {
                "skipped"
            } else if report.passed() {
                "held"
            } else {
                "FAILED"
            }
        );
        reports.push(report);
    }
    report::print(&reports);
    println!("\n{}", report::summary(&reports, total));
    println!(
        "\nEach node's log: {}/node<N>.log",
        cluster::logs_folder("<scenario>-<backend>").display()
    );
    if reports.iter().all(Report::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
