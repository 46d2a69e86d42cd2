//! Property tests: for any sequence of commands, the accepted ones keep every
//! invariant, and replaying the events from scratch gives the same state as
//! applying them one by one.

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::account::{AccountCommand, AccountEvent, AccountState, CustomerAccount};
use domain::payout::{
    PAYOUT_ATTEMPTS_MAX, Payout, PayoutCommand, PayoutEvent, PayoutKind, PayoutStatus,
    ProviderFinding,
};
use domain::posting::{LedgerAccount, is_balanced};
use domain::product::{
    ProductCommand, ProductEvent, ProductSale, ProductState, ProductTerms, ReleaseReason,
    ReservationState,
};
use domain::{AccountId, Amount, Currency, Decider, EventType, OrderId, PayoutId, ProductId};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

fn start() -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 0).unwrap()
}

fn amount(minor: i64) -> Amount {
    Amount::new(minor).unwrap()
}

/// Runs `steps` against a decider: each step yields a command (or advances the
/// clock); accepted events are applied at once and `check` runs after each.
fn run<D: Decider>(
    steps: impl IntoIterator<Item = Step<D::Command>>,
    mut check: impl FnMut(&D::State, &D::Event),
) -> (D::State, Vec<D::Event>) {
    let mut state = D::State::default();
    let mut now = start();
    let mut history = Vec::new();
    for step in steps {
        let command = match step {
            Step::Advance(seconds) => {
                now += Duration::seconds(seconds);
                continue;
            }
            Step::Command(command) => command,
        };
        let Ok(events) = D::decide(&state, &command, now) else {
            continue;
        };
        for event in events {
            state = D::evolve(state, &event);
            check(&state, &event);
            history.push(event);
        }
    }
    (state, history)
}

#[derive(Debug, Clone)]
enum Step<C> {
    Command(C),
    Advance(i64),
}

/// The event survives serde, and its `type` tag is its stable event type.
fn assert_round_trip<E: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + EventType>(
    event: &E,
) {
    let json = serde_json::to_value(event).unwrap();
    assert_eq!(
        json["type"],
        event.event_type(),
        "serde tag and event type differ"
    );
    assert_eq!(&serde_json::from_value::<E>(json).unwrap(), event);
}

fn product_steps() -> impl Strategy<Value = (i64, Vec<Step<ProductCommand>>)> {
    let order = 0u128..24;
    let reason = prop_oneof![
        Just(ReleaseReason::InsufficientFunds),
        Just(ReleaseReason::PaymentFailed),
        Just(ReleaseReason::Cancelled),
    ];
    let step = prop_oneof![
        1 => Just(Step::Command(ProductCommand::Open)),
        1 => Just(Step::Command(ProductCommand::Close)),
        8 => (order.clone(), 0u128..4, 0i64..400, 1i64..120).prop_map(|(o, a, minor, ttl)| {
            Step::Command(ProductCommand::Reserve {
                order_id: OrderId(Uuid::from_u128(o)),
                account_id: AccountId(Uuid::from_u128(a)),
                amount: amount(minor),
                expires_at: start() + Duration::seconds(ttl),
            })
        }),
        4 => (order.clone(), 0u128..4, 0i64..400, 1i64..120).prop_map(|(o, a, minor, ttl)| {
            Step::Command(ProductCommand::Purchase {
                order_id: OrderId(Uuid::from_u128(o)),
                account_id: AccountId(Uuid::from_u128(a)),
                amount: amount(minor),
                expires_at: start() + Duration::seconds(ttl),
            })
        }),
        4 => order.clone().prop_map(|o| Step::Command(ProductCommand::Confirm {
            order_id: OrderId(Uuid::from_u128(o)),
        })),
        2 => (order.clone(), reason).prop_map(|(o, reason)| Step::Command(ProductCommand::Release {
            order_id: OrderId(Uuid::from_u128(o)),
            reason,
        })),
        2 => order.prop_map(|o| Step::Command(ProductCommand::Expire {
            order_id: OrderId(Uuid::from_u128(o)),
        })),
        2 => (0i64..60).prop_map(Step::Advance),
    ];
    (300i64..3_000, prop::collection::vec(step, 0..120))
}

