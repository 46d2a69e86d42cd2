//! Exact boundaries and hand-computed figures: each test pins a rule where
//! it flips (a purchase of exactly what is left, a debit of exactly the
//! balance, every product-terms bound at its limit and one past it) or a
//! figure computed by hand (interest), so an off-by-one or a wrong constant
//! in the deciders fails here. Written against the mutants `cargo mutants -p
//! domain` found surviving; bounds are tested through their named constants.

use chrono::{DateTime, TimeZone, Utc};
use domain::account::{AccountCommand, AccountEvent, AccountRejection, CustomerAccount};
use domain::ids::{
    IDENTIFIER_LENGTH_MAX, REFERENCE_LENGTH_MAX, validate_identifier, validate_reference,
};
use domain::payout::{
    INTEREST_DENOMINATOR, Payout, PayoutCommand, PayoutEvent, PayoutKind, PayoutRejection,
    PayoutRunEvent, ProviderFinding, interest_for,
};
use domain::posting::{LedgerAccount, is_balanced, transfer};
use domain::product::{
    ANNUAL_RATE_BPS_MAX, PRODUCT_NAME_LENGTH_MAX, ProductCommand, ProductEvent, ProductRejection,
    ProductSale, ProductTerms, TERM_DAYS_MAX,
};
use domain::{AccountId, Amount, Currency, Decider, EventType, OrderId, PayoutId, ProductId};
use uuid::Uuid;

fn at(second: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + second, 0).unwrap()
}

fn amount(minor: i64) -> Amount {
    Amount::new(minor).unwrap()
}

fn product() -> ProductId {
    ProductId::parse("bond-1").unwrap()
}

fn buyer() -> AccountId {
    AccountId(Uuid::from_u128(7))
}

fn terms() -> ProductTerms {
    ProductTerms {
        name: "Bond 1".into(),
        currency: Currency::CNY,
        quota: amount(1_000),
        min_purchase: amount(10),
        max_purchase: amount(500),
        annual_rate_bps: 450,
        term_days: 90,
    }
}

fn decide_product(
    history: &[ProductEvent],
    command: &ProductCommand,
) -> Result<Vec<ProductEvent>, ProductRejection> {
    ProductSale::decide(&ProductSale::replay(history), command, at(0))
}

fn decide_account(
    history: &[AccountEvent],
    command: &AccountCommand,
) -> Result<Vec<AccountEvent>, AccountRejection> {
    CustomerAccount::decide(&CustomerAccount::replay(history), command, at(0))
}

// ---- interest, by hand ---------------------------------------------------

#[test]
fn interest_matches_hand_computed_figures() {
    // The denominator: 365 days × 10,000 basis points.
    assert_eq!(INTEREST_DENOMINATOR, 3_650_000);
    // 1,000,000 at 5% for a year: exactly 50,000, nothing left over.
    assert_eq!(
        interest_for(amount(1_000_000), 500, 365),
        (amount(50_000), 0)
    );
    // 10,000 at 4.5% for 90 days: 10,000 × 450 × 90 = 405,000,000;
    // / 3,650,000 = 110 remainder 3,500,000.
    assert_eq!(
        interest_for(amount(10_000), 450, 90),
        (amount(110), 3_500_000)
    );
    // 1 at 1 bp for 1 day: nothing paid, all of it a remainder.
    assert_eq!(interest_for(amount(1), 1, 1), (amount(0), 1));
    // 3,650,000 at 1 bp for 1 day: exactly one minor unit.
    assert_eq!(interest_for(amount(3_650_000), 1, 1), (amount(1), 0));
    // No rate or no days: no interest.
    assert_eq!(interest_for(amount(1_000_000), 0, 365), (amount(0), 0));
    assert_eq!(interest_for(amount(1_000_000), 500, 0), (amount(0), 0));
}

// ---- product sale boundaries --------------------------------------------

fn open_sale() -> Vec<ProductEvent> {
    vec![
        ProductEvent::ProductListed {
            product_id: product(),
            terms: terms(),
        },
        ProductEvent::SaleOpened {},
    ]
}

fn reserved(n: u128, minor: i64) -> ProductEvent {
    ProductEvent::QuotaReserved {
        order_id: OrderId(Uuid::from_u128(n)),
        account_id: buyer(),
        amount: amount(minor),
        expires_at: at(60),
    }
}

fn reserve(n: u128, minor: i64) -> ProductCommand {
    ProductCommand::Reserve {
        order_id: OrderId(Uuid::from_u128(n)),
        account_id: buyer(),
        amount: amount(minor),
        expires_at: at(60),
    }
}

