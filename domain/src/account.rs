//! The customer account: deposits, purchase debits for reservations, refunds,
//! payout credits and withdrawals. Invariant: the available balance is never
//! negative, and it always equals the sum of the account's postings.

use crate::decider::{Decider, EventType};
use crate::ids::{AccountId, OrderId, PayoutId, ProductId, validate_reference};
use crate::money::{Amount, Currency};
use crate::payout::PayoutKind;
use crate::posting::{LedgerAccount, Posting, transfer};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A purchase debit the account remembers, so refunds and retries can be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    /// The product bought.
    pub product_id: ProductId,
    /// Amount debited.
    pub amount: Amount,
    /// Whether it was refunded.
    pub refunded: bool,
}

/// An opened account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAccount {
    /// The account.
    pub account_id: AccountId,
    /// Its currency.
    pub currency: Currency,
    /// Spendable balance.
    pub available: Amount,
    /// Sum of deposits.
    pub total_deposited: Amount,
    /// Sum of purchase debits, less refunds.
    pub total_invested: Amount,
    /// Sum of payout credits.
    pub total_paid_out: Amount,
    /// Sum of withdrawals.
    pub total_withdrawn: Amount,
    /// Deposits by reference (a repeat of a reference is not a second deposit).
    pub deposits: HashMap<String, Amount>,
    /// Withdrawals by reference.
    pub withdrawals: HashMap<String, Amount>,
    /// Purchase debits by order.
    pub purchases: HashMap<OrderId, Purchase>,
    /// Payout credits by payout.
    pub payouts: HashMap<PayoutId, Amount>,
}

/// An account stream's state: nothing until opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountState {
    /// The account, once opened.
    pub account: Option<OpenAccount>,
}

/// What may be asked of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    /// Open the account.
    Open {
        /// The account.
        account_id: AccountId,
        /// Its currency.
        currency: Currency,
    },
    /// Money arrived from outside; idempotent on `reference`.
    Deposit {
        /// How much.
        amount: Amount,
        /// The external reference, unique per account.
        reference: String,
    },
    /// Pay for a reservation; refused once the reservation has expired.
    DebitForPurchase {
        /// The order (and reservation).
        order_id: OrderId,
        /// The product.
        product_id: ProductId,
        /// How much.
        amount: Amount,
        /// The reservation's expiry.
        reservation_expires_at: DateTime<Utc>,
        /// The product's currency; the account must hold the same.
        currency: Currency,
    },
    /// Give a purchase's money back.
    Refund {
        /// The order debited earlier.
        order_id: OrderId,
    },
    /// A payout succeeded: credit the holder; idempotent on the payout id.
    CreditPayout {
        /// The payout.
        payout_id: PayoutId,
        /// Its product.
        product_id: ProductId,
        /// Interest or principal.
        kind: PayoutKind,
        /// How much.
        amount: Amount,
    },
    /// Money leaves to the customer's bank; idempotent on `reference`.
    Withdraw {
        /// How much.
        amount: Amount,
        /// The external reference, unique per account.
        reference: String,
    },
}

/// Why an account command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountRejection {
    /// The account was never opened.
    #[error("account is not open")]
    NotOpen,
    /// Open was asked twice.
    #[error("account is already open")]
    AlreadyOpen,
    /// Amounts must be positive.
    #[error("amount must be positive")]
    NonPositiveAmount,
    /// The reference is empty, too long or has control characters.
    #[error("invalid reference")]
    InvalidReference,
    /// The reference was used before with another amount.
    #[error("reference already used with another amount")]
    ReferenceReused,
    /// The available balance is below the amount.
    #[error("available balance {available} is below {requested}")]
    InsufficientFunds {
        /// What the account has.
        available: Amount,
        /// What was asked.
        requested: Amount,
    },
    /// The reservation paid for has expired.
    #[error("the reservation expired at {0}")]
    ReservationExpired(DateTime<Utc>),
    /// The order was debited before with another amount or product.
    #[error("order already debited with other terms")]
    OrderReused,
    /// No debit exists for the order.
    #[error("no purchase debit for this order")]
    UnknownOrder,
    /// The order was refunded already.
    #[error("order already refunded")]
    AlreadyRefunded,
    /// The payout was credited before with another amount.
    #[error("payout already credited with another amount")]
    PayoutReused,
    /// The amount, or a balance or total it would move, is beyond
    /// `Amount::LIMIT`.
    #[error("{0} would exceed the limit of 10^15 minor units")]
    LimitExceeded(&'static str),
    /// The product is sold in another currency than the account holds.
    #[error("the product is in {product}, the account in {account}")]
    CurrencyMismatch {
        /// The account's currency.
        account: Currency,
        /// The product's currency.
        product: Currency,
    },
}

