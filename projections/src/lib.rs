//! Read models projected from the event log (sale progress, balances, ledger
//! entries, orders with their timelines, payouts), their runner, rebuild,
//! drift check and trial balance.
//!
//! Every read model is derived: it can be dropped and rebuilt from the log at
//! any time and comes out identical, which `drift::check_drift` proves.

pub mod apply;
pub mod db;
pub mod drift;
pub mod entitlement;
pub mod envelope;
pub mod error;
pub mod fold;
pub mod history;
pub mod projection;
pub mod query;
pub mod rebuild;
pub mod rows;
pub mod runner;
pub mod schema;
pub mod trial;

pub use apply::{PROJECTION_BATCH_MAX, install};
pub use db::{Checkpoint, ReadDb};
pub use drift::{DriftReport, check_drift};
pub use error::ProjectionError;
pub use projection::Projection;
pub use rebuild::{RebuildReport, prepare, rebuild};
pub use runner::{Runner, RunnerOptions, StatusReport, Statuses, catch_up};
pub use trial::TrialBalance;