#[test]
fn exactly_the_remaining_quota_can_be_reserved_and_one_more_cannot() {
    let mut history = open_sale();
    history.push(reserved(1, 500));
    history.push(reserved(2, 300));
    // 200 left: 200 is sold (not under-booked), 201 is refused.
    assert_eq!(
        decide_product(&history, &reserve(3, 200)),
        Ok(vec![reserved(3, 200)])
    );
    assert_eq!(
        decide_product(&history, &reserve(3, 201)),
        Err(ProductRejection::InsufficientQuota {
            available: amount(200)
        })
    );
}

#[test]
fn exactly_the_minimum_and_the_maximum_purchase_are_accepted() {
    let history = open_sale();
    for minor in [10, 500] {
        assert_eq!(
            decide_product(&history, &reserve(1, minor)),
            Ok(vec![reserved(1, minor)])
        );
    }
    for minor in [9, 501] {
        assert_eq!(
            decide_product(&history, &reserve(1, minor)),
            Err(ProductRejection::AmountOutOfRange {
                min: amount(10),
                max: amount(500)
            })
        );
    }
}

#[test]
fn a_closed_sale_opens_and_an_open_one_closes() {
    let listed = &open_sale()[..1];
    assert_eq!(
        decide_product(listed, &ProductCommand::Open),
        Ok(vec![ProductEvent::SaleOpened {}])
    );
    assert_eq!(decide_product(listed, &ProductCommand::Close), Ok(vec![]));
    assert_eq!(
        decide_product(&open_sale(), &ProductCommand::Close),
        Ok(vec![ProductEvent::SaleClosed {}])
    );
    assert_eq!(
        decide_product(&open_sale(), &ProductCommand::Open),
        Ok(vec![])
    );
}

/// Lists a product with `terms` changed by `change`.
fn listing(change: impl FnOnce(&mut ProductTerms)) -> Result<(), ProductRejection> {
    let mut terms = terms();
    change(&mut terms);
    let command = ProductCommand::List {
        product_id: product(),
        terms: terms.clone(),
    };
    let decided = decide_product(&[], &command)?;
    assert_eq!(
        decided,
        vec![ProductEvent::ProductListed {
            product_id: product(),
            terms
        }]
    );
    Ok(())
}

fn refused(result: Result<(), ProductRejection>) -> bool {
    matches!(result, Err(ProductRejection::InvalidTerms(_)))
}

#[test]
fn every_product_terms_bound_holds_at_its_limit_and_fails_one_past_it() {
    let max_name = "n".repeat(PRODUCT_NAME_LENGTH_MAX);
    let long_name = "n".repeat(PRODUCT_NAME_LENGTH_MAX + 1);
    assert_eq!(listing(|t| t.name = max_name), Ok(()));
    assert!(refused(listing(|t| t.name = long_name)));
    assert!(refused(listing(|t| t.name = "  ".into())));
    assert!(refused(listing(|t| t.name = "a\u{7}b".into())));
    assert_eq!(listing(|t| t.name = "é".into()), Ok(()));

    assert!(refused(listing(|t| t.quota = Amount::ZERO)));
    assert_eq!(
        listing(|t| {
            t.quota = amount(1);
            t.min_purchase = amount(1);
            t.max_purchase = amount(1);
        }),
        Ok(())
    );
    assert!(refused(listing(|t| t.min_purchase = Amount::ZERO)));
    assert_eq!(listing(|t| t.min_purchase = t.max_purchase), Ok(()));
    assert!(refused(listing(|t| {
        t.min_purchase = amount(t.max_purchase.minor() + 1)
    })));
    assert_eq!(listing(|t| t.max_purchase = t.quota), Ok(()));
    assert!(refused(listing(|t| {
        t.max_purchase = amount(t.quota.minor() + 1)
    })));

    assert_eq!(listing(|t| t.annual_rate_bps = 0), Ok(()));
    assert_eq!(listing(|t| t.annual_rate_bps = ANNUAL_RATE_BPS_MAX), Ok(()));
    assert!(refused(listing(|t| {
        t.annual_rate_bps = ANNUAL_RATE_BPS_MAX + 1
    })));

    assert!(refused(listing(|t| t.term_days = 0)));
    assert_eq!(listing(|t| t.term_days = 1), Ok(()));
    assert_eq!(listing(|t| t.term_days = TERM_DAYS_MAX), Ok(()));
    assert!(refused(listing(|t| t.term_days = TERM_DAYS_MAX + 1)));
}

