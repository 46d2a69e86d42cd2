//! The oracle is itself tested: forged logs, written straight into a store
//! (memory and SQLite), each breaking one rule, each expected to be reported
//! by the audit under that rule's name at the position of the event that
//! broke it, and nothing else. A clean log beside them is reported clean, so
//! an oracle that reported everything would fail too.

use chrono::{DateTime, TimeZone, Utc};
use domain::account::AccountEvent;
use domain::payout::PayoutKind;
use domain::product::{ProductEvent, ProductTerms, RefusalReason, ReleaseReason};
use domain::{AccountId, Amount, Currency, EventType, OrderId, PayoutId, ProductId};
use engine::oracle::{Oracle, Rule};
use serde::Serialize;
use std::sync::Arc;
use store::model::{ExpectedVersion, Metadata};
use store::testing::TestSqlite;
use store::{EventStore, MemoryEventStore, codec};
use uuid::Uuid;

const QUOTA: i64 = 100;

fn amount(minor: i64) -> Amount {
    Amount::new(minor).expect("a valid amount")
}

fn expires() -> DateTime<Utc> {
    Utc.timestamp_opt(1_900_000_000, 0).unwrap()
}

fn product_id() -> ProductId {
    ProductId::parse("forged-bond").unwrap()
}

fn other_product() -> ProductId {
    ProductId::parse("other-bond").unwrap()
}

fn ghost_product() -> ProductId {
    ProductId::parse("ghost-bond").unwrap()
}

fn buyer(n: u128) -> AccountId {
    AccountId(Uuid::from_u128(0xA000 + n))
}

fn order(n: u128) -> OrderId {
    OrderId(Uuid::from_u128(0x0D00 + n))
}

/// One forged event, product or account.
#[derive(Clone)]
enum Forged {
    Product(ProductEvent),
    Account(AccountEvent),
    /// A product event in another product's stream.
    OtherProduct(ProductEvent),
    /// An account event in the stream of another account than it names.
    Stray(AccountId, AccountEvent),
}

/// A log being forged into a store, remembering each event's position.
struct Forge {
    store: Arc<dyn EventStore>,
}

impl Forge {
    async fn write(&self, event: &Forged) -> i64 {
        match event {
            Forged::Product(event) => self.append(&product_id().stream(), event).await,
            Forged::Account(event) => {
                let stream = account_of(event).stream();
                self.append(&stream, event).await
            }
            Forged::OtherProduct(event) => self.append(&other_product().stream(), event).await,
            Forged::Stray(owner, event) => self.append(&owner.stream(), event).await,
        }
    }

    async fn append<E: Serialize + EventType>(&self, stream: &str, event: &E) -> i64 {
        let new = codec::encode(event, Uuid::now_v7(), Metadata::default());
        self.store
            .append(stream, ExpectedVersion::Any, vec![new])
            .await
            .expect("forged event appended")
            .last_position
    }
}

fn account_of(event: &AccountEvent) -> AccountId {
    match event {
        AccountEvent::AccountOpened { account_id, .. }
        | AccountEvent::FundsDeposited { account_id, .. }
        | AccountEvent::PurchaseDebited { account_id, .. }
        | AccountEvent::PurchaseRefunded { account_id, .. }
        | AccountEvent::PayoutCredited { account_id, .. }
        | AccountEvent::FundsWithdrawn { account_id, .. } => *account_id,
    }
}

fn listed() -> Forged {
    Forged::Product(ProductEvent::ProductListed {
        product_id: product_id(),
        terms: ProductTerms {
            name: "Forged bond".into(),
            currency: Currency::CNY,
            quota: amount(QUOTA),
            min_purchase: amount(1),
            max_purchase: amount(QUOTA),
            annual_rate_bps: 500,
            term_days: 90,
        },
    })
}

fn opened() -> Forged {
    Forged::Product(ProductEvent::SaleOpened {})
}

fn closed() -> Forged {
    Forged::Product(ProductEvent::SaleClosed {})
}

fn reserve(n: u128, who: u128, units: i64) -> Forged {
    Forged::Product(ProductEvent::QuotaReserved {
        order_id: order(n),
        account_id: buyer(who),
        amount: amount(units),
        expires_at: expires(),
    })
}

