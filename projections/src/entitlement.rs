//! The entitlement oracle: from the raw events alone, no holder is ever
//! scheduled or paid more than the product owes them (their confirmed
//! principal, once; interest at the product's rate for at most its term),
//! and every payout credit answers exactly one succeeded payout.
//!
//! It recomputes what is owed from the product listings and confirmations
//! itself (it never reads the deciders' plan of runs), so a scheduler that
//! forgot the plan, or a log forged to pay twice, is caught here.

use crate::envelope::{Envelope, Fact};
use domain::account::AccountEvent;
use domain::payout::{INTEREST_DENOMINATOR, PayoutEvent, PayoutKind, ProviderFinding};
use domain::product::ProductEvent;
use std::collections::HashMap;

/// Most violations kept (the count is always exact).
const VIOLATIONS_KEPT_MAX: usize = 100;

/// A broken entitlement rule, where it broke.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EntitlementViolation {
    /// Which rule: `scheduled_beyond_entitlement`, `paid_beyond_entitlement`,
    /// `credited_twice`, `credited_without_success`, `credit_amount_differs`.
    pub rule: &'static str,
    /// The event that broke it.
    pub position: i64,
    /// The product.
    pub product_id: String,
    /// The holder.
    pub account_id: String,
    /// The payout concerned.
    pub payout_id: String,
    /// Figures.
    pub detail: String,
}

#[derive(Debug, Default)]
struct Terms {
    annual_rate_bps: u32,
    term_days: u32,
}

#[derive(Debug)]
struct PayoutSeen {
    product_id: String,
    account_id: String,
    kind: PayoutKind,
    amount: i64,
    succeeded: bool,
    credited: bool,
}

/// The fold of the oracle.
#[derive(Debug, Default)]
pub struct EntitlementCheck {
    terms: HashMap<String, Terms>,
    /// Confirmed principal per (product, holder).
    principal: HashMap<(String, String), i128>,
    /// Scheduled per (product, holder, kind).
    scheduled: HashMap<(String, String, PayoutKind), i128>,
    /// Credited per (product, holder, kind).
    credited: HashMap<(String, String, PayoutKind), i128>,
    payouts: HashMap<String, PayoutSeen>,
    violations: Vec<EntitlementViolation>,
    violation_count: u64,
}

/// What the oracle found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EntitlementReport {
    /// Payouts seen.
    pub payouts_checked: u64,
    /// Broken rules (the first `VIOLATIONS_KEPT_MAX`).
    pub violations: Vec<EntitlementViolation>,
    /// Every broken rule counted.
    pub violation_count: u64,
    /// Succeeded payouts whose credit is not in the log yet (the worker
    /// credits after the success; zero once payouts are quiet).
    pub awaiting_credit: u64,
}

impl EntitlementReport {
    /// No rule broken.
    pub fn holds(&self) -> bool {
        self.violation_count == 0
    }
}

impl EntitlementCheck {
    /// An empty fold.
    pub fn new() -> EntitlementCheck {
        EntitlementCheck::default()
    }

    /// What a holder is owed of a product, by kind, from the raw figures.
    fn owed(&self, product_id: &str, account_id: &str, kind: PayoutKind) -> i128 {
        let principal = self
            .principal
            .get(&(product_id.to_owned(), account_id.to_owned()))
            .copied()
            .unwrap_or(0);
        match kind {
            PayoutKind::Principal => principal,
            PayoutKind::Interest => {
                let Some(terms) = self.terms.get(product_id) else {
                    return 0;
                };
                // principal × rate × days / (365 × 10,000), rounded down:
                // the most any split of the term into runs can pay.
                let denominator = INTEREST_DENOMINATOR as i128;
                principal * i128::from(terms.annual_rate_bps) * i128::from(terms.term_days)
                    / denominator
            }
        }
    }

    fn violate(&mut self, violation: EntitlementViolation) {
        self.violation_count += 1;
        if self.violations.len() < VIOLATIONS_KEPT_MAX {
            self.violations.push(violation);
        }
    }