// ---- account boundaries -------------------------------------------------

fn funded(minor: i64) -> Vec<AccountEvent> {
    vec![
        AccountEvent::AccountOpened {
            account_id: buyer(),
            currency: Currency::CNY,
        },
        AccountEvent::FundsDeposited {
            account_id: buyer(),
            amount: amount(minor),
            reference: "wire-1".into(),
        },
    ]
}

#[test]
fn a_buyer_with_exactly_enough_is_debited_and_one_short_is_not() {
    let debit = |minor| AccountCommand::DebitForPurchase {
        order_id: OrderId(Uuid::from_u128(1)),
        product_id: product(),
        amount: amount(minor),
        reservation_expires_at: at(60),
        currency: Currency::CNY,
    };
    assert_eq!(
        decide_account(&funded(300), &debit(300)),
        Ok(vec![AccountEvent::PurchaseDebited {
            account_id: buyer(),
            order_id: OrderId(Uuid::from_u128(1)),
            product_id: product(),
            amount: amount(300),
        }])
    );
    assert_eq!(
        decide_account(&funded(299), &debit(300)),
        Err(AccountRejection::InsufficientFunds {
            available: amount(299),
            requested: amount(300)
        })
    );
}

#[test]
fn a_withdrawal_of_exactly_the_balance_is_paid_and_a_repeat_is_not_a_second() {
    let withdraw = |minor, reference: &str| AccountCommand::Withdraw {
        amount: amount(minor),
        reference: reference.into(),
    };
    let withdrawn = AccountEvent::FundsWithdrawn {
        account_id: buyer(),
        amount: amount(300),
        reference: "out-1".into(),
    };
    assert_eq!(
        decide_account(&funded(300), &withdraw(300, "out-1")),
        Ok(vec![withdrawn.clone()])
    );
    assert_eq!(
        decide_account(&funded(299), &withdraw(300, "out-1")),
        Err(AccountRejection::InsufficientFunds {
            available: amount(299),
            requested: amount(300)
        })
    );
    let mut history = funded(1_000);
    history.push(withdrawn);
    // The same reference and amount: already done, nothing new.
    assert_eq!(
        decide_account(&history, &withdraw(300, "out-1")),
        Ok(vec![])
    );
    // The same reference with another amount: refused.
    assert_eq!(
        decide_account(&history, &withdraw(301, "out-1")),
        Err(AccountRejection::ReferenceReused)
    );
    // Another reference: a second withdrawal.
    assert_eq!(
        decide_account(&history, &withdraw(300, "out-2")),
        Ok(vec![AccountEvent::FundsWithdrawn {
            account_id: buyer(),
            amount: amount(300),
            reference: "out-2".into(),
        }])
    );
}

#[test]
fn a_payout_is_credited_once_and_its_repeat_is_not_a_second() {
    let payout_id = PayoutId(Uuid::from_u128(5));
    let credit = |minor| AccountCommand::CreditPayout {
        payout_id,
        product_id: product(),
        kind: PayoutKind::Interest,
        amount: amount(minor),
    };
    let credited = AccountEvent::PayoutCredited {
        account_id: buyer(),
        payout_id,
        product_id: product(),
        kind: PayoutKind::Interest,
        amount: amount(110),
    };
    assert_eq!(
        decide_account(&funded(0), &credit(110)),
        Ok(vec![credited.clone()])
    );
    assert_eq!(
        decide_account(&funded(0), &credit(0)),
        Err(AccountRejection::NonPositiveAmount)
    );
    let mut history = funded(0);
    history.push(credited);
    assert_eq!(decide_account(&history, &credit(110)), Ok(vec![]));
    assert_eq!(
        decide_account(&history, &credit(111)),
        Err(AccountRejection::PayoutReused)
    );
    let state = CustomerAccount::replay(&history);
    let account = state.account.expect("opened");
    assert_eq!(account.available, amount(110));
    assert_eq!(account.total_paid_out, amount(110));
}

// ---- names, versions, identifiers ---------------------------------------

#[test]
fn event_schema_versions_are_pinned() {
    let opened = AccountEvent::AccountOpened {
        account_id: buyer(),
        currency: Currency::CNY,
    };
    assert_eq!(
        opened.schema_version(),
        2,
        "account_opened gained a currency"
    );
    assert_eq!(funded(5)[1].schema_version(), 1);
    assert_eq!(ProductEvent::SaleOpened {}.schema_version(), 1);
    assert_eq!(opened.event_type(), "account_opened");
}

