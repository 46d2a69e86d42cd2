//! Example-based decider tests: given a history, a command and the time,
//! check the events decided or the rejection.

use chrono::{DateTime, TimeZone, Utc};
use domain::account::{AccountCommand, AccountEvent, AccountRejection, CustomerAccount};
use domain::payout::{
    Payout, PayoutCommand, PayoutEvent, PayoutKind, PayoutRejection, PayoutStatus, ProviderFinding,
};
use domain::product::{
    ProductCommand, ProductEvent, ProductRejection, ProductSale, ProductTerms, ReleaseReason,
    ReservationState,
};
use domain::{AccountId, Amount, Currency, Decider, OrderId, PayoutId, ProductId};
use std::fmt::Debug;
use uuid::Uuid;

fn check<D: Decider>(
    history: &[D::Event],
    command: D::Command,
    now: DateTime<Utc>,
    expected: Result<Vec<D::Event>, D::Rejection>,
) where
    D::Event: PartialEq,
    D::Rejection: PartialEq + Debug,
{
    let state = D::replay(history);
    assert_eq!(D::decide(&state, &command, now), expected);
}

fn at(second: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + second, 0).unwrap()
}

fn amount(minor: i64) -> Amount {
    Amount::new(minor).unwrap()
}

fn product() -> ProductId {
    ProductId::parse("bond-1").unwrap()
}

fn order(n: u128) -> OrderId {
    OrderId(Uuid::from_u128(n))
}

fn buyer() -> AccountId {
    AccountId(Uuid::from_u128(7))
}

fn terms(quota: i64) -> ProductTerms {
    ProductTerms {
        name: "Bond 1".into(),
        currency: Currency::CNY,
        quota: amount(quota),
        min_purchase: amount(10),
        max_purchase: amount(500),
        annual_rate_bps: 450,
        term_days: 90,
    }
}

fn open_sale(quota: i64) -> Vec<ProductEvent> {
    vec![
        ProductEvent::ProductListed {
            product_id: product(),
            terms: terms(quota),
        },
        ProductEvent::SaleOpened {},
    ]
}

fn reserved(n: u128, minor: i64, expires: i64) -> ProductEvent {
    ProductEvent::QuotaReserved {
        order_id: order(n),
        account_id: buyer(),
        amount: amount(minor),
        expires_at: at(expires),
    }
}

fn reserve(n: u128, minor: i64, expires: i64) -> ProductCommand {
    ProductCommand::Reserve {
        order_id: order(n),
        account_id: buyer(),
        amount: amount(minor),
        expires_at: at(expires),
    }
}

#[test]
fn product_listing_validates_terms() {
    let mut bad = terms(1000);
    bad.min_purchase = amount(600);
    let list = |terms| ProductCommand::List {
        product_id: product(),
        terms,
    };
    check::<ProductSale>(
        &[],
        list(bad),
        at(0),
        Err(ProductRejection::InvalidTerms(
            "min_purchase must be positive and at most max_purchase".into(),
        )),
    );
    check::<ProductSale>(
        &[],
        list(terms(1000)),
        at(0),
        Ok(vec![open_sale(1000)[0].clone()]),
    );
    check::<ProductSale>(
        &open_sale(1000),
        list(terms(1000)),
        at(0),
        Err(ProductRejection::AlreadyListed),
    );
    check::<ProductSale>(
        &[],
        ProductCommand::Open,
        at(0),
        Err(ProductRejection::NotListed),
    );
}

#[test]
fn opening_and_closing_are_idempotent() {
    let history = open_sale(1000);
    check::<ProductSale>(&history, ProductCommand::Open, at(0), Ok(vec![]));
    check::<ProductSale>(
        &history,
        ProductCommand::Close,
        at(0),
        Ok(vec![ProductEvent::SaleClosed {}]),
    );
    check::<ProductSale>(&history[..1], ProductCommand::Close, at(0), Ok(vec![]));
}