/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum AccountEvent {
    /// The account exists.
    AccountOpened {
        /// The account.
        account_id: AccountId,
        /// Its currency.
        currency: Currency,
    },
    /// Money arrived.
    FundsDeposited {
        /// The account.
        account_id: AccountId,
        /// How much.
        amount: Amount,
        /// External reference.
        reference: String,
    },
    /// The buyer paid for a reservation.
    PurchaseDebited {
        /// The account.
        account_id: AccountId,
        /// The order.
        order_id: OrderId,
        /// The product.
        product_id: ProductId,
        /// How much.
        amount: Amount,
    },
    /// A purchase's money came back.
    PurchaseRefunded {
        /// The account.
        account_id: AccountId,
        /// The order.
        order_id: OrderId,
        /// The product.
        product_id: ProductId,
        /// How much.
        amount: Amount,
    },
    /// Interest or principal was paid to the holder.
    PayoutCredited {
        /// The account.
        account_id: AccountId,
        /// The payout.
        payout_id: PayoutId,
        /// The product.
        product_id: ProductId,
        /// Interest or principal.
        kind: PayoutKind,
        /// How much.
        amount: Amount,
    },
    /// Money left to the customer's bank.
    FundsWithdrawn {
        /// The account.
        account_id: AccountId,
        /// How much.
        amount: Amount,
        /// External reference.
        reference: String,
    },
}

impl EventType for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::AccountOpened { .. } => "account_opened",
            AccountEvent::FundsDeposited { .. } => "funds_deposited",
            AccountEvent::PurchaseDebited { .. } => "purchase_debited",
            AccountEvent::PurchaseRefunded { .. } => "purchase_refunded",
            AccountEvent::PayoutCredited { .. } => "payout_credited",
            AccountEvent::FundsWithdrawn { .. } => "funds_withdrawn",
        }
    }

    /// `account_opened` is at version 2: version 1, from before accounts
    /// had a currency, carried none (upcast on load as CNY, see
    /// `store::upcast`).
    fn schema_version(&self) -> u16 {
        match self {
            AccountEvent::AccountOpened { .. } => 2,
            _ => 1,
        }
    }
}

impl AccountEvent {
    /// The balanced postings of this event (empty for events that move no money).
    pub fn postings(&self) -> Vec<Posting> {
        let customer = |account_id: &AccountId| LedgerAccount::CustomerAvailable {
            account_id: *account_id,
        };
        let funding = |product_id: &ProductId| LedgerAccount::ProductFunding {
            product_id: product_id.clone(),
        };
        match self {
            AccountEvent::AccountOpened { .. } => vec![],
            AccountEvent::FundsDeposited {
                account_id, amount, ..
            } => transfer(LedgerAccount::PlatformCash, customer(account_id), *amount),
            AccountEvent::PurchaseDebited {
                account_id,
                product_id,
                amount,
                ..
            } => transfer(customer(account_id), funding(product_id), *amount),
            AccountEvent::PurchaseRefunded {
                account_id,
                product_id,
                amount,
                ..
            } => transfer(funding(product_id), customer(account_id), *amount),
            AccountEvent::PayoutCredited {
                account_id,
                product_id,
                kind,
                amount,
                ..
            } => {
                let source = match kind {
                    PayoutKind::Interest => LedgerAccount::ProductInterest {
                        product_id: product_id.clone(),
                    },
                    PayoutKind::Principal => funding(product_id),
                };
                transfer(source, customer(account_id), *amount)
            }
            AccountEvent::FundsWithdrawn {
                account_id, amount, ..
            } => transfer(customer(account_id), LedgerAccount::PlatformCash, *amount),
        }
    }
}

/// The customer account decider.
pub struct CustomerAccount;

impl Decider for CustomerAccount {
    type State = AccountState;
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Rejection = AccountRejection;

