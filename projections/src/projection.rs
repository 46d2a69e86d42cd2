//! The read models by name, with their tables and folds.

use crate::error::ProjectionError;
use crate::fold::{AccountsFold, Fold, OrdersFold, PayoutsFold, SaleFold};
use crate::schema::{
    ACCOUNT_BALANCES, ACCOUNT_HOLDS, LEDGER_ENTRIES, ORDERS, PAYOUTS, SALE_PROGRESS,
    TIMELINE_EVENTS, Table,
};
use std::fmt;
use std::str::FromStr;

/// One projection: a set of tables with one checkpoint, rebuilt together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    /// `sale_progress`.
    SaleProgress,
    /// `account_balances`, `account_holds` and `ledger_entries`.
    Accounts,
    /// `orders` and `timeline_events`.
    Orders,
    /// `payouts`.
    Payouts,
}

impl Projection {
    /// Every projection.
    pub const ALL: [Projection; 4] = [
        Projection::SaleProgress,
        Projection::Accounts,
        Projection::Orders,
        Projection::Payouts,
    ];

    /// Its name (the checkpoint key and the CLI's `--projection`).
    pub fn name(self) -> &'static str {
        match self {
            Projection::SaleProgress => "sale_progress",
            Projection::Accounts => "accounts",
            Projection::Orders => "orders",
            Projection::Payouts => "payouts",
        }
    }

    /// The shape of its tables. Bump it when a table definition or a fold
    /// changes: a projection whose stored shape differs is rebuilt at start.
    pub fn schema_version(self) -> i64 {
        match self {
            // 2: payout runs planned (principal_scheduled, interest_days).
            // 3: when the sale opened and sold out (the dashboard's clocks).
            Projection::SaleProgress => 3,
            // 2: ledger entries indexed by reference.
            Projection::Accounts => 2,
            Projection::Orders | Projection::Payouts => 1,
        }
    }

    /// Its tables.
    pub fn tables(self) -> &'static [&'static Table] {
        match self {
            Projection::SaleProgress => &[&SALE_PROGRESS],
            Projection::Accounts => &[&ACCOUNT_BALANCES, &ACCOUNT_HOLDS, &LEDGER_ENTRIES],
            Projection::Orders => &[&ORDERS, &TIMELINE_EVENTS],
            Projection::Payouts => &[&PAYOUTS],
        }
    }

    /// A fresh fold for one batch.
    pub fn fold(self) -> Box<dyn Fold> {
        match self {
            Projection::SaleProgress => Box::new(SaleFold::new()),
            Projection::Accounts => Box::new(AccountsFold::new()),
            Projection::Orders => Box::new(OrdersFold::new()),
            Projection::Payouts => Box::new(PayoutsFold::new()),
        }
    }

    /// The projections a CLI selection names: one, or all when `None`.
    pub fn select(name: Option<&str>) -> Result<Vec<Projection>, ProjectionError> {
        match name {
            None => Ok(Projection::ALL.to_vec()),
            Some(name) => Ok(vec![name.parse()?]),
        }
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Projection {
    type Err = ProjectionError;
    fn from_str(name: &str) -> Result<Projection, ProjectionError> {
        Projection::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| ProjectionError::UnknownProjection(name.to_owned()))
    }
}