#[test]
fn reservations_respect_the_sale_the_range_and_the_quota() {
    let history = open_sale(1000);
    check::<ProductSale>(
        &history,
        reserve(1, 100, 60),
        at(0),
        Ok(vec![reserved(1, 100, 60)]),
    );
    check::<ProductSale>(
        &history[..1],
        reserve(1, 100, 60),
        at(0),
        Err(ProductRejection::SaleNotOpen),
    );
    check::<ProductSale>(
        &history,
        reserve(1, 5, 60),
        at(0),
        Err(ProductRejection::AmountOutOfRange {
            min: amount(10),
            max: amount(500),
        }),
    );
    let mut nearly_full = open_sale(1000);
    nearly_full.extend([reserved(1, 500, 60), reserved(2, 450, 60)]);
    check::<ProductSale>(
        &nearly_full,
        reserve(3, 100, 60),
        at(0),
        Err(ProductRejection::InsufficientQuota {
            available: amount(50),
        }),
    );
    check::<ProductSale>(
        &nearly_full,
        reserve(2, 10, 60),
        at(0),
        Err(ProductRejection::DuplicateOrder),
    );
}

#[test]
fn a_fully_confirmed_product_is_sold_out_and_a_pending_one_is_not() {
    let mut history = open_sale(1000);
    history.extend([reserved(1, 500, 60), reserved(2, 500, 60)]);
    check::<ProductSale>(
        &history,
        reserve(3, 10, 60),
        at(0),
        Err(ProductRejection::InsufficientQuota {
            available: Amount::ZERO,
        }),
    );
    for n in [1, 2] {
        history.push(ProductEvent::ReservationConfirmed {
            order_id: order(n),
            account_id: buyer(),
            amount: amount(500),
        });
    }
    check::<ProductSale>(
        &history,
        reserve(3, 10, 60),
        at(0),
        Err(ProductRejection::SoldOut),
    );
    let sale = ProductSale::replay(&history).sale.unwrap();
    assert_eq!(
        (sale.confirmed, sale.pending, sale.confirmed_orders),
        (amount(1000), Amount::ZERO, 2)
    );
}

#[test]
fn expiry_only_after_the_expiry_time_and_only_of_pending_reservations() {
    let mut history = open_sale(1000);
    history.push(reserved(1, 100, 60));
    let expire = || ProductCommand::Expire { order_id: order(1) };
    check::<ProductSale>(
        &history,
        expire(),
        at(59),
        Err(ProductRejection::NotYetExpired(at(60))),
    );
    let released = ProductEvent::ReservationReleased {
        order_id: order(1),
        account_id: buyer(),
        amount: amount(100),
        reason: ReleaseReason::Expired,
    };
    check::<ProductSale>(&history, expire(), at(60), Ok(vec![released.clone()]));
    history.push(released);
    check::<ProductSale>(
        &history,
        ProductCommand::Confirm { order_id: order(1) },
        at(61),
        Err(ProductRejection::NotPending(ReservationState::Released)),
    );
    check::<ProductSale>(
        &history,
        ProductCommand::Release {
            order_id: order(9),
            reason: ReleaseReason::Cancelled,
        },
        at(61),
        Err(ProductRejection::UnknownOrder),
    );
}

fn opened() -> Vec<AccountEvent> {
    vec![AccountEvent::AccountOpened {
        account_id: buyer(),
        currency: Currency::CNY,
    }]
}

fn deposited(minor: i64, reference: &str) -> AccountEvent {
    AccountEvent::FundsDeposited {
        account_id: buyer(),
        amount: amount(minor),
        reference: reference.into(),
    }
}

fn debit(n: u128, minor: i64, expires: i64) -> AccountCommand {
    AccountCommand::DebitForPurchase {
        order_id: order(n),
        product_id: product(),
        amount: amount(minor),
        reservation_expires_at: at(expires),
        currency: Currency::CNY,
    }
}