    fn decide(
        state: &AccountState,
        command: &AccountCommand,
        now: DateTime<Utc>,
    ) -> Result<Vec<AccountEvent>, AccountRejection> {
        let account = match (&state.account, command) {
            (
                None,
                AccountCommand::Open {
                    account_id,
                    currency,
                },
            ) => {
                return Ok(vec![AccountEvent::AccountOpened {
                    account_id: *account_id,
                    currency: *currency,
                }]);
            }
            (None, _) => return Err(AccountRejection::NotOpen),
            (Some(_), AccountCommand::Open { .. }) => return Err(AccountRejection::AlreadyOpen),
            (Some(account), _) => account,
        };
        let event = match command {
            AccountCommand::Open { .. } => unreachable!("BUG: handled above"),
            AccountCommand::Deposit { amount, reference } => {
                decide_deposit(account, *amount, reference)?
            }
            AccountCommand::DebitForPurchase {
                order_id,
                product_id,
                amount,
                reservation_expires_at,
                currency,
            } => decide_debit(
                account,
                Debit {
                    order_id: *order_id,
                    product_id,
                    amount: *amount,
                    reservation_expires_at: *reservation_expires_at,
                    currency: *currency,
                },
                now,
            )?,
            AccountCommand::Refund { order_id } => decide_refund(account, *order_id)?,
            AccountCommand::CreditPayout {
                payout_id,
                product_id,
                kind,
                amount,
            } => decide_payout_credit(account, *payout_id, product_id, *kind, *amount)?,
            AccountCommand::Withdraw { amount, reference } => {
                decide_withdrawal(account, *amount, reference)?
            }
        };
        Ok(event.into_iter().collect())
    }

    fn evolve(mut state: AccountState, event: &AccountEvent) -> AccountState {
        if let AccountEvent::AccountOpened {
            account_id,
            currency,
        } = event
        {
            assert!(state.account.is_none(), "BUG: account opened twice");
            state.account = Some(OpenAccount {
                account_id: *account_id,
                currency: *currency,
                available: Amount::ZERO,
                total_deposited: Amount::ZERO,
                total_invested: Amount::ZERO,
                total_paid_out: Amount::ZERO,
                total_withdrawn: Amount::ZERO,
                deposits: HashMap::new(),
                withdrawals: HashMap::new(),
                purchases: HashMap::new(),
                payouts: HashMap::new(),
            });
            return state;
        }
        let account = state
            .account
            .as_mut()
            .expect("BUG: account event before opening");
        evolve_open(account, event);
        state
    }
}

fn positive(amount: Amount) -> Result<(), AccountRejection> {
    if amount.is_zero() {
        return Err(AccountRejection::NonPositiveAmount);
    }
    if !amount.within_limit() {
        return Err(AccountRejection::LimitExceeded("the amount"));
    }
    Ok(())
}

/// `total + amount`, refused beyond `Amount::LIMIT`.
fn raise(total: Amount, amount: Amount, what: &'static str) -> Result<(), AccountRejection> {
    total
        .add_within_limit(amount)
        .map(|_| ())
        .ok_or(AccountRejection::LimitExceeded(what))
}

/// A purchase debit as `decide_debit` checks it.
struct Debit<'a> {
    order_id: OrderId,
    product_id: &'a ProductId,
    amount: Amount,
    reservation_expires_at: DateTime<Utc>,
    currency: Currency,
}

fn decide_deposit(
    account: &OpenAccount,
    amount: Amount,
    reference: &str,
) -> Result<Option<AccountEvent>, AccountRejection> {
    positive(amount)?;
    validate_reference(reference).map_err(|_| AccountRejection::InvalidReference)?;
    match account.deposits.get(reference) {
        Some(earlier) if *earlier == amount => return Ok(None),
        Some(_) => return Err(AccountRejection::ReferenceReused),
        None => {}
    }
    raise(account.available, amount, "the available balance")?;
    raise(
        account.total_deposited,
        amount,
        "the account's total deposited",
    )?;
    Ok(Some(AccountEvent::FundsDeposited {
        account_id: account.account_id,
        amount,
        reference: reference.to_owned(),
    }))
}

fn decide_debit(
    account: &OpenAccount,
    debit: Debit<'_>,
    now: DateTime<Utc>,
) -> Result<Option<AccountEvent>, AccountRejection> {
    let Debit {
        order_id,
        product_id,
        amount,
        reservation_expires_at,
        currency,
    } = debit;
    positive(amount)?;
    if let Some(earlier) = account.purchases.get(&order_id) {
        if earlier.amount == amount && earlier.product_id == *product_id {
            return Ok(None);
        }
        return Err(AccountRejection::OrderReused);
    }
    if currency != account.currency {
        return Err(AccountRejection::CurrencyMismatch {
            account: account.currency,
            product: currency,
        });
    }
    if now >= reservation_expires_at {
        return Err(AccountRejection::ReservationExpired(reservation_expires_at));
    }
    raise(
        account.total_invested,
        amount,
        "the account's total invested",
    )?;
    if account.available < amount {
        return Err(AccountRejection::InsufficientFunds {
            available: account.available,
            requested: amount,
        });
    }
    Ok(Some(AccountEvent::PurchaseDebited {
        account_id: account.account_id,
        order_id,
        product_id: product_id.clone(),
        amount,
    }))
}