fn check_sale(state: &ProductState) {
    let sale = state.sale.as_ref().expect("listed first");
    let quota = sale.terms.quota.minor();
    let (mut pending, mut confirmed, mut orders) = (0, 0, 0);
    for reservation in sale.reservations.values() {
        match reservation.state {
            ReservationState::Pending => pending += reservation.amount.minor(),
            ReservationState::Confirmed => {
                confirmed += reservation.amount.minor();
                orders += 1;
            }
            ReservationState::Released => {}
        }
    }
    assert_eq!(sale.pending.minor(), pending);
    assert_eq!(sale.confirmed.minor(), confirmed);
    assert_eq!(sale.confirmed_orders, orders);
    assert!(pending + confirmed <= quota, "over-booked");
    for order in sale.refusals.keys() {
        assert!(
            !sale.reservations.contains_key(order),
            "an order both refused and reserved"
        );
    }
    assert_eq!(confirmed + pending + sale.available().minor(), quota);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn product_sale_never_over_or_under_books((quota, steps) in product_steps()) {
        let terms = ProductTerms {
            name: "Bond".into(),
            currency: Currency::CNY,
            quota: amount(quota),
            min_purchase: amount(1),
            max_purchase: amount(quota.min(300)),
            annual_rate_bps: 500,
            term_days: 30,
        };
        let list = Step::Command(ProductCommand::List {
            product_id: ProductId::parse("p").unwrap(),
            terms,
        });
        let (state, history) = run::<ProductSale>(std::iter::once(list).chain(steps), |state, event| {
            check_sale(state);
            assert_round_trip(event);
        });
        prop_assert_eq!(ProductSale::replay(&history), state);
    }
}

fn account_steps() -> impl Strategy<Value = Vec<Step<AccountCommand>>> {
    let reference = (0u8..6).prop_map(|r| format!("ref-{r}"));
    let product = (0u8..3).prop_map(|p| ProductId::parse(&format!("p{p}")).unwrap());
    let minor = 0i64..1_000;
    let kind = prop_oneof![Just(PayoutKind::Interest), Just(PayoutKind::Principal)];
    let step = prop_oneof![
        4 => (minor.clone(), reference.clone()).prop_map(|(m, reference)| {
            Step::Command(AccountCommand::Deposit { amount: amount(m), reference })
        }),
        6 => (0u128..16, product.clone(), minor.clone(), -30i64..120).prop_map(|(o, product_id, m, ttl)| {
            Step::Command(AccountCommand::DebitForPurchase {
                order_id: OrderId(Uuid::from_u128(o)),
                product_id,
                amount: amount(m),
                reservation_expires_at: start() + Duration::seconds(ttl),
                currency: Currency::CNY,
            })
        }),
        2 => (0u128..16).prop_map(|o| Step::Command(AccountCommand::Refund {
            order_id: OrderId(Uuid::from_u128(o)),
        })),
        2 => (0u128..6, product, kind, minor.clone()).prop_map(|(p, product_id, kind, m)| {
            Step::Command(AccountCommand::CreditPayout {
                payout_id: PayoutId(Uuid::from_u128(p)),
                product_id,
                kind,
                amount: amount(m),
            })
        }),
        3 => (minor, reference).prop_map(|(m, reference)| {
            Step::Command(AccountCommand::Withdraw { amount: amount(m), reference })
        }),
        1 => (0i64..60).prop_map(Step::Advance),
    ];
    prop::collection::vec(step, 0..120)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn account_balance_is_never_negative_and_equals_its_postings(steps in account_steps()) {
        let account_id = AccountId(Uuid::from_u128(42));
        let open = Step::Command(AccountCommand::Open { account_id, currency: Currency::CNY });
        let mut posted: i128 = 0;
        let (state, history) = run::<CustomerAccount>(std::iter::once(open).chain(steps), |state, event| {
            let postings = event.postings();
            assert!(postings.is_empty() || is_balanced(&postings), "unbalanced {event:?}");
            posted += postings
                .iter()
                .filter(|p| p.account == LedgerAccount::CustomerAvailable { account_id })
                .map(|p| p.signed_minor())
                .sum::<i128>();
            let account = state.account.as_ref().unwrap();
            assert!(posted >= 0, "negative balance");
            assert_eq!(i128::from(account.available.minor()), posted);
            let derived = account.total_deposited.minor() - account.total_invested.minor()
                + account.total_paid_out.minor() - account.total_withdrawn.minor();
            assert_eq!(account.available.minor(), derived);
            assert_round_trip(event);
        });
        prop_assert_eq!(CustomerAccount::replay(&history), state.clone());
        let opened = history.iter().filter(|e| matches!(e, AccountEvent::AccountOpened { .. })).count();
        prop_assert_eq!(opened, 1);
        prop_assert_ne!(state, AccountState::default());
    }
}