#[test]
fn deposits_are_idempotent_on_their_reference() {
    let mut history = opened();
    history.push(deposited(500, "wire-1"));
    let deposit = |minor, reference: &str| AccountCommand::Deposit {
        amount: amount(minor),
        reference: reference.into(),
    };
    check::<CustomerAccount>(&history, deposit(500, "wire-1"), at(0), Ok(vec![]));
    check::<CustomerAccount>(
        &history,
        deposit(501, "wire-1"),
        at(0),
        Err(AccountRejection::ReferenceReused),
    );
    check::<CustomerAccount>(
        &history,
        deposit(0, "wire-2"),
        at(0),
        Err(AccountRejection::NonPositiveAmount),
    );
    check::<CustomerAccount>(
        &history,
        deposit(1, " "),
        at(0),
        Err(AccountRejection::InvalidReference),
    );
    check::<CustomerAccount>(
        &history,
        deposit(7, "wire-2"),
        at(0),
        Ok(vec![deposited(7, "wire-2")]),
    );
    check::<CustomerAccount>(
        &[],
        deposit(7, "wire-2"),
        at(0),
        Err(AccountRejection::NotOpen),
    );
}

#[test]
fn a_debit_needs_funds_and_an_unexpired_reservation() {
    let mut history = opened();
    history.push(deposited(500, "wire-1"));
    let debited = AccountEvent::PurchaseDebited {
        account_id: buyer(),
        order_id: order(1),
        product_id: product(),
        amount: amount(300),
    };
    check::<CustomerAccount>(
        &history,
        debit(1, 300, 60),
        at(59),
        Ok(vec![debited.clone()]),
    );
    check::<CustomerAccount>(
        &history,
        debit(1, 300, 60),
        at(60),
        Err(AccountRejection::ReservationExpired(at(60))),
    );
    check::<CustomerAccount>(
        &history,
        debit(1, 501, 60),
        at(0),
        Err(AccountRejection::InsufficientFunds {
            available: amount(500),
            requested: amount(501),
        }),
    );
    history.push(debited);
    // A retried debit for the same order is already satisfied, even after expiry.
    check::<CustomerAccount>(&history, debit(1, 300, 60), at(90), Ok(vec![]));
    check::<CustomerAccount>(
        &history,
        debit(1, 200, 60),
        at(0),
        Err(AccountRejection::OrderReused),
    );
    let state = CustomerAccount::replay(&history).account.unwrap();
    assert_eq!(
        (state.available, state.total_invested),
        (amount(200), amount(300))
    );
}

#[test]
fn refunds_once_and_withdrawals_within_the_balance() {
    let mut history = opened();
    history.push(deposited(500, "wire-1"));
    history.push(AccountEvent::PurchaseDebited {
        account_id: buyer(),
        order_id: order(1),
        product_id: product(),
        amount: amount(300),
    });
    let refund = AccountCommand::Refund { order_id: order(1) };
    let refunded = AccountEvent::PurchaseRefunded {
        account_id: buyer(),
        order_id: order(1),
        product_id: product(),
        amount: amount(300),
    };
    check::<CustomerAccount>(&history, refund.clone(), at(0), Ok(vec![refunded.clone()]));
    history.push(refunded);
    check::<CustomerAccount>(
        &history,
        refund,
        at(0),
        Err(AccountRejection::AlreadyRefunded),
    );
    let withdraw = |minor| AccountCommand::Withdraw {
        amount: amount(minor),
        reference: "out-1".into(),
    };
    check::<CustomerAccount>(
        &history,
        withdraw(501),
        at(0),
        Err(AccountRejection::InsufficientFunds {
            available: amount(500),
            requested: amount(501),
        }),
    );
    check::<CustomerAccount>(
        &history,
        withdraw(500),
        at(0),
        Ok(vec![AccountEvent::FundsWithdrawn {
            account_id: buyer(),
            amount: amount(500),
            reference: "out-1".into(),
        }]),
    );
}

fn scheduled() -> PayoutEvent {
    PayoutEvent::PayoutScheduled {
        payout_id: PayoutId(Uuid::from_u128(3)),
        product_id: product(),
        account_id: buyer(),
        period: "2026-11".into(),
        kind: PayoutKind::Interest,
        amount: amount(12),
        currency: Currency::CNY,
    }
}

fn attempted(attempt: u32, lease: i64) -> PayoutEvent {
    PayoutEvent::PayoutAttempted {
        attempt,
        idempotency_key: Uuid::from_u128(3).to_string(),
        lease_until: at(lease),
    }
}