fn decide_refund(
    account: &OpenAccount,
    order_id: OrderId,
) -> Result<Option<AccountEvent>, AccountRejection> {
    let purchase = account
        .purchases
        .get(&order_id)
        .ok_or(AccountRejection::UnknownOrder)?;
    if purchase.refunded {
        return Err(AccountRejection::AlreadyRefunded);
    }
    raise(account.available, purchase.amount, "the available balance")?;
    Ok(Some(AccountEvent::PurchaseRefunded {
        account_id: account.account_id,
        order_id,
        product_id: purchase.product_id.clone(),
        amount: purchase.amount,
    }))
}

fn decide_payout_credit(
    account: &OpenAccount,
    payout_id: PayoutId,
    product_id: &ProductId,
    kind: PayoutKind,
    amount: Amount,
) -> Result<Option<AccountEvent>, AccountRejection> {
    positive(amount)?;
    match account.payouts.get(&payout_id) {
        Some(earlier) if *earlier == amount => return Ok(None),
        Some(_) => return Err(AccountRejection::PayoutReused),
        None => {}
    }
    raise(account.available, amount, "the available balance")?;
    raise(
        account.total_paid_out,
        amount,
        "the account's total paid out",
    )?;
    Ok(Some(AccountEvent::PayoutCredited {
        account_id: account.account_id,
        payout_id,
        product_id: product_id.clone(),
        kind,
        amount,
    }))
}

fn decide_withdrawal(
    account: &OpenAccount,
    amount: Amount,
    reference: &str,
) -> Result<Option<AccountEvent>, AccountRejection> {
    positive(amount)?;
    validate_reference(reference).map_err(|_| AccountRejection::InvalidReference)?;
    match account.withdrawals.get(reference) {
        Some(earlier) if *earlier == amount => return Ok(None),
        Some(_) => return Err(AccountRejection::ReferenceReused),
        None => {}
    }
    if account.available < amount {
        return Err(AccountRejection::InsufficientFunds {
            available: account.available,
            requested: amount,
        });
    }
    raise(
        account.total_withdrawn,
        amount,
        "the account's total withdrawn",
    )?;
    Ok(Some(AccountEvent::FundsWithdrawn {
        account_id: account.account_id,
        amount,
        reference: reference.to_owned(),
    }))
}

fn evolve_open(account: &mut OpenAccount, event: &AccountEvent) {
    const OVERFLOW: &str = "BUG: balance overflow in a stored event";
    const NEGATIVE: &str = "BUG: stored event makes the balance negative";
    match event {
        AccountEvent::AccountOpened { .. } => unreachable!("BUG: handled by evolve"),
        AccountEvent::FundsDeposited {
            amount, reference, ..
        } => {
            account.available = account.available.checked_add(*amount).expect(OVERFLOW);
            account.total_deposited = account
                .total_deposited
                .checked_add(*amount)
                .expect(OVERFLOW);
            account.deposits.insert(reference.clone(), *amount);
        }
        AccountEvent::PurchaseDebited {
            order_id,
            product_id,
            amount,
            ..
        } => {
            account.available = account.available.checked_sub(*amount).expect(NEGATIVE);
            account.total_invested = account.total_invested.checked_add(*amount).expect(OVERFLOW);
            let purchase = Purchase {
                product_id: product_id.clone(),
                amount: *amount,
                refunded: false,
            };
            let previous = account.purchases.insert(*order_id, purchase);
            assert!(previous.is_none(), "BUG: order debited twice");
        }
        AccountEvent::PurchaseRefunded {
            order_id, amount, ..
        } => {
            let purchase = account
                .purchases
                .get_mut(order_id)
                .expect("BUG: refund of an unknown order");
            assert!(!purchase.refunded, "BUG: order refunded twice");
            purchase.refunded = true;
            account.available = account.available.checked_add(*amount).expect(OVERFLOW);
            account.total_invested = account.total_invested.checked_sub(*amount).expect(NEGATIVE);
        }
        AccountEvent::PayoutCredited {
            payout_id, amount, ..
        } => {
            account.available = account.available.checked_add(*amount).expect(OVERFLOW);
            account.total_paid_out = account.total_paid_out.checked_add(*amount).expect(OVERFLOW);
            let previous = account.payouts.insert(*payout_id, *amount);
            assert!(previous.is_none(), "BUG: payout credited twice");
        }
        AccountEvent::FundsWithdrawn {
            amount, reference, ..
        } => {
            account.available = account.available.checked_sub(*amount).expect(NEGATIVE);
            account.total_withdrawn = account
                .total_withdrawn
                .checked_add(*amount)
                .expect(OVERFLOW);
            account.withdrawals.insert(reference.clone(), *amount);
        }
    }
}