fn confirm(n: u128, who: u128, units: i64) -> Forged {
    Forged::Product(ProductEvent::ReservationConfirmed {
        order_id: order(n),
        account_id: buyer(who),
        amount: amount(units),
    })
}

fn release(n: u128, who: u128, units: i64) -> Forged {
    Forged::Product(ProductEvent::ReservationReleased {
        order_id: order(n),
        account_id: buyer(who),
        amount: amount(units),
        reason: ReleaseReason::InsufficientFunds,
    })
}

fn refuse(n: u128, who: u128, units: i64, reason: RefusalReason) -> Forged {
    Forged::Product(ProductEvent::PurchaseRefused {
        order_id: order(n),
        account_id: buyer(who),
        amount: amount(units),
        reason,
    })
}

fn open_account(who: u128) -> Forged {
    Forged::Account(AccountEvent::AccountOpened {
        account_id: buyer(who),
        currency: Currency::CNY,
    })
}

fn deposit(who: u128, units: i64, reference: &str) -> Forged {
    Forged::Account(AccountEvent::FundsDeposited {
        account_id: buyer(who),
        amount: amount(units),
        reference: reference.into(),
    })
}

fn debit(n: u128, who: u128, units: i64) -> Forged {
    Forged::Account(AccountEvent::PurchaseDebited {
        account_id: buyer(who),
        order_id: order(n),
        product_id: product_id(),
        amount: amount(units),
    })
}

fn debit_of(n: u128, who: u128, units: i64, product_id: ProductId) -> Forged {
    Forged::Account(AccountEvent::PurchaseDebited {
        account_id: buyer(who),
        order_id: order(n),
        product_id,
        amount: amount(units),
    })
}

fn refund(n: u128, who: u128, units: i64) -> Forged {
    Forged::Account(AccountEvent::PurchaseRefunded {
        account_id: buyer(who),
        order_id: order(n),
        product_id: product_id(),
        amount: amount(units),
    })
}

fn payout(n: u128, who: u128, units: i64) -> Forged {
    Forged::Account(AccountEvent::PayoutCredited {
        account_id: buyer(who),
        payout_id: PayoutId(Uuid::from_u128(0xB000 + n)),
        product_id: product_id(),
        kind: PayoutKind::Interest,
        amount: amount(units),
    })
}

fn withdraw(who: u128, units: i64, reference: &str) -> Forged {
    Forged::Account(AccountEvent::FundsWithdrawn {
        account_id: buyer(who),
        amount: amount(units),
        reference: reference.into(),
    })
}

/// A listed, open product and two funded buyers (1 with 100, 2 with 50).
fn setting() -> Vec<Forged> {
    vec![
        listed(),
        opened(),
        open_account(1),
        deposit(1, 100, "d-1"),
        open_account(2),
        deposit(2, 50, "d-2"),
    ]
}

/// Which check a case expects its violations from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    /// At every position.
    Always,
    /// Once every reservation is resolved.
    Settled,
}

/// A forged log: the events after the setting, and the violations expected,
/// each as (rule, index into `events` of the event that broke it; `None`
/// for the last position of the log).
struct Case {
    name: &'static str,
    events: Vec<Forged>,
    when: When,
    expected: Vec<(Rule, Option<usize>)>,
}

