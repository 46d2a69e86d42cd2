//! The `ledger` command: parses the command line, sets up logging, runs.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = api::cli::Cli::parse();
    api::telemetry::init(cli.log_format);
    match api::cli::run(cli).await {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "ledger failed");
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