#[test]
fn identifiers_and_references_at_their_limits() {
    let longest = "a".repeat(IDENTIFIER_LENGTH_MAX);
    assert!(validate_identifier(&longest).is_ok());
    assert!(validate_identifier(&format!("{longest}a")).is_err());
    let id = ProductId::parse("bond-1.a_b").unwrap();
    assert_eq!(id.as_str(), "bond-1.a_b");
    assert_eq!(id.to_string(), "bond-1.a_b");
    assert_eq!(id.stream(), "product-bond-1.a_b");
    let longest = "r".repeat(REFERENCE_LENGTH_MAX);
    assert!(validate_reference(&longest).is_ok());
    assert!(validate_reference(&format!("{longest}r")).is_err());
}

#[test]
fn amounts_and_currencies_display_as_stored() {
    assert_eq!(amount(12_345).to_string(), "12345");
    assert_eq!(Amount::ZERO.to_string(), "0");
    assert_eq!(Currency::CNY.to_string(), "CNY");
    assert_eq!(Currency::parse("USD").unwrap().to_string(), "USD");
}

// ---- payouts and postings -----------------------------------------------

fn payout_history(lease: i64) -> Vec<PayoutEvent> {
    vec![
        PayoutEvent::PayoutScheduled {
            payout_id: PayoutId(Uuid::from_u128(3)),
            product_id: product(),
            account_id: buyer(),
            period: "2026-11".into(),
            kind: PayoutKind::Interest,
            amount: amount(12),
            currency: Currency::CNY,
        },
        PayoutEvent::PayoutAttempted {
            attempt: 1,
            idempotency_key: Uuid::from_u128(3).to_string(),
            lease_until: at(lease),
        },
    ]
}

fn decide_payout(
    history: &[PayoutEvent],
    command: &PayoutCommand,
    second: i64,
) -> Result<Vec<PayoutEvent>, PayoutRejection> {
    Payout::decide(&Payout::replay(history), command, at(second))
}

#[test]
fn an_outcome_of_another_attempt_than_the_current_one_is_stale() {
    let history = payout_history(30);
    let succeeded = |attempt| PayoutCommand::RecordSucceeded {
        attempt,
        provider_ref: "p-1".into(),
    };
    assert_eq!(
        decide_payout(&history, &succeeded(2), 1),
        Err(PayoutRejection::StaleAttempt { got: 2, current: 1 })
    );
    assert_eq!(
        decide_payout(&history, &succeeded(1), 1),
        Ok(vec![PayoutEvent::PayoutSucceeded {
            provider_ref: "p-1".into()
        }])
    );
}

#[test]
fn not_found_counts_from_the_end_of_the_last_lease_exactly() {
    let mut history = payout_history(30);
    history.push(PayoutEvent::PayoutOutcomeUnknown {
        detail: "timeout".into(),
    });
    let reconcile = PayoutCommand::Reconcile {
        finding: ProviderFinding::NotFound,
    };
    assert_eq!(
        decide_payout(&history, &reconcile, 29),
        Err(PayoutRejection::LeaseHeld(at(30)))
    );
    assert_eq!(
        decide_payout(&history, &reconcile, 30),
        Ok(vec![PayoutEvent::PayoutReconciled {
            finding: ProviderFinding::NotFound
        }])
    );
}

#[test]
fn postings_balance_only_when_debits_equal_credits_and_all_are_positive() {
    let cash = LedgerAccount::PlatformCash;
    let customer = LedgerAccount::CustomerAvailable {
        account_id: buyer(),
    };
    let balanced = transfer(cash.clone(), customer.clone(), amount(5));
    assert!(is_balanced(&balanced));
    assert!(is_balanced(&[]));
    let mut lopsided = balanced.clone();
    lopsided[1].amount = amount(6);
    assert!(!is_balanced(&lopsided));
    assert!(!is_balanced(&balanced[..1]));
    // Zero on both sides nets to zero but is no entry.
    assert!(!is_balanced(&transfer(cash, customer, Amount::ZERO)));
}

#[test]
fn payout_run_events_have_their_stable_name() {
    let run = PayoutRunEvent::PayoutRunScheduled {
        product_id: product(),
        period: "2026-Q4".into(),
        kind: PayoutKind::Interest,
        days: Some(90),
        holders: 1,
        payouts: 1,
        principal_total: amount(10_000),
        paid_total: amount(110),
        remainder_total: 3_500_000,
        denominator: 3_650_000,
    };
    assert_eq!(run.event_type(), "payout_run_scheduled");
}