fn cases() -> Vec<Case> {
    use Rule::*;
    use When::*;
    vec![
        Case {
            name: "clean: bought, refused, released and refunded, paid out, withdrawn",
            events: vec![
                reserve(1, 1, 60),
                debit(1, 1, 60),
                confirm(1, 1, 60),
                refuse(2, 2, 50, RefusalReason::InsufficientQuota),
                reserve(3, 2, 40),
                debit(3, 2, 40),
                release(3, 2, 40),
                refund(3, 2, 40),
                reserve(4, 2, 40),
                debit(4, 2, 40),
                confirm(4, 2, 40),
                refuse(5, 2, 1, RefusalReason::SoldOut),
                payout(1, 1, 7),
                withdraw(1, 47, "w-1"),
                closed(),
                refuse(6, 1, 1, RefusalReason::SaleNotOpen),
            ],
            when: Settled,
            expected: vec![],
        },
        Case {
            name: "oversold",
            events: vec![reserve(1, 1, 60), reserve(2, 2, 50)],
            when: Always,
            expected: vec![(Oversold, Some(1))],
        },
        Case {
            name: "oversold by a confirmed order and a pending one",
            events: vec![
                reserve(1, 1, 100),
                debit(1, 1, 100),
                confirm(1, 1, 100),
                reserve(2, 2, 1),
            ],
            when: Always,
            expected: vec![(Oversold, Some(3))],
        },
        Case {
            name: "undersold: refused for want of quota with enough left",
            events: vec![
                reserve(1, 1, 60),
                refuse(2, 2, 40, RefusalReason::InsufficientQuota),
            ],
            when: Always,
            expected: vec![(Undersold, Some(1))],
        },
        Case {
            name: "undersold: refused as sold out before everything was confirmed",
            events: vec![reserve(1, 1, 100), refuse(2, 2, 1, RefusalReason::SoldOut)],
            when: Always,
            expected: vec![(Undersold, Some(1))],
        },
        Case {
            name: "confirmed twice",
            events: vec![
                reserve(1, 1, 60),
                debit(1, 1, 60),
                confirm(1, 1, 60),
                confirm(1, 1, 60),
            ],
            when: Always,
            expected: vec![(ConfirmedTwice, Some(3))],
        },
        Case {
            name: "released after confirmation",
            events: vec![
                reserve(1, 1, 60),
                debit(1, 1, 60),
                confirm(1, 1, 60),
                release(1, 1, 60),
            ],
            when: Always,
            expected: vec![(SettledTwice, Some(3))],
        },
        Case {
            name: "confirmation of an order never reserved",
            events: vec![confirm(1, 1, 60)],
            when: Always,
            expected: vec![(UnknownReservation, Some(0))],
        },
        Case {
            name: "confirmation for another amount",
            events: vec![reserve(1, 1, 60), debit(1, 1, 60), confirm(1, 1, 59)],
            when: Always,
            expected: vec![(SettlementMismatch, Some(2))],
        },
        Case {
            name: "reserved twice",
            events: vec![reserve(1, 1, 10), reserve(1, 1, 10)],
            when: Always,
            expected: vec![(ReservedTwice, Some(1))],
        },
        Case {
            name: "refused after its reservation",
            events: vec![
                reserve(1, 1, 10),
                refuse(1, 1, 10, RefusalReason::SaleNotOpen),
            ],
            when: Always,
            expected: vec![(ReservedTwice, Some(1))],
        },
        Case {
            name: "reserved while closed",
            events: vec![closed(), reserve(1, 1, 10)],
            when: Always,
            expected: vec![(ReservedWhileClosed, Some(1))],
        },
        Case {
            name: "reservation above the maximum purchase",
            events: vec![reserve(1, 1, QUOTA + 1)],
            when: Always,
            expected: vec![(Oversold, Some(0)), (ReservationOutOfRange, Some(0))],
        },
        Case {
            name: "listed twice",
            events: vec![listed()],
            when: Always,
            expected: vec![(NotListedOnce, Some(0))],
        },
        Case {
            name: "a product event before its listing",
            events: vec![Forged::OtherProduct(ProductEvent::SaleOpened {})],
            when: Always,
            expected: vec![(NotListedOnce, Some(0))],
        },
        Case {
            name: "account opened twice",
            events: vec![open_account(1)],
            when: Always,
            expected: vec![(NotOpenedOnce, Some(0))],
        },
        Case {
            name: "deposit before the account was opened",
            events: vec![deposit(3, 10, "d-3")],
            when: Always,
            expected: vec![(NotOpenedOnce, Some(0))],
        },
        Case {
            name: "confirmation without a debit",
            events: vec![reserve(1, 1, 60), confirm(1, 1, 60)],
            when: Always,
            expected: vec![(ConfirmedWithoutDebit, Some(1))],
        },
        Case {
            name: "confirmation after the debit was refunded",
            events: vec![
                reserve(1, 1, 60),
                debit(1, 1, 60),
                refund(1, 1, 60),
                confirm(1, 1, 60),
            ],
            when: Always,
            expected: vec![(ConfirmedWithoutDebit, Some(3))],
        },
        Case {
            name: "confirmation paid by another buyer",
            events: vec![reserve(1, 1, 40), debit(1, 2, 40), confirm(1, 1, 40)],
            when: Always,
            expected: vec![(DebitMismatch, Some(1)), (ConfirmedWithoutDebit, Some(2))],
        },
        Case {
            name: "debit without a reservation",
            events: vec![debit(1, 1, 60)],
            when: Always,
            expected: vec![(DebitWithoutReservation, Some(0))],
        },
        Case {
            name: "debit without confirmation",
            events: vec![reserve(1, 1, 60), debit(1, 1, 60)],
            when: Settled,
            expected: vec![
                (StillPending, Some(0)),
                (DebitWithoutConfirmation, Some(1)),
                (MoneyNotConserved, None),
            ],
        },
        Case {
            name: "debited twice",
            events: vec![
                reserve(1, 1, 30),
                debit(1, 1, 30),
                debit(1, 1, 30),
                confirm(1, 1, 30),
            ],
            when: Always,
            expected: vec![(DebitedTwice, Some(2))],
        },
        Case {
            name: "a refund missing",
            events: vec![reserve(1, 1, 60), debit(1, 1, 60), release(1, 1, 60)],
            when: Settled,
            expected: vec![(RefundMissing, Some(1)), (MoneyNotConserved, None)],
        },
        Case {
            name: "a refund of an order never debited",
            events: vec![reserve(1, 1, 60), release(1, 1, 60), refund(1, 1, 60)],
            when: Always,
            expected: vec![(RefundWithoutDebit, Some(2))],
        },
        Case {
            name: "refunded twice",
            events: vec![
                reserve(1, 1, 60),
                debit(1, 1, 60),
                release(1, 1, 60),
                refund(1, 1, 60),
                refund(1, 1, 60),
            ],
            when: Always,
            expected: vec![(RefundWithoutDebit, Some(4))],
        },
        Case {
            name: "a confirmed order refunded",
            events: vec![
                reserve(1, 1, 60),
                debit(1, 1, 60),
                confirm(1, 1, 60),
                refund(1, 1, 60),
            ],
            when: Settled,
            expected: vec![(RefundOfConfirmed, Some(3)), (MoneyNotConserved, None)],
        },
        Case {
            name: "a negative balance from a debit",
            events: vec![reserve(1, 2, 60), debit(1, 2, 60), confirm(1, 2, 60)],
            when: Always,
            expected: vec![(NegativeBalance, Some(1))],
        },
        Case {
            name: "a negative balance from a withdrawal",
            events: vec![withdraw(2, 51, "w-2")],
            when: Always,
            expected: vec![(NegativeBalance, Some(0))],
        },
        Case {
            name: "a payout credited twice",
            events: vec![payout(1, 1, 5), payout(1, 1, 5)],
            when: Always,
            expected: vec![(PayoutCreditedTwice, Some(1))],
        },
        Case {
            name: "a balance beyond what an amount holds",
            events: vec![
                open_account(3),
                deposit(3, i64::MAX, "d-3"),
                deposit(3, 1, "d-4"),
            ],
            when: Always,
            expected: vec![(BalanceOverflow, Some(2))],
        },
        Case {
            name: "a deposit of nothing: postings of zero are no entry",
            events: vec![deposit(1, 0, "d-0")],
            when: Always,
            expected: vec![(UnbalancedPostings, Some(0))],
        },
        Case {
            name: "a reservation below the minimum purchase",
            events: vec![reserve(1, 1, 0)],
            when: Always,
            expected: vec![(ReservationOutOfRange, Some(0))],
        },
        Case {
            name: "a confirmation in another product's stream",
            events: vec![
                Forged::OtherProduct(match listed() {
                    Forged::Product(ProductEvent::ProductListed { terms, .. }) => {
                        ProductEvent::ProductListed {
                            product_id: other_product(),
                            terms,
                        }
                    }
                    _ => unreachable!("listed() lists"),
                }),
                reserve(1, 1, 60),
                debit(1, 1, 60),
                Forged::OtherProduct(ProductEvent::ReservationConfirmed {
                    order_id: order(1),
                    account_id: buyer(1),
                    amount: amount(60),
                }),
            ],
            when: Always,
            expected: vec![(UnknownReservation, Some(3))],
        },
        Case {
            name: "a debit of another amount than reserved",
            events: vec![reserve(1, 1, 60), debit(1, 1, 50)],
            when: Always,
            expected: vec![(DebitMismatch, Some(1))],
        },
        Case {
            name: "a debit for another product than reserved",
            events: vec![reserve(1, 1, 60), debit_of(1, 1, 60, other_product())],
            when: Always,
            expected: vec![(DebitMismatch, Some(1))],
        },
        Case {
            name: "money taken for a product never listed",
            events: vec![debit_of(1, 1, 60, ghost_product())],
            when: Settled,
            expected: vec![
                (DebitWithoutReservation, Some(0)),
                (DebitWithoutConfirmation, Some(0)),
                (MoneyNotConserved, None),
            ],
        },
        Case {
            name: "a refund of another amount than debited",
            events: vec![
                reserve(1, 1, 60),
                debit(1, 1, 60),
                release(1, 1, 60),
                refund(1, 1, 50),
            ],
            when: Always,
            expected: vec![(RefundWithoutDebit, Some(3))],
        },
        Case {
            name: "a refund to another buyer than the one debited",
            events: vec![
                reserve(1, 1, 60),
                debit(1, 1, 60),
                release(1, 1, 60),
                refund(1, 2, 60),
            ],
            when: Always,
            expected: vec![(RefundWithoutDebit, Some(3))],
        },
        Case {
            name: "an account's event in another account's stream",
            events: vec![Forged::Stray(
                buyer(2),
                match deposit(1, 5, "d-9") {
                    Forged::Account(event) => event,
                    _ => unreachable!("deposit() is an account event"),
                },
            )],
            when: Always,
            expected: vec![(NotOpenedOnce, Some(0))],
        },
        Case {
            name: "one payout credited to two holders",
            events: vec![payout(1, 1, 5), payout(1, 2, 5)],
            when: Always,
            expected: vec![(PayoutCreditedTwice, Some(1))],
        },
    ]
}