fn payout_steps() -> impl Strategy<Value = Vec<Step<PayoutCommand>>> {
    let text = (0u8..3).prop_map(|n| format!("t{n}"));
    let finding = prop_oneof![
        text.clone()
            .prop_map(|provider_ref| ProviderFinding::Paid { provider_ref }),
        text.clone()
            .prop_map(|reason| ProviderFinding::Refused { reason }),
        Just(ProviderFinding::NotFound),
    ];
    let step = prop_oneof![
        4 => (1i64..60).prop_map(|s| Step::Command(PayoutCommand::Attempt {
            lease_until: start() + Duration::seconds(s),
        })),
        1 => (text.clone(), 1u32..4).prop_map(|(provider_ref, attempt)| Step::Command(PayoutCommand::RecordSucceeded { attempt, provider_ref })),
        1 => (text.clone(), 1u32..4).prop_map(|(reason, attempt)| Step::Command(PayoutCommand::RecordFailed { attempt, reason })),
        3 => (text, 1u32..4).prop_map(|(detail, attempt)| Step::Command(PayoutCommand::RecordUnknown { attempt, detail })),
        2 => Just(Step::Command(PayoutCommand::ExpireLease)),
        3 => finding.prop_map(|finding| Step::Command(PayoutCommand::Reconcile { finding })),
        2 => (0i64..60).prop_map(Step::Advance),
    ];
    prop::collection::vec(step, 0..80)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_payout_is_paid_at_most_once_with_one_key(steps in payout_steps()) {
        let payout_id = PayoutId(Uuid::from_u128(9));
        let schedule = Step::Command(PayoutCommand::Schedule {
            payout_id,
            product_id: ProductId::parse("p").unwrap(),
            account_id: AccountId(Uuid::from_u128(1)),
            period: "2026-11".into(),
            kind: PayoutKind::Interest,
            amount: amount(100),
            currency: Currency::CNY,
        });
        let mut paid = 0;
        let mut finished = false;
        let (state, history) = run::<Payout>(std::iter::once(schedule).chain(steps), |state, event| {
            assert!(!finished, "an event after a final outcome: {event:?}");
            match event {
                PayoutEvent::PayoutSucceeded { .. }
                | PayoutEvent::PayoutReconciled { finding: ProviderFinding::Paid { .. } } => paid += 1,
                PayoutEvent::PayoutAttempted { idempotency_key, .. } => {
                    assert_eq!(idempotency_key, &payout_id.to_string());
                }
                _ => {}
            }
            let payout = state.payout.as_ref().unwrap();
            assert!(payout.attempts <= PAYOUT_ATTEMPTS_MAX);
            finished = matches!(payout.status, PayoutStatus::Succeeded | PayoutStatus::Failed);
            assert_round_trip(event);
        });
        prop_assert!(paid <= 1);
        prop_assert_eq!(Payout::replay(&history), state);
    }
}

#[test]
fn product_events_expose_their_order() {
    let event = ProductEvent::ReservationConfirmed {
        order_id: OrderId(Uuid::from_u128(1)),
        account_id: AccountId(Uuid::from_u128(2)),
        amount: amount(5),
    };
    assert_eq!(event.order_id(), Some(OrderId(Uuid::from_u128(1))));
    assert_eq!(ProductEvent::SaleOpened {}.order_id(), None);
}
