//! Property tests: for any sequence of commands, the accepted ones keep every
//! invariant, and the product and account deciders answer every command
//! exactly as a small reference model written separately here does (its own
//! bookkeeping, never `evolve`), events and rejections alike.

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
        let steps: Vec<_> = std::iter::once(list).chain(steps).collect();
        let (_, history) = run::<ProductSale>(steps.clone(), |state, event| {
            check_sale(state);
            assert_round_trip(event);
        });
        prop_assert!(!history.is_empty(), "the listing at least");
        agrees_with_model::<ProductSale, model::Sale>(steps)?;
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
        let steps: Vec<_> = std::iter::once(open).chain(steps).collect();
        agrees_with_model::<CustomerAccount, model::Account>(steps.clone())?;
        let (state, history) = run::<CustomerAccount>(steps, |state, event| {
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

/// Runs `steps` through the decider and the model side by side: every
/// command gets the same events or the same rejection from both. The model
/// moves on its own answer, the decider's state by `evolve`.
fn agrees_with_model<D, M>(steps: Vec<Step<D::Command>>) -> Result<(), TestCaseError>
where
    D: Decider,
    D::Command: std::fmt::Debug,
    D::Event: PartialEq + std::fmt::Debug,
    D::Rejection: PartialEq + std::fmt::Debug,
    M: model::Model<D>,
{
    let mut state = D::State::default();
    let mut model = M::default();
    let mut now = start();
    for step in steps {
        let command = match step {
            Step::Advance(seconds) => {
                now += Duration::seconds(seconds);
                continue;
            }
            Step::Command(command) => command,
        };
        let expected = model.decide(&command, now);
        let decided = D::decide(&state, &command, now);
        prop_assert_eq!(&decided, &expected, "{:?}", command);
        if let Ok(events) = decided {
            for event in &events {
                state = D::evolve(state, event);
            }
        }
    }
    Ok(())
}

/// The reference models: what each command should answer, from plain
/// bookkeeping written apart from the deciders.
mod model {
    use super::*;
    use domain::account::AccountRejection;
    use domain::product::{ProductRejection, RefusalReason};
    use std::collections::HashMap;

    /// A reference model of one decider: answers a command and moves on.
    pub trait Model<D: Decider>: Default {
        fn decide(
            &mut self,
            command: &D::Command,
            now: DateTime<Utc>,
        ) -> Result<Vec<D::Event>, D::Rejection>;
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Hold {
        Pending,
        Confirmed,
        Released,
    }

    struct Order {
        account_id: AccountId,
        amount: i64,
        expires_at: DateTime<Utc>,
        hold: Hold,
    }

    /// A product sale as plain numbers.
    #[derive(Default)]
    pub struct Sale {
        terms: Option<ProductTerms>,
        open: bool,
        orders: HashMap<OrderId, Order>,
        refused: Vec<OrderId>,
    }

    impl Sale {
        fn sum(&self, hold: Hold) -> i64 {
            self.orders
                .values()
                .filter(|o| o.hold == hold)
                .map(|o| o.amount)
                .sum()
        }

        /// Why a reservation is refused, if it is.
        fn refusal(&self, order_id: &OrderId, minor: i64) -> Option<ProductRejection> {
            let terms = self.terms.as_ref()?;
            let quota = terms.quota.minor();
            let (confirmed, pending) = (self.sum(Hold::Confirmed), self.sum(Hold::Pending));
            if self.orders.contains_key(order_id) || self.refused.contains(order_id) {
                Some(ProductRejection::DuplicateOrder)
            } else if confirmed == quota {
                Some(ProductRejection::SoldOut)
            } else if !self.open {
                Some(ProductRejection::SaleNotOpen)
            } else if minor < terms.min_purchase.minor() || minor > terms.max_purchase.minor() {
                Some(ProductRejection::AmountOutOfRange {
                    min: terms.min_purchase,
                    max: terms.max_purchase,
                })
            } else if minor + confirmed + pending > quota {
                Some(ProductRejection::InsufficientQuota {
                    available: amount(quota - confirmed - pending),
                })
            } else {
                None
            }
        }

        fn settle(
            &mut self,
            order_id: &OrderId,
            hold: Hold,
            reason: ReleaseReason,
            now: Option<DateTime<Utc>>,
        ) -> Result<Vec<ProductEvent>, ProductRejection> {
            let order = self
                .orders
                .get_mut(order_id)
                .ok_or(ProductRejection::UnknownOrder)?;
            match order.hold {
                Hold::Pending => {}
                Hold::Confirmed => {
                    return Err(ProductRejection::NotPending(ReservationState::Confirmed));
                }
                Hold::Released => {
                    return Err(ProductRejection::NotPending(ReservationState::Released));
                }
            }
            if let Some(now) = now
                && now < order.expires_at
            {
                return Err(ProductRejection::NotYetExpired(order.expires_at));
            }
            order.hold = hold;
            let (account_id, amount) = (order.account_id, super::amount(order.amount));
            Ok(vec![if hold == Hold::Confirmed {
                ProductEvent::ReservationConfirmed {
                    order_id: *order_id,
                    account_id,
                    amount,
                }
            } else {
                ProductEvent::ReservationReleased {
                    order_id: *order_id,
                    account_id,
                    amount,
                    reason,
                }
            }])
        }
    }

    impl Model<ProductSale> for Sale {
        fn decide(
            &mut self,
            command: &ProductCommand,
            now: DateTime<Utc>,
        ) -> Result<Vec<ProductEvent>, ProductRejection> {
            match (command, &self.terms) {
                (ProductCommand::List { product_id, terms }, None) => {
                    self.terms = Some(terms.clone());
                    return Ok(vec![ProductEvent::ProductListed {
                        product_id: product_id.clone(),
                        terms: terms.clone(),
                    }]);
                }
                (ProductCommand::List { .. }, Some(_)) => {
                    return Err(ProductRejection::AlreadyListed);
                }
                (_, None) => return Err(ProductRejection::NotListed),
                (_, Some(_)) => {}
            }
            match command {
                ProductCommand::List { .. } => unreachable!("handled above"),
                ProductCommand::Open if self.open => Ok(vec![]),
                ProductCommand::Close if !self.open => Ok(vec![]),
                ProductCommand::Open => {
                    self.open = true;
                    Ok(vec![ProductEvent::SaleOpened {}])
                }
                ProductCommand::Close => {
                    self.open = false;
                    Ok(vec![ProductEvent::SaleClosed {}])
                }
                ProductCommand::Reserve {
                    order_id,
                    account_id,
                    amount,
                    expires_at,
                }
                | ProductCommand::Purchase {
                    order_id,
                    account_id,
                    amount,
                    expires_at,
                } => {
                    let purchase = matches!(command, ProductCommand::Purchase { .. });
                    match self.refusal(order_id, amount.minor()) {
                        None => {
                            self.orders.insert(
                                *order_id,
                                Order {
                                    account_id: *account_id,
                                    amount: amount.minor(),
                                    expires_at: *expires_at,
                                    hold: Hold::Pending,
                                },
                            );
                            Ok(vec![ProductEvent::QuotaReserved {
                                order_id: *order_id,
                                account_id: *account_id,
                                amount: *amount,
                                expires_at: *expires_at,
                            }])
                        }
                        Some(ProductRejection::DuplicateOrder) => {
                            Err(ProductRejection::DuplicateOrder)
                        }
                        Some(rejection) if purchase => {
                            self.refused.push(*order_id);
                            let reason = match rejection {
                                ProductRejection::SoldOut => RefusalReason::SoldOut,
                                ProductRejection::SaleNotOpen => RefusalReason::SaleNotOpen,
                                ProductRejection::AmountOutOfRange { .. } => {
                                    RefusalReason::AmountOutOfRange
                                }
                                _ => RefusalReason::InsufficientQuota,
                            };
                            Ok(vec![ProductEvent::PurchaseRefused {
                                order_id: *order_id,
                                account_id: *account_id,
                                amount: *amount,
                                reason,
                            }])
                        }
                        Some(rejection) => Err(rejection),
                    }
                }
                ProductCommand::Confirm { order_id } => {
                    self.settle(order_id, Hold::Confirmed, ReleaseReason::Cancelled, None)
                }
                ProductCommand::Release { order_id, reason } => {
                    self.settle(order_id, Hold::Released, *reason, None)
                }
                ProductCommand::Expire { order_id } => {
                    self.settle(order_id, Hold::Released, ReleaseReason::Expired, Some(now))
                }
                // Payout runs have their own hand-computed tests
                // (tests/entitlements.rs); the generator here makes none.
                ProductCommand::PlanPayoutRun { .. } => {
                    unreachable!("the generator makes no payout runs")
                }
            }
        }
    }

    /// An account as plain numbers.
    #[derive(Default)]
    pub struct Account {
        account_id: Option<AccountId>,
        balance: i64,
        deposits: HashMap<String, i64>,
        withdrawals: HashMap<String, i64>,
        purchases: HashMap<OrderId, (ProductId, i64, bool)>,
        payouts: HashMap<PayoutId, i64>,
    }

    impl Model<CustomerAccount> for Account {
        fn decide(
            &mut self,
            command: &AccountCommand,
            now: DateTime<Utc>,
        ) -> Result<Vec<AccountEvent>, AccountRejection> {
            let account_id = match (command, self.account_id) {
                (
                    AccountCommand::Open {
                        account_id,
                        currency,
                    },
                    None,
                ) => {
                    self.account_id = Some(*account_id);
                    return Ok(vec![AccountEvent::AccountOpened {
                        account_id: *account_id,
                        currency: *currency,
                    }]);
                }
                (AccountCommand::Open { .. }, Some(_)) => {
                    return Err(AccountRejection::AlreadyOpen);
                }
                (_, None) => return Err(AccountRejection::NotOpen),
                (_, Some(account_id)) => account_id,
            };
            let positive = |amount: &Amount| {
                if amount.minor() > 0 {
                    Ok(amount.minor())
                } else {
                    Err(AccountRejection::NonPositiveAmount)
                }
            };
            let short = |balance: i64, minor: i64| AccountRejection::InsufficientFunds {
                available: super::amount(balance),
                requested: super::amount(minor),
            };
            match command {
                AccountCommand::Open { .. } => unreachable!("handled above"),
                AccountCommand::Deposit { amount, reference } => {
                    let minor = positive(amount)?;
                    match self.deposits.get(reference) {
                        Some(earlier) if *earlier == minor => return Ok(vec![]),
                        Some(_) => return Err(AccountRejection::ReferenceReused),
                        None => {}
                    }
                    self.deposits.insert(reference.clone(), minor);
                    self.balance += minor;
                    Ok(vec![AccountEvent::FundsDeposited {
                        account_id,
                        amount: *amount,
                        reference: reference.clone(),
                    }])
                }
                // Every generated account and debit is in CNY (currencies
                // are checked in tests/entitlements.rs).
                AccountCommand::DebitForPurchase {
                    order_id,
                    product_id,
                    amount,
                    reservation_expires_at,
                    currency: _,
                } => {
                    let minor = positive(amount)?;
                    match self.purchases.get(order_id) {
                        Some((product, earlier, _))
                            if *earlier == minor && product == product_id =>
                        {
                            return Ok(vec![]);
                        }
                        Some(_) => return Err(AccountRejection::OrderReused),
                        None => {}
                    }
                    if now >= *reservation_expires_at {
                        return Err(AccountRejection::ReservationExpired(
                            *reservation_expires_at,
                        ));
                    }
                    if minor > self.balance {
                        return Err(short(self.balance, minor));
                    }
                    self.balance -= minor;
                    self.purchases
                        .insert(*order_id, (product_id.clone(), minor, false));
                    Ok(vec![AccountEvent::PurchaseDebited {
                        account_id,
                        order_id: *order_id,
                        product_id: product_id.clone(),
                        amount: *amount,
                    }])
                }
                AccountCommand::Refund { order_id } => {
                    let (product_id, minor, refunded) = self
                        .purchases
                        .get_mut(order_id)
                        .ok_or(AccountRejection::UnknownOrder)?;
                    if *refunded {
                        return Err(AccountRejection::AlreadyRefunded);
                    }
                    *refunded = true;
                    self.balance += *minor;
                    Ok(vec![AccountEvent::PurchaseRefunded {
                        account_id,
                        order_id: *order_id,
                        product_id: product_id.clone(),
                        amount: super::amount(*minor),
                    }])
                }
                AccountCommand::CreditPayout {
                    payout_id,
                    product_id,
                    kind,
                    amount,
                } => {
                    let minor = positive(amount)?;
                    match self.payouts.get(payout_id) {
                        Some(earlier) if *earlier == minor => return Ok(vec![]),
                        Some(_) => return Err(AccountRejection::PayoutReused),
                        None => {}
                    }
                    self.payouts.insert(*payout_id, minor);
                    self.balance += minor;
                    Ok(vec![AccountEvent::PayoutCredited {
                        account_id,
                        payout_id: *payout_id,
                        product_id: product_id.clone(),
                        kind: *kind,
                        amount: *amount,
                    }])
                }
                AccountCommand::Withdraw { amount, reference } => {
                    let minor = positive(amount)?;
                    match self.withdrawals.get(reference) {
                        Some(earlier) if *earlier == minor => return Ok(vec![]),
                        Some(_) => return Err(AccountRejection::ReferenceReused),
                        None => {}
                    }
                    if minor > self.balance {
                        return Err(short(self.balance, minor));
                    }
                    self.withdrawals.insert(reference.clone(), minor);
                    self.balance -= minor;
                    Ok(vec![AccountEvent::FundsWithdrawn {
                        account_id,
                        amount: *amount,
                        reference: reference.clone(),
                    }])
                }
            }
        }
    }
}