/// Forges every case into a fresh store from `fresh` and audits it.
async fn check_cases<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Arc<dyn EventStore>, Box<dyn std::any::Any>)>,
{
    for case in cases() {
        let (store, _keep) = fresh().await;
        let forge = Forge {
            store: store.clone(),
        };
        for event in setting() {
            forge.write(&event).await;
        }
        let mut positions = Vec::new();
        for event in &case.events {
            positions.push(forge.write(event).await);
        }
        let head = store.head().await.expect("head");
        let audit = engine::audit::audit(store.as_ref())
            .await
            .expect("the forged log is readable");
        let found = match case.when {
            When::Always => audit.always_violations(),
            When::Settled => audit.settled_violations(),
        };
        let mut found: Vec<(Rule, i64)> = found.iter().map(|v| (v.rule, v.position)).collect();
        let mut expected: Vec<(Rule, i64)> = case
            .expected
            .iter()
            .map(|(rule, index)| (*rule, index.map_or(head, |index| positions[index])))
            .collect();
        found.sort();
        expected.sort();
        assert_eq!(
            found,
            expected,
            "{}: {:#?}",
            case.name,
            audit.settled_violations()
        );
        if case.when == When::Always && !case.expected.is_empty() {
            // An always-rule broken is broken for the settled check too.
            let settled = audit.settled_violations();
            for (rule, position) in &expected {
                assert!(
                    settled
                        .iter()
                        .any(|v| v.rule == *rule && v.position == *position),
                    "{}: {rule} not among the settled violations {settled:#?}",
                    case.name
                );
            }
        }
    }
}

