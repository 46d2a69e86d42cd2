//! Money bounds: payout runs bounded by what the holders are owed whatever
//! their labels, parked payouts and the operator's retry and cancel, the
//! product's currency at debit, and the 10^15 limit on every running total.
//! Expected figures are computed by hand here, never by the code under test.

use chrono::{DateTime, TimeZone, Utc};
use domain::account::{
    AccountCommand, AccountEvent, AccountRejection, AccountState, CustomerAccount,
};
use domain::payout::{
    PAYOUT_ATTEMPTS_MAX, Payout, PayoutCommand, PayoutEvent, PayoutKind, PayoutRejection,
    PayoutState, PayoutStatus, ProviderFinding,
};
use domain::product::{
    ProductCommand, ProductEvent, ProductRejection, ProductSale, ProductState, ProductTerms,
};
use domain::{AccountId, Amount, Currency, Decider, OrderId, PayoutId, ProductId};
use proptest::prelude::*;
use uuid::Uuid;

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(seconds)
}

fn amount(minor: i64) -> Amount {
    Amount::new(minor).unwrap()
}

fn holder(n: u128) -> AccountId {
    AccountId(Uuid::from_u128(n))
}

fn product_id() -> ProductId {
    ProductId::parse("bond-1").unwrap()
}

fn terms(term_days: u32) -> ProductTerms {
    ProductTerms {
        name: "Bond".into(),
        currency: Currency::CNY,
        quota: amount(1_000_000),
        min_purchase: amount(1),
        max_purchase: amount(1_000_000),
        annual_rate_bps: 365,
        term_days,
    }
}

fn fold(history: &[ProductEvent]) -> ProductState {
    history
        .iter()
        .fold(ProductState::default(), |state, event| {
            ProductSale::evolve(state, event)
        })
}

/// Runs a command against the history and, if it decides events, appends
/// them to the history.
fn run(
    history: &mut Vec<ProductEvent>,
    command: ProductCommand,
) -> Result<Vec<ProductEvent>, ProductRejection> {
    let events = ProductSale::decide(&fold(history), &command, at(0))?;
    history.extend(events.iter().cloned());
    Ok(events)
}

/// A product sold to holders 1 and 2 (10,000 and 20,000) and closed.
fn sold_and_closed(term_days: u32) -> Vec<ProductEvent> {
    let mut history = vec![ProductEvent::ProductListed {
        product_id: product_id(),
        terms: terms(term_days),
    }];
    run(&mut history, ProductCommand::Open).unwrap();
    for (n, (who, minor)) in [(1, 10_000), (2, 20_000)].into_iter().enumerate() {
        let order_id = OrderId(Uuid::from_u128(100 + n as u128));
        run(
            &mut history,
            ProductCommand::Reserve {
                order_id,
                account_id: holder(who),
                amount: amount(minor),
                expires_at: at(60),
            },
        )
        .unwrap();
        run(&mut history, ProductCommand::Confirm { order_id }).unwrap();
    }
    run(&mut history, ProductCommand::Close).unwrap();
    history
}

fn interest(period: &str, days: u32) -> ProductCommand {
    ProductCommand::PlanPayoutRun {
        period: period.into(),
        kind: PayoutKind::Interest,
        days: Some(days),
    }
}

fn principal(period: &str) -> ProductCommand {
    ProductCommand::PlanPayoutRun {
        period: period.into(),
        kind: PayoutKind::Principal,
        days: None,
    }
}

#[test]
fn principal_is_planned_once_whatever_the_label() {
    let mut history = sold_and_closed(90);
    let first = run(&mut history, principal("2026-maturity")).unwrap();
    let [
        ProductEvent::PayoutRunPlanned {
            paid_total,
            principal_total,
            holders,
            payouts,
            ..
        },
    ] = first.as_slice()
    else {
        panic!("one run planned: {first:?}");
    };
    assert_eq!(
        (*paid_total, *principal_total),
        (amount(30_000), amount(30_000))
    );
    assert_eq!((*holders, *payouts), (2, 2));
    assert_eq!(run(&mut history, principal("maturity")), Ok(vec![]));
    assert_eq!(run(&mut history, principal("2026-maturity")), Ok(vec![]));
    let sale = fold(&history).sale.unwrap();
    assert_eq!(
        sale.payouts.principal_period.as_deref(),
        Some("2026-maturity")
    );
}

