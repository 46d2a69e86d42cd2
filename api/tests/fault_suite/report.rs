//! What each scenario reports: its requests, its outcome in words, and the
//! invariants it checked; printed as one table at the end.

use std::fmt::Display;

/// One scenario's result.
pub struct Report {
    /// The scenario's name.
    pub scenario: &'static str,
    /// Where the log lives (`sqlite`, `postgres`).
    pub backend: &'static str,
    /// HTTP requests the scenario sent.
    pub requests: u64,
    /// What happened, in a few words.
    pub outcome: String,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
    /// Each invariant checked: name, held, and the figures behind it.
    pub checks: Vec<Check>,
}

/// One invariant checked.
pub struct Check {
    /// What must hold.
    pub name: String,
    /// Whether it held.
    pub held: bool,
    /// The figures it was judged on.
    pub detail: String,
}

impl Report {
    /// An empty report for a scenario on a backend.
    pub fn new(scenario: &'static str, backend: &'static str) -> Report {
        Report {
            scenario,
            backend,
            requests: 0,
            outcome: String::new(),
            skipped: None,
            checks: Vec::new(),
        }
    }

    /// Records an invariant; a broken one fails the scenario (the rest are
    /// still checked, so the table shows everything that broke).
    pub fn check(&mut self, name: impl Into<String>, held: bool, detail: impl Display) {
        self.checks.push(Check {
            name: name.into(),
            held,
            detail: detail.to_string(),
        });
    }

    /// Whether every invariant held (a skipped scenario did not fail).
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.held)
    }
}

/// One line counting what ran: "fault suite: N of M scenarios ran (H held,
/// F failed), S skipped: ...".
pub fn summary(reports: &[Report], total: usize) -> String {
    let ran: Vec<&Report> = reports.iter().filter(|r| r.skipped.is_none()).collect();
    let failed = ran.iter().filter(|r| !r.passed()).count();
    let skipped: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            let why = r.skipped.as_ref()?;
            Some(format!("{} {} ({why})", r.scenario, r.backend))
        })
        .collect();
    let mut line = format!(
        "fault suite: {} of {total} scenarios ran ({} held, {failed} failed), {} not chosen, {} skipped",
        ran.len(),
        ran.len() - failed,
        total - reports.len(),
        skipped.len()
    );
    if !skipped.is_empty() {
        line.push_str(&format!(": {}", skipped.join("; ")));
    }
    line
}

/// Prints the summary table and, below it, every broken invariant.
pub fn print(reports: &[Report]) {
    let rows: Vec<[String; 5]> = reports
        .iter()
        .map(|r| {
            let held = r.checks.iter().filter(|c| c.held).count();
            let invariants = if r.skipped.is_some() {
                "-".to_owned()
            } else if r.passed() {
                format!("{held}/{} held", r.checks.len())
            } else {
                format!("{held}/{} held: FAILED", r.checks.len())
            };
            let outcome = r
                .skipped
                .as_ref()
                .map_or_else(|| r.outcome.clone(), |why| format!("skipped: {why}"));
            [
                r.scenario.to_owned(),
                r.backend.to_owned(),
                r.requests.to_string(),
                outcome,
                invariants,
            ]
        })
        .collect();
    let header = ["scenario", "backend", "requests", "outcome", "invariants"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String; 5]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(column, (cell, width))| {
                if column == 2 {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    println!();
    line(&header.map(str::to_owned));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", rule.join("-|-"));
    for row in &rows {
        line(row);
    }
    for report in reports {
        println!();
        println!("{} on {}:", report.scenario, report.backend);
        for check in &report.checks {
            let mark = if check.held { "ok    " } else { "BROKEN" };
            println!("  {mark} {} ({})", check.name, check.detail);
        }
        if let Some(why) = &report.skipped {
            println!("  skipped: {why}");
        }
    }
}