#[tokio::test]
async fn forged_logs_are_reported_by_rule_and_position_in_memory() {
    check_cases(|| async {
        let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
        (store, Box::new(()) as Box<dyn std::any::Any>)
    })
    .await;
}

#[tokio::test]
async fn forged_logs_are_reported_by_rule_and_position_on_sqlite() {
    check_cases(|| async {
        let test = TestSqlite::create().await.expect("sqlite");
        let store: Arc<dyn EventStore> = Arc::new(test.store.clone());
        (store, Box::new(test) as Box<dyn std::any::Any>)
    })
    .await;
}

#[tokio::test]
async fn a_broken_stream_is_reported_not_folded() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let forge = Forge {
        store: store.clone(),
    };
    for event in setting() {
        forge.write(&event).await;
    }
    // `evolve` would panic on the second reservation (over-reserved): the
    // audit reports it instead, and stops folding the product stream only.
    forge.write(&reserve(1, 1, 60)).await;
    forge.write(&reserve(2, 2, 50)).await;
    // Sound events after the break are not folded either.
    forge.write(&release(2, 2, 50)).await;
    // The same for an account: overdrawn, then a deposit.
    forge.write(&withdraw(2, 51, "w-2")).await;
    forge.write(&deposit(2, 10, "d-5")).await;
    let audit = engine::audit::audit(store.as_ref()).await.expect("audit");
    assert!(audit.sale(&product_id()).is_none());
    assert!(audit.broken.contains(&product_id().stream()));
    assert!(audit.broken.contains(&buyer(2).stream()));
    assert!(!audit.accounts.contains_key(&buyer(2).stream()));
    assert!(audit.accounts.contains_key(&buyer(1).stream()));
    assert_eq!(audit.oracle.held(&product_id()), 60);
    assert_eq!(audit.oracle.held_peak(&product_id()), 110);
}