#[test]
fn interest_runs_use_up_the_term_in_order_and_no_further() {
    let mut history = sold_and_closed(90);
    // 365 bps for 30 days on 10,000 and 20,000: exactly 30 and 60.
    let first = run(&mut history, interest("2026-Q4a", 30)).unwrap();
    assert!(matches!(
        first.as_slice(),
        [ProductEvent::PayoutRunPlanned { first_day: 0, paid_total, .. }] if *paid_total == amount(90)
    ));
    let second = run(&mut history, interest("2026-Q4b", 60)).unwrap();
    assert!(matches!(
        second.as_slice(),
        [ProductEvent::PayoutRunPlanned { first_day: 30, paid_total, .. }] if *paid_total == amount(180)
    ));
    // The term is used up: any new label is refused and says what remains.
    let refused = run(&mut history, interest("2026-Q4-again", 1)).unwrap_err();
    assert_eq!(
        refused,
        ProductRejection::EntitlementExceeded {
            requested: 1,
            remaining: 0,
            term_days: 90
        }
    );
    assert!(
        refused
            .to_string()
            .contains("only 0 of the 90-day term remain")
    );
    // The same label with the same days is the same run: nothing new.
    assert_eq!(run(&mut history, interest("2026-Q4a", 30)), Ok(vec![]));
    // The same label with other days is a mistake, refused.
    assert!(matches!(
        run(&mut history, interest("2026-Q4a", 10)),
        Err(ProductRejection::PayoutRunMismatch { .. })
    ));
    assert!(matches!(
        run(&mut history, principal("2026-Q4a")),
        Err(ProductRejection::PayoutRunMismatch { .. })
    ));
}

#[test]
fn a_run_asking_for_more_than_remains_is_refused_and_plans_nothing() {
    let mut history = sold_and_closed(90);
    run(&mut history, interest("a", 60)).unwrap();
    let before = history.len();
    assert_eq!(
        run(&mut history, interest("b", 31)),
        Err(ProductRejection::EntitlementExceeded {
            requested: 31,
            remaining: 30,
            term_days: 90
        })
    );
    assert_eq!(history.len(), before);
    assert_eq!(fold(&history).sale.unwrap().interest_days_remaining(), 30);
    run(&mut history, interest("b", 30)).unwrap();
    assert_eq!(fold(&history).sale.unwrap().interest_days_remaining(), 0);
}

#[test]
fn days_beyond_the_term_or_misshaped_runs_are_invalid() {
    let mut history = sold_and_closed(90);
    for command in [
        interest("a", 91),
        interest("a", 0),
        ProductCommand::PlanPayoutRun {
            period: "a".into(),
            kind: PayoutKind::Interest,
            days: None,
        },
        ProductCommand::PlanPayoutRun {
            period: "a".into(),
            kind: PayoutKind::Principal,
            days: Some(3),
        },
        interest("", 10),
        interest("bad\nlabel", 10),
    ] {
        assert!(
            matches!(
                run(&mut history, command.clone()),
                Err(ProductRejection::InvalidPayoutRun(_))
            ),
            "{command:?}"
        );
    }
    run(&mut history, interest("a", 90)).unwrap();
}

#[test]
fn payouts_need_a_sale_that_opened_and_closed_with_nothing_pending() {
    // Never opened.
    let mut history = vec![ProductEvent::ProductListed {
        product_id: product_id(),
        terms: terms(90),
    }];
    assert_eq!(
        run(&mut history, principal("m")),
        Err(ProductRejection::SaleNotClosed)
    );
    // Open.
    run(&mut history, ProductCommand::Open).unwrap();
    assert_eq!(
        run(&mut history, interest("q", 10)),
        Err(ProductRejection::SaleNotClosed)
    );
    // Closed with a reservation pending.
    let order_id = OrderId(Uuid::from_u128(7));
    run(
        &mut history,
        ProductCommand::Reserve {
            order_id,
            account_id: holder(1),
            amount: amount(500),
            expires_at: at(60),
        },
    )
    .unwrap();
    run(&mut history, ProductCommand::Close).unwrap();
    assert_eq!(
        run(&mut history, principal("m")),
        Err(ProductRejection::SaleNotClosed)
    );
    // Settled: now it may.
    run(&mut history, ProductCommand::Confirm { order_id }).unwrap();
    assert_eq!(run(&mut history, principal("m")).unwrap().len(), 1);
}

