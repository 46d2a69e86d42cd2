//! The `ledger` binary's library: command line, benchmarks and telemetry.

pub mod audit;
pub mod bench;
pub mod cli;
pub mod gateway;
pub mod read_models;
pub mod server;
pub mod telemetry;