    /// Folds one event.
    pub fn add(&mut self, envelope: &Envelope) {
        let position = envelope.position();
        match &envelope.fact {
            Fact::Product(product_id, ProductEvent::ProductListed { terms, .. }) => {
                self.terms.insert(
                    product_id.to_string(),
                    Terms {
                        annual_rate_bps: terms.annual_rate_bps,
                        term_days: terms.term_days,
                    },
                );
            }
            Fact::Product(
                product_id,
                ProductEvent::ReservationConfirmed {
                    account_id, amount, ..
                },
            ) => {
                *self
                    .principal
                    .entry((product_id.to_string(), account_id.to_string()))
                    .or_default() += i128::from(amount.minor());
            }
            Fact::Payout(payout_id, event) => {
                self.add_payout(position, payout_id.to_string(), event)
            }
            Fact::Account(AccountEvent::PayoutCredited {
                account_id,
                payout_id,
                product_id,
                kind,
                amount,
            }) => self.add_credit(
                position,
                payout_id.to_string(),
                (product_id.to_string(), account_id.to_string(), *kind),
                amount.minor(),
            ),
            _ => {}
        }
    }

    fn add_payout(&mut self, position: i64, payout_id: String, event: &PayoutEvent) {
        match event {
            PayoutEvent::PayoutScheduled {
                product_id,
                account_id,
                kind,
                amount,
                ..
            } => {
                let key = (product_id.to_string(), account_id.to_string(), *kind);
                let total = self.scheduled.entry(key.clone()).or_default();
                *total += i128::from(amount.minor());
                let total = *total;
                let owed = self.owed(&key.0, &key.1, *kind);
                if total > owed {
                    self.violate(EntitlementViolation {
                        rule: "scheduled_beyond_entitlement",
                        position,
                        product_id: key.0.clone(),
                        account_id: key.1.clone(),
                        payout_id: payout_id.clone(),
                        detail: format!("{kind:?} scheduled {total}, owed {owed}"),
                    });
                }
                self.payouts.insert(
                    payout_id,
                    PayoutSeen {
                        product_id: key.0,
                        account_id: key.1,
                        kind: *kind,
                        amount: amount.minor(),
                        succeeded: false,
                        credited: false,
                    },
                );
            }
            PayoutEvent::PayoutSucceeded { .. }
            | PayoutEvent::PayoutReconciled {
                finding: ProviderFinding::Paid { .. },
            } => {
                if let Some(seen) = self.payouts.get_mut(&payout_id) {
                    seen.succeeded = true;
                }
            }
            _ => {}
        }
    }