#[test]
fn a_product_with_payouts_cannot_reopen() {
    let mut history = sold_and_closed(90);
    // Reopening before any payout is fine.
    run(&mut history, ProductCommand::Open).unwrap();
    run(&mut history, ProductCommand::Close).unwrap();
    run(&mut history, interest("q", 10)).unwrap();
    assert_eq!(
        run(&mut history, ProductCommand::Open),
        Err(ProductRejection::PayoutsScheduled)
    );
}

#[test]
fn interest_owed_beyond_the_limit_is_refused() {
    // 10^15 at 1,000% for 100 years owes far more than 10^15 in interest.
    let mut history = vec![ProductEvent::ProductListed {
        product_id: product_id(),
        terms: ProductTerms {
            quota: Amount::LIMIT,
            max_purchase: Amount::LIMIT,
            annual_rate_bps: 100_000,
            term_days: 36_500,
            ..terms(90)
        },
    }];
    run(&mut history, ProductCommand::Open).unwrap();
    let order_id = OrderId(Uuid::from_u128(1));
    run(
        &mut history,
        ProductCommand::Reserve {
            order_id,
            account_id: holder(1),
            amount: Amount::LIMIT,
            expires_at: at(60),
        },
    )
    .unwrap();
    run(&mut history, ProductCommand::Confirm { order_id }).unwrap();
    run(&mut history, ProductCommand::Close).unwrap();
    assert!(matches!(
        run(&mut history, interest("all", 36_500)),
        Err(ProductRejection::LimitExceeded(_))
    ));
    // 36 days at 1,000% on 10^15 is 986,301,369,863,013: within the limit.
    let planned = run(&mut history, interest("first", 36)).unwrap();
    assert!(matches!(
        planned.as_slice(),
        [ProductEvent::PayoutRunPlanned { paid_total, .. }] if *paid_total == amount(986_301_369_863_013)
    ));
    // Another 2 days would take the interest owed past 10^15.
    assert!(matches!(
        run(&mut history, interest("second", 2)),
        Err(ProductRejection::LimitExceeded(_))
    ));
    // Principal at the limit is still owed once.
    assert_eq!(run(&mut history, principal("m")).unwrap().len(), 1);
}

#[test]
fn terms_beyond_the_bounds_are_refused_by_field() {
    let listed = |terms: ProductTerms| {
        ProductSale::decide(
            &ProductState::default(),
            &ProductCommand::List {
                product_id: product_id(),
                terms,
            },
            at(0),
        )
    };
    let over = Amount::new(Amount::LIMIT.minor() + 1).unwrap();
    let refused = |terms: ProductTerms, field: &str| match listed(terms) {
        Err(ProductRejection::InvalidTerms(why)) => assert!(why.contains(field), "{why}"),
        other => panic!("{field}: {other:?}"),
    };
    refused(
        ProductTerms {
            quota: over,
            max_purchase: amount(10),
            ..terms(90)
        },
        "quota",
    );
    refused(
        ProductTerms {
            annual_rate_bps: 100_001,
            ..terms(90)
        },
        "annual_rate_bps",
    );
    refused(terms(36_501), "term_days");
    assert!(
        listed(ProductTerms {
            quota: Amount::LIMIT,
            annual_rate_bps: 100_000,
            ..terms(36_500)
        })
        .is_ok()
    );
}

fn account_with(events: &[AccountEvent]) -> AccountState {
    let opened = AccountEvent::AccountOpened {
        account_id: holder(1),
        currency: Currency::CNY,
    };
    std::iter::once(&opened)
        .chain(events)
        .fold(AccountState::default(), |state, event| {
            CustomerAccount::evolve(state, event)
        })
}

fn deposit(minor: i64, reference: &str) -> AccountCommand {
    AccountCommand::Deposit {
        amount: amount(minor),
        reference: reference.into(),
    }
}

fn deposited(minor: i64, reference: &str) -> AccountEvent {
    AccountEvent::FundsDeposited {
        account_id: holder(1),
        amount: amount(minor),
        reference: reference.into(),
    }
}