#[test]
fn the_oracle_counts_from_the_events() {
    let mut oracle = Oracle::new();
    let stream = product_id().stream();
    let mut position = 0;
    let feed = |oracle: &mut Oracle, position: &mut i64, event: Forged| {
        *position += 1;
        match event {
            Forged::Product(event) => oracle.observe_product(*position, &stream, &event),
            Forged::Account(event) => {
                oracle.observe_account(*position, &account_of(&event).stream(), &event)
            }
            Forged::OtherProduct(_) | Forged::Stray(..) => unreachable!("not fed here"),
        }
    };
    for event in setting() {
        assert!(!feed(&mut oracle, &mut position, event));
    }
    for event in [
        reserve(1, 1, 60),
        debit(1, 1, 60),
        confirm(1, 1, 60),
        reserve(2, 2, 30),
        debit(2, 2, 30),
        release(2, 2, 30),
        refund(2, 2, 30),
        reserve(3, 2, 25),
    ] {
        assert!(!feed(&mut oracle, &mut position, event));
    }
    assert_eq!(oracle.quota(&product_id()), QUOTA);
    assert_eq!(oracle.confirmed(&product_id()), 60);
    assert_eq!(oracle.held(&product_id()), 85);
    assert_eq!(oracle.held_peak(&product_id()), 90);
    assert_eq!(oracle.confirmed_orders(&product_id()), 1);
    assert_eq!(oracle.head(), position);
    assert!(
        feed(&mut oracle, &mut position, reserve(4, 1, 16)),
        "oversold by one"
    );
    assert!(
        oracle.always_violations()[0]
            .to_string()
            .starts_with(&format!("oversold at position {position} ({stream}): "))
    );
    let unknown = ProductId::parse("unknown").unwrap();
    assert_eq!(oracle.quota(&unknown), 0);
    assert_eq!(oracle.confirmed(&unknown), 0);
    assert_eq!(oracle.held(&unknown), 0);
    assert_eq!(oracle.held_peak(&unknown), 0);
}

#[tokio::test]
async fn a_clean_log_is_folded_for_look_ups() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let forge = Forge {
        store: store.clone(),
    };
    let clean = cases().remove(0);
    assert!(clean.expected.is_empty(), "the first case is the clean one");
    let events: Vec<Forged> = setting().into_iter().chain(clean.events).collect();
    for event in &events {
        forge.write(event).await;
    }
    let audit = engine::audit::audit(store.as_ref()).await.expect("audit");
    assert_eq!(audit.events, events.len() as u64);
    assert!(audit.broken.is_empty());
    let sale = audit.sale(&product_id()).expect("listed");
    assert_eq!(sale.confirmed.minor(), QUOTA);
    assert_eq!(audit.oracle.confirmed_orders(&product_id()), 2);
    assert_eq!(audit.oracle.confirmed(&product_id()), QUOTA);
    assert_eq!(
        audit.reservation(&order(1)),
        Some(domain::product::ReservationState::Confirmed)
    );
    assert_eq!(
        audit.reservation(&order(3)),
        Some(domain::product::ReservationState::Released)
    );
    assert_eq!(
        audit.reservation(&order(2)),
        None,
        "refused, never reserved"
    );
    let account = audit.accounts[&buyer(1).stream()]
        .account
        .as_ref()
        .expect("opened");
    assert_eq!(account.available.minor(), 0);
    assert!(audit.always_violations().is_empty());
    assert!(audit.settled_violations().is_empty());
}
