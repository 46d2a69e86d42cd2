//! Read models projected from the event log (sale progress, balances, ledger
//! entries, orders, payouts), their runner, rebuild and drift check.
//!
//! Not built yet: this crate holds the place the workspace layout gives it.
//! Until it lands, `engine::audit` folds the log directly for checks.