#[test]
fn a_payout_is_attempted_once_at_a_time_and_unknowns_are_reconciled_first() {
    let lease = |s| PayoutCommand::Attempt { lease_until: at(s) };
    check::<Payout>(&[scheduled()], lease(30), at(0), Ok(vec![attempted(1, 30)]));
    let in_flight = [scheduled(), attempted(1, 30)];
    check::<Payout>(
        &in_flight,
        lease(40),
        at(1),
        Err(PayoutRejection::WrongStatus(PayoutStatus::InFlight)),
    );
    check::<Payout>(
        &in_flight,
        PayoutCommand::ExpireLease,
        at(29),
        Err(PayoutRejection::LeaseHeld(at(30))),
    );
    let unknown = PayoutEvent::PayoutOutcomeUnknown {
        detail: "lease expired without an outcome".into(),
    };
    check::<Payout>(
        &in_flight,
        PayoutCommand::ExpireLease,
        at(30),
        Ok(vec![unknown.clone()]),
    );
    let after_unknown = [scheduled(), attempted(1, 30), unknown];
    check::<Payout>(
        &after_unknown,
        lease(90),
        at(31),
        Err(PayoutRejection::WrongStatus(PayoutStatus::Unknown)),
    );
    let not_found = PayoutEvent::PayoutReconciled {
        finding: ProviderFinding::NotFound,
    };
    let reconcile = PayoutCommand::Reconcile {
        finding: ProviderFinding::NotFound,
    };
    check::<Payout>(
        &after_unknown,
        reconcile,
        at(31),
        Ok(vec![not_found.clone()]),
    );
    let mut retry = after_unknown.to_vec();
    retry.push(not_found);
    // The second attempt carries the same idempotency key as the first.
    check::<Payout>(&retry, lease(90), at(31), Ok(vec![attempted(2, 90)]));
}

#[test]
fn a_finished_payout_takes_no_further_outcome() {
    let history = [
        scheduled(),
        attempted(1, 30),
        PayoutEvent::PayoutSucceeded {
            provider_ref: "pay-1".into(),
        },
    ];
    let state = Payout::replay(&history).payout.unwrap();
    assert_eq!(
        (state.status, state.provider_ref.as_deref()),
        (PayoutStatus::Succeeded, Some("pay-1"))
    );
    for command in [
        PayoutCommand::Attempt {
            lease_until: at(90),
        },
        PayoutCommand::RecordSucceeded {
            attempt: 1,
            provider_ref: "pay-2".into(),
        },
        PayoutCommand::ExpireLease,
    ] {
        check::<Payout>(
            &history,
            command,
            at(99),
            Err(PayoutRejection::WrongStatus(PayoutStatus::Succeeded)),
        );
    }
}

#[test]
fn a_purchase_reserves_or_records_its_refusal() {
    use domain::product::RefusalReason;
    let history = open_sale(1000);
    let purchase = |n, minor| ProductCommand::Purchase {
        order_id: order(n),
        account_id: buyer(),
        amount: amount(minor),
        expires_at: at(60),
    };
    check::<ProductSale>(
        &history,
        purchase(1, 100),
        at(0),
        Ok(vec![reserved(1, 100, 60)]),
    );
    let refused = ProductEvent::PurchaseRefused {
        order_id: order(1),
        account_id: buyer(),
        amount: amount(5),
        reason: RefusalReason::AmountOutOfRange,
    };
    check::<ProductSale>(&history, purchase(1, 5), at(0), Ok(vec![refused.clone()]));
    let mut after = history.clone();
    after.push(refused);
    // The refused order id is spent: neither a purchase nor a reservation may reuse it.
    check::<ProductSale>(
        &after,
        purchase(1, 100),
        at(0),
        Err(ProductRejection::DuplicateOrder),
    );
    check::<ProductSale>(
        &[],
        purchase(1, 100),
        at(0),
        Err(ProductRejection::NotListed),
    );
    let sale = ProductSale::replay(&after).sale.unwrap();
    assert_eq!((sale.pending, sale.refusals.len()), (Amount::ZERO, 1));
}
