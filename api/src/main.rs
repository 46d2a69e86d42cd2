//! The `ledger` command: parses the command line, sets up logging, runs.

use clap::Parser;

// The server allocates many small short-lived buffers per request across
// threads; glibc's allocator spent a fifth of the HTTP benchmark's CPU in
// malloc and free (`ledger bench http` under perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
