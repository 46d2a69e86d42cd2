//! The trial balance: every event's postings sum to zero, the whole ledger
//! sums to zero, every customer account's balance in the read models
//! equals the sum of its postings in the log, and no holder is scheduled or
//! paid beyond what they are owed (`entitlement`).

use crate::apply::Observer;
use crate::entitlement::{EntitlementCheck, EntitlementReport};
use crate::envelope::{Envelope, Fact};
use crate::error::ProjectionError;
use domain::posting::{LedgerAccount, is_balanced};
use std::collections::{BTreeMap, HashMap};

/// Sums of postings folded from the log.
#[derive(Debug, Default)]
pub struct PostingSums {
    until: i64,
    events_checked: u64,
    unbalanced: Vec<i64>,
    by_class: BTreeMap<&'static str, i128>,
    customers: HashMap<String, i128>,
    entitlements: EntitlementCheck,
}

impl PostingSums {
    /// Sums the postings of events up to `until`.
    pub fn until(until: i64) -> PostingSums {
        PostingSums {
            until,
            ..PostingSums::default()
        }
    }

    fn add(&mut self, envelope: &Envelope) {
        self.entitlements.add(envelope);
        let Fact::Account(event) = &envelope.fact else {
            return;
        };
        let postings = event.postings();
        self.events_checked += 1;
        if postings.is_empty() {
            return;
        }
        if !is_balanced(&postings) {
            self.unbalanced.push(envelope.position());
        }
        for posting in &postings {
            let class = match &posting.account {
                LedgerAccount::CustomerAvailable { account_id } => {
                    *self.customers.entry(account_id.to_string()).or_default() +=
                        posting.signed_minor();
                    "customer_available"
                }
                LedgerAccount::ProductFunding { .. } => "product_funding",
                LedgerAccount::ProductInterest { .. } => "product_interest",
                LedgerAccount::PlatformCash => "platform_cash",
            };
            *self.by_class.entry(class).or_default() += posting.signed_minor();
        }
    }
}

impl Observer for PostingSums {
    fn observe(&mut self, events: &[Envelope]) -> Result<(), ProjectionError> {
        let until = self.until;
        for envelope in events.iter().take_while(|e| e.position() <= until) {
            self.add(envelope);
        }
        Ok(())
    }
}

/// One customer account whose read-model balance disagrees with the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BalanceMismatch {
    /// The account.
    pub account_id: String,
    /// Sum of its postings in the log (credit positive).
    pub postings: i128,
    /// `available` in `account_balances` (absent if the row is missing).
    pub available: Option<i64>,
    /// Sum of its `ledger_entries`.
    pub entries: Option<i64>,
    /// Its last entry's `balance_after`.
    pub last_balance_after: Option<i64>,
}

/// A customer account's balances as the read models hold them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBalance {
    /// The account.
    pub account_id: String,
    /// `available`.
    pub available: i64,
    /// Sum of the account's ledger entries.
    pub entries: i64,
    /// The last entry's `balance_after`.
    pub last_balance_after: Option<i64>,
}

/// The trial balance's findings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrialBalance {
    /// The position the log was summed to (the accounts checkpoint).
    pub position: i64,
    /// Account events whose postings were checked.
    pub events_checked: u64,
    /// Positions of events whose postings do not sum to zero.
    pub unbalanced_events: Vec<i64>,
    /// Sum of postings per ledger account class.
    pub totals: BTreeMap<&'static str, i128>,
    /// Sum of every posting (must be zero).
    pub net: i128,
    /// Customer accounts whose balance disagrees with their postings.
    pub mismatches: Vec<BalanceMismatch>,
    /// Customer accounts compared.
    pub accounts_checked: usize,
    /// Payouts against what each holder is owed.
    pub entitlements: EntitlementReport,
}

impl TrialBalance {
    /// Whether everything balances.
    pub fn holds(&self) -> bool {
        self.unbalanced_events.is_empty()
            && self.net == 0
            && self.mismatches.is_empty()
            && self.entitlements.holds()
    }

    /// Compares the sums from the log with the stored balances.
    pub fn compare(sums: PostingSums, stored: Vec<StoredBalance>) -> TrialBalance {
        let mut mismatches = Vec::new();
        let mut customers = sums.customers;
        let accounts_checked = stored.len();
        for balance in stored {
            let postings = customers.remove(&balance.account_id).unwrap_or(0);
            let last = balance.last_balance_after.unwrap_or(0);
            let agrees = postings == i128::from(balance.available)
                && balance.entries == balance.available
                && last == balance.available;
            if !agrees {
                mismatches.push(BalanceMismatch {
                    account_id: balance.account_id,
                    postings,
                    available: Some(balance.available),
                    entries: Some(balance.entries),
                    last_balance_after: balance.last_balance_after,
                });
            }
        }
        // Accounts with postings in the log but no row in the read models.
        for (account_id, postings) in customers {
            mismatches.push(BalanceMismatch {
                account_id,
                postings,
                available: None,
                entries: None,
                last_balance_after: None,
            });
        }
        mismatches.sort_by(|a, b| a.account_id.cmp(&b.account_id));
        TrialBalance {
            position: sums.until,
            events_checked: sums.events_checked,
            unbalanced_events: sums.unbalanced,
            net: sums.by_class.values().sum(),
            totals: sums.by_class,
            mismatches,
            accounts_checked,
            entitlements: sums.entitlements.report(),
        }
    }
}