#[test]
fn a_purchase_in_another_currency_is_refused_at_debit() {
    let state = account_with(&[deposited(1_000, "d")]);
    let debit = |currency| AccountCommand::DebitForPurchase {
        order_id: OrderId(Uuid::from_u128(1)),
        product_id: product_id(),
        amount: amount(500),
        reservation_expires_at: at(60),
        currency,
    };
    let usd = Currency::parse("USD").unwrap();
    assert_eq!(
        CustomerAccount::decide(&state, &debit(usd), at(0)),
        Err(AccountRejection::CurrencyMismatch {
            account: Currency::CNY,
            product: usd
        })
    );
    assert_eq!(
        CustomerAccount::decide(&state, &debit(Currency::CNY), at(0))
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn balances_and_totals_stop_at_the_limit() {
    let limit = Amount::LIMIT.minor();
    // A deposit of exactly the limit is accepted; one unit more is not.
    let empty = account_with(&[]);
    assert!(CustomerAccount::decide(&empty, &deposit(limit, "a"), at(0)).is_ok());
    assert!(matches!(
        CustomerAccount::decide(&empty, &deposit(limit + 1, "a"), at(0)),
        Err(AccountRejection::LimitExceeded(_))
    ));
    // A balance at the limit takes no more money in.
    let full = account_with(&[deposited(limit, "a")]);
    assert!(matches!(
        CustomerAccount::decide(&full, &deposit(1, "b"), at(0)),
        Err(AccountRejection::LimitExceeded(_))
    ));
    let credit = AccountCommand::CreditPayout {
        payout_id: PayoutId(Uuid::from_u128(5)),
        product_id: product_id(),
        kind: PayoutKind::Interest,
        amount: amount(1),
    };
    assert!(matches!(
        CustomerAccount::decide(&full, &credit, at(0)),
        Err(AccountRejection::LimitExceeded(_))
    ));
    // Total deposited is bounded too, even with the balance spent.
    let spent = account_with(&[
        deposited(limit, "a"),
        AccountEvent::FundsWithdrawn {
            account_id: holder(1),
            amount: Amount::LIMIT,
            reference: "w".into(),
        },
    ]);
    assert!(matches!(
        CustomerAccount::decide(&spent, &deposit(1, "b"), at(0)),
        Err(AccountRejection::LimitExceeded(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Deposits near the bound: whatever is accepted keeps every total at
    /// or under 10^15, so `evolve` never overflows.
    #[test]
    fn deposits_near_the_limit_never_pass_it(
        amounts in prop::collection::vec(
            prop_oneof![
                1i64..=1_000,
                (Amount::LIMIT.minor() - 1_000)..=(Amount::LIMIT.minor() + 1_000),
                (Amount::LIMIT.minor() / 2 - 10)..=(Amount::LIMIT.minor() / 2 + 10),
            ],
            1..12,
        )
    ) {
        let mut state = account_with(&[]);
        let mut accepted: i128 = 0;
        for (n, minor) in amounts.into_iter().enumerate() {
            let command = deposit(minor, &format!("d{n}"));
            match CustomerAccount::decide(&state, &command, at(0)) {
                Ok(events) => {
                    accepted += i128::from(minor);
                    for event in &events {
                        state = CustomerAccount::evolve(state, event);
                    }
                }
                Err(AccountRejection::LimitExceeded(_)) => {
                    prop_assert!(accepted + i128::from(minor) > i128::from(Amount::LIMIT.minor()));
                }
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }
        let account = state.account.unwrap();
        prop_assert_eq!(i128::from(account.available.minor()), accepted);
        prop_assert!(account.total_deposited <= Amount::LIMIT);
    }

    /// Interest runs of random lengths under random labels: what is
    /// planned never passes the term, and the interest planned per holder
    /// never passes principal × rate × term / (365 × 10,000).
    #[test]
    fn interest_planned_never_passes_the_term(
        runs in prop::collection::vec((0usize..4, 1u32..60), 1..10),
        term in 1u32..120,
    ) {
        let mut history = sold_and_closed(term);
        let mut days_planned = 0u32;
        let mut paid = 0i64;
        let labels = ["q1", "q2", "q3", "q4"];
        for (label, days) in runs {
            match run(&mut history, interest(labels[label], days)) {
                Ok(events) => {
                    for event in events {
                        if let ProductEvent::PayoutRunPlanned { days, paid_total, .. } = event {
                            days_planned += days.unwrap();
                            paid += paid_total.minor();
                        }
                    }
                }
                Err(ProductRejection::EntitlementExceeded { remaining, .. }) => {
                    prop_assert_eq!(remaining, term - days_planned);
                    prop_assert!(days > remaining);
                }
                Err(ProductRejection::PayoutRunMismatch { .. }) => {}
                Err(ProductRejection::InvalidPayoutRun(_)) => prop_assert!(days > term),
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }
        prop_assert!(days_planned <= term);
        // 10,000 and 20,000 at 365 bps: 1 and 2 a day, exactly.
        prop_assert_eq!(paid, 3 * i64::from(days_planned));
        prop_assert!(paid <= 3 * i64::from(term));
    }
}

fn payout_after(events: &[PayoutEvent]) -> PayoutState {
    events.iter().fold(PayoutState::default(), |state, event| {
        Payout::evolve(state, event)
    })
}

fn scheduled() -> PayoutEvent {
    PayoutEvent::PayoutScheduled {
        payout_id: PayoutId(Uuid::from_u128(9)),
        product_id: product_id(),
        account_id: holder(1),
        period: "q".into(),
        kind: PayoutKind::Interest,
        amount: amount(10),
        currency: Currency::CNY,
    }
}

/// A payout whose every attempt ended unknown and was found missing.
fn exhausted() -> Vec<PayoutEvent> {
    let mut events = vec![scheduled()];
    for attempt in 1..=PAYOUT_ATTEMPTS_MAX {
        events.push(PayoutEvent::PayoutAttempted {
            attempt,
            idempotency_key: Uuid::from_u128(9).to_string(),
            lease_until: at(i64::from(attempt) * 10),
        });
        events.push(PayoutEvent::PayoutOutcomeUnknown {
            detail: "timeout".into(),
        });
        events.push(PayoutEvent::PayoutReconciled {
            finding: ProviderFinding::NotFound,
        });
    }
    events
}

fn decide(
    events: &[PayoutEvent],
    command: PayoutCommand,
    now: i64,
) -> Result<Vec<PayoutEvent>, PayoutRejection> {
    Payout::decide(&payout_after(events), &command, at(now))
}

#[test]
fn a_payout_that_spent_its_attempts_is_parked_not_attempted() {
    let events = exhausted();
    assert_eq!(
        decide(
            &events,
            PayoutCommand::Attempt {
                lease_until: at(1_000)
            },
            900
        ),
        Err(PayoutRejection::TooManyAttempts)
    );
    let parked = decide(
        &events,
        PayoutCommand::Park {
            reason: "spent".into(),
        },
        900,
    )
    .unwrap();
    assert_eq!(
        parked,
        vec![PayoutEvent::PayoutParked {
            reason: "spent".into(),
            unresolved: false
        }]
    );
    // A payout with attempts left is not parked for being scheduled.
    assert_eq!(
        decide(
            &[scheduled()],
            PayoutCommand::Park { reason: "x".into() },
            0
        ),
        Err(PayoutRejection::WrongStatus(PayoutStatus::Scheduled))
    );
}

#[test]
fn a_retried_payout_asks_the_provider_before_any_new_attempt() {
    let mut events = exhausted();
    events.push(PayoutEvent::PayoutParked {
        reason: "spent".into(),
        unresolved: false,
    });
    assert_eq!(
        payout_after(&events).payout.unwrap().status,
        PayoutStatus::Parked
    );
    // Nothing moves a parked payout but an operator.
    assert!(
        decide(
            &events,
            PayoutCommand::Attempt {
                lease_until: at(2_000)
            },
            1_000
        )
        .is_err()
    );
    let retried = decide(&events, PayoutCommand::Retry, 1_000).unwrap();
    assert_eq!(retried, vec![PayoutEvent::PayoutRetried {}]);
    events.extend(retried);
    let payout = payout_after(&events).payout.unwrap();
    assert_eq!(payout.status, PayoutStatus::Unknown);
    assert_eq!(payout.attempts_allowed, 2 * PAYOUT_ATTEMPTS_MAX);
    // Unknown: no attempt until a lookup said "no such payment".
    assert!(
        decide(
            &events,
            PayoutCommand::Attempt {
                lease_until: at(2_000)
            },
            1_000
        )
        .is_err()
    );
    events.push(PayoutEvent::PayoutReconciled {
        finding: ProviderFinding::NotFound,
    });
    let attempt = decide(
        &events,
        PayoutCommand::Attempt {
            lease_until: at(2_000),
        },
        1_000,
    )
    .unwrap();
    assert!(matches!(
        attempt.as_slice(),
        [PayoutEvent::PayoutAttempted { attempt, .. }] if *attempt == PAYOUT_ATTEMPTS_MAX + 1
    ));
}

#[test]
fn a_cancel_needs_the_provider_to_show_no_payment_after_the_last_claim() {
    let mut events = exhausted();
    let last_lease = i64::from(PAYOUT_ATTEMPTS_MAX) * 10;
    // Parked because the last outcome stayed unknown.
    events.truncate(events.len() - 1);
    events.push(PayoutEvent::PayoutParked {
        reason: "unknown too long".into(),
        unresolved: true,
    });
    let cancel = |finding| PayoutCommand::Cancel { finding };
    assert!(matches!(
        decide(
            &events,
            cancel(ProviderFinding::Paid {
                provider_ref: "p".into()
            }),
            last_lease + 1
        ),
        Err(PayoutRejection::ProviderHasRecord(_))
    ));
    assert!(matches!(
        decide(
            &events,
            cancel(ProviderFinding::Refused { reason: "r".into() }),
            last_lease + 1
        ),
        Err(PayoutRejection::ProviderHasRecord(_))
    ));
    assert_eq!(
        decide(&events, cancel(ProviderFinding::NotFound), last_lease - 1),
        Err(PayoutRejection::LeaseHeld(at(last_lease)))
    );
    let cancelled = decide(&events, cancel(ProviderFinding::NotFound), last_lease + 1).unwrap();
    events.extend(cancelled);
    assert_eq!(
        payout_after(&events).payout.unwrap().status,
        PayoutStatus::Cancelled
    );
    // Final: neither retried nor attempted again.
    assert!(decide(&events, PayoutCommand::Retry, last_lease + 2).is_err());
    assert!(
        decide(
            &events,
            PayoutCommand::Attempt {
                lease_until: at(9_999)
            },
            last_lease + 2
        )
        .is_err()
    );
    // Only a parked payout is cancelled.
    assert_eq!(
        decide(&[scheduled()], cancel(ProviderFinding::NotFound), 0),
        Err(PayoutRejection::WrongStatus(PayoutStatus::Scheduled))
    );
}

#[test]
fn every_payout_status_is_named_as_it_serializes() {
    let names: Vec<&str> = PayoutStatus::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(
        names,
        [
            "scheduled",
            "in_flight",
            "unknown",
            "succeeded",
            "failed",
            "parked",
            "cancelled"
        ]
    );
    for status in PayoutStatus::ALL {
        assert_eq!(
            serde_json::to_value(status).unwrap(),
            serde_json::Value::from(status.name())
        );
    }
}

#[test]
fn a_cancel_is_allowed_from_the_instant_the_last_claim_ends() {
    let mut events = exhausted();
    events.push(PayoutEvent::PayoutParked {
        reason: "spent".into(),
        unresolved: false,
    });
    let last_lease = i64::from(PAYOUT_ATTEMPTS_MAX) * 10;
    let cancel = PayoutCommand::Cancel {
        finding: ProviderFinding::NotFound,
    };
    assert_eq!(
        decide(&events, cancel, last_lease),
        Ok(vec![PayoutEvent::PayoutCancelled {
            finding: ProviderFinding::NotFound
        }])
    );
}

#[test]
fn a_payout_is_scheduled_only_for_an_amount_within_bounds() {
    let schedule = |minor: i64| PayoutCommand::Schedule {
        payout_id: PayoutId(Uuid::from_u128(9)),
        product_id: product_id(),
        account_id: holder(1),
        period: "q".into(),
        kind: PayoutKind::Interest,
        amount: amount(minor),
        currency: Currency::CNY,
    };
    let decide = |command| Payout::decide(&PayoutState::default(), &command, at(0));
    assert_eq!(decide(schedule(0)), Err(PayoutRejection::NonPositiveAmount));
    assert_eq!(
        decide(schedule(Amount::LIMIT.minor() + 1)),
        Err(PayoutRejection::NonPositiveAmount)
    );
    assert_eq!(decide(schedule(Amount::LIMIT.minor())).unwrap().len(), 1);
    assert_eq!(decide(schedule(1)).unwrap().len(), 1);
}