    fn add_credit(
        &mut self,
        position: i64,
        payout_id: String,
        key: (String, String, PayoutKind),
        amount: i64,
    ) {
        let violation = |rule: &'static str, detail: String| EntitlementViolation {
            rule,
            position,
            product_id: key.0.clone(),
            account_id: key.1.clone(),
            payout_id: payout_id.clone(),
            detail,
        };
        let mut found = Vec::new();
        match self.payouts.get_mut(&payout_id) {
            None => found.push(violation(
                "credited_without_success",
                "no such payout was scheduled".into(),
            )),
            Some(seen) => {
                if !seen.succeeded {
                    found.push(violation(
                        "credited_without_success",
                        "the payout had not succeeded".into(),
                    ));
                }
                if seen.credited {
                    found.push(violation("credited_twice", format!("{amount} again")));
                }
                let same = (seen.amount, &seen.product_id, &seen.account_id, seen.kind)
                    == (amount, &key.0, &key.1, key.2);
                if !same {
                    found.push(violation(
                        "credit_amount_differs",
                        format!(
                            "credited {amount} {:?}, payout is {} {:?}",
                            key.2, seen.amount, seen.kind
                        ),
                    ));
                }
                seen.credited = true;
            }
        }
        let total = self.credited.entry(key.clone()).or_default();
        *total += i128::from(amount);
        let total = *total;
        let owed = self.owed(&key.0, &key.1, key.2);
        if total > owed {
            found.push(violation(
                "paid_beyond_entitlement",
                format!("{:?} credited {total}, owed {owed}", key.2),
            ));
        }
        for violation in found {
            self.violate(violation);
        }
    }

    /// The findings so far.
    pub fn report(&self) -> EntitlementReport {
        EntitlementReport {
            payouts_checked: self.payouts.len() as u64,
            violations: self.violations.clone(),
            violation_count: self.violation_count,
            awaiting_credit: self
                .payouts
                .values()
                .filter(|p| p.succeeded && !p.credited)
                .count() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The oracle against forged logs: each breaks one rule and must be
    //! reported by name and position; an honest log reports nothing.

    use super::*;
    use domain::payout::PayoutEvent;
    use domain::product::ProductTerms;
    use domain::{AccountId, Amount, Currency, OrderId, PayoutId, ProductId};
    use store::{Metadata, RecordedEvent};
    use uuid::Uuid;

    fn envelope(position: i64, fact: Fact) -> Envelope {
        Envelope {
            recorded: RecordedEvent {
                position,
                stream_id: String::new(),
                version: 1,
                event_id: Uuid::from_u128(position as u128),
                event_type: String::new(),
                schema_version: 1,
                data: serde_json::Value::Null,
                metadata: Metadata::default(),
                recorded_at: chrono::DateTime::UNIX_EPOCH,
                hash: None,
            },
            fact,
            occurred_at: String::new(),
        }
    }

    fn amount(minor: i64) -> Amount {
        Amount::new(minor).unwrap()
    }

    fn product() -> ProductId {
        ProductId::parse("p1").unwrap()
    }

    fn holder() -> AccountId {
        AccountId(Uuid::from_u128(1))
    }

    fn payout(n: u128) -> PayoutId {
        PayoutId(Uuid::from_u128(1_000 + n))
    }

    /// Listed at 365 bps for 90 days; holder 1 bought 10,000 (owed 10,000
    /// of principal and 90 of interest).
    fn sold() -> Vec<Envelope> {
        vec![
            envelope(
                1,
                Fact::Product(
                    product(),
                    ProductEvent::ProductListed {
                        product_id: product(),
                        terms: ProductTerms {
                            name: "p".into(),
                            currency: Currency::CNY,
                            quota: amount(100_000),
                            min_purchase: amount(1),
                            max_purchase: amount(100_000),
                            annual_rate_bps: 365,
                            term_days: 90,
                        },
                    },
                ),
            ),
            envelope(
                2,
                Fact::Product(
                    product(),
                    ProductEvent::ReservationConfirmed {
                        order_id: OrderId(Uuid::from_u128(7)),
                        account_id: holder(),
                        amount: amount(10_000),
                    },
                ),
            ),
        ]
    }

    fn scheduled(position: i64, n: u128, kind: PayoutKind, minor: i64) -> Envelope {
        envelope(
            position,
            Fact::Payout(
                payout(n),
                PayoutEvent::PayoutScheduled {
                    payout_id: payout(n),
                    product_id: product(),
                    account_id: holder(),
                    period: format!("run-{n}"),
                    kind,
                    amount: amount(minor),
                    currency: Currency::CNY,
                },
            ),
        )
    }

    fn succeeded(position: i64, n: u128) -> Envelope {
        envelope(
            position,
            Fact::Payout(
                payout(n),
                PayoutEvent::PayoutSucceeded {
                    provider_ref: format!("ref-{n}"),
                },
            ),
        )
    }

    fn credited(position: i64, n: u128, kind: PayoutKind, minor: i64) -> Envelope {
        envelope(
            position,
            Fact::Account(AccountEvent::PayoutCredited {
                account_id: holder(),
                payout_id: payout(n),
                product_id: product(),
                kind,
                amount: amount(minor),
            }),
        )
    }

    fn check(log: &[Envelope]) -> EntitlementReport {
        let mut check = EntitlementCheck::new();
        for envelope in log {
            check.add(envelope);
        }
        check.report()
    }

    fn only(report: &EntitlementReport) -> (&'static str, i64) {
        assert_eq!(report.violation_count, 1, "{report:?}");
        (report.violations[0].rule, report.violations[0].position)
    }

    /// Principal paid once and the whole term's interest in two runs.
    fn honest() -> Vec<Envelope> {
        let mut log = sold();
        log.extend([
            scheduled(3, 1, PayoutKind::Principal, 10_000),
            scheduled(4, 2, PayoutKind::Interest, 30),
            scheduled(5, 3, PayoutKind::Interest, 60),
            succeeded(6, 1),
            succeeded(7, 2),
            succeeded(8, 3),
            credited(9, 1, PayoutKind::Principal, 10_000),
            credited(10, 2, PayoutKind::Interest, 30),
            credited(11, 3, PayoutKind::Interest, 60),
        ]);
        log
    }

    #[test]
    fn an_honest_log_breaks_nothing() {
        let report = check(&honest());
        assert!(report.holds(), "{report:?}");
        assert_eq!((report.payouts_checked, report.awaiting_credit), (3, 0));
    }

    #[test]
    fn principal_scheduled_twice_under_two_labels_is_named() {
        let mut log = sold();
        log.push(scheduled(3, 1, PayoutKind::Principal, 10_000));
        log.push(scheduled(4, 2, PayoutKind::Principal, 10_000));
        assert_eq!(only(&check(&log)), ("scheduled_beyond_entitlement", 4));
    }

    #[test]
    fn interest_beyond_the_term_is_named() {
        let mut log = sold();
        log.push(scheduled(3, 1, PayoutKind::Interest, 90));
        log.push(scheduled(4, 2, PayoutKind::Interest, 1));
        assert_eq!(only(&check(&log)), ("scheduled_beyond_entitlement", 4));
    }

    #[test]
    fn a_payout_credited_twice_is_named() {
        let mut log = honest();
        log.push(credited(12, 2, PayoutKind::Interest, 30));
        let report = check(&log);
        let rules: Vec<_> = report
            .violations
            .iter()
            .map(|v| (v.rule, v.position))
            .collect();
        // Twice, and the second credit also pays beyond the entitlement.
        assert_eq!(
            rules,
            vec![("credited_twice", 12), ("paid_beyond_entitlement", 12)]
        );
    }

    #[test]
    fn a_credit_without_a_success_is_named() {
        let mut log = sold();
        log.push(scheduled(3, 1, PayoutKind::Interest, 30));
        log.push(credited(4, 1, PayoutKind::Interest, 30));
        assert_eq!(only(&check(&log)), ("credited_without_success", 4));
        let mut log = sold();
        log.push(credited(3, 9, PayoutKind::Interest, 30));
        assert_eq!(only(&check(&log)), ("credited_without_success", 3));
    }

    #[test]
    fn a_credit_of_another_amount_is_named() {
        let mut log = sold();
        log.push(scheduled(3, 1, PayoutKind::Interest, 30));
        log.push(succeeded(4, 1));
        log.push(credited(5, 1, PayoutKind::Interest, 31));
        assert_eq!(only(&check(&log)), ("credit_amount_differs", 5));
    }

    #[test]
    fn a_success_not_yet_credited_is_counted_not_a_violation() {
        let mut log = sold();
        log.push(scheduled(3, 1, PayoutKind::Interest, 30));
        log.push(succeeded(4, 1));
        let report = check(&log);
        assert!(report.holds());
        assert_eq!(report.awaiting_credit, 1);
    }

    #[test]
    fn a_payout_for_someone_who_holds_nothing_is_named() {
        let mut log = sold();
        log.push(envelope(
            3,
            Fact::Payout(
                payout(1),
                PayoutEvent::PayoutScheduled {
                    payout_id: payout(1),
                    product_id: product(),
                    account_id: AccountId(Uuid::from_u128(99)),
                    period: "x".into(),
                    kind: PayoutKind::Interest,
                    amount: amount(1),
                    currency: Currency::CNY,
                },
            ),
        ));
        assert_eq!(only(&check(&log)), ("scheduled_beyond_entitlement", 3));
    }
}
