//! What the engine answers when it cannot do what was asked.

use domain::Amount;
use domain::account::AccountRejection;
use domain::product::ProductRejection;
use store::StoreError;

/// Why a purchase did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PurchaseError {
    /// No such product.
    #[error("no such product")]
    UnknownProduct,
    /// The sale is not open.
    #[error("the sale is not open")]
    SaleNotOpen,
    /// Everything is sold.
    #[error("sold out")]
    SoldOut,
    /// Less quota is available than asked for.
    #[error("insufficient quota")]
    InsufficientQuota,
    /// Below the minimum or above the maximum purchase.
    #[error("amount must be between {min} and {max}")]
    AmountOutOfRange {
        /// Smallest accepted.
        min: Amount,
        /// Largest accepted.
        max: Amount,
    },
    /// The buyer's available balance is below the amount.
    #[error("insufficient funds")]
    InsufficientFunds,
    /// The payment could not be taken (account missing or closed).
    #[error("payment failed")]
    PaymentFailed,
    /// The buyer's account is in another currency than the product.
    #[error("the account's currency is not the product's")]
    CurrencyMismatch,
    /// The reservation expired before the payment.
    #[error("the reservation expired before payment")]
    Expired,
    /// The idempotency key was used before for another purchase.
    #[error("idempotency key already used for another purchase")]
    KeyReused,
    /// The idempotency key or amount is malformed.
    #[error("invalid purchase: {0}")]
    Invalid(String),
    /// The product's queue is full: try again shortly.
    #[error("overloaded")]
    Overloaded,
    /// The store is unavailable: try again shortly. The purchase may still
    /// complete; retrying with the same key is safe.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// Another node owns the product's writer: ask it (the API forwards).
    #[error("the product is owned by node {}", .0.node_id)]
    NotOwner(store::lease::NodeAddress),
}

/// Why an administrative command (list, open, close, deposit...) failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The product refused.
    #[error(transparent)]
    Product(#[from] ProductRejection),
    /// The account refused.
    #[error(transparent)]
    Account(#[from] AccountRejection),
    /// Another writer kept winning; try again.
    #[error("too much contention on {0}; try again")]
    Contention(String),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The command is not for callers of this entry point.
    #[error("not allowed: {0}")]
    NotAllowed(&'static str),
    /// The event store cannot be reached; try again.
    #[error("the event store is unavailable")]
    Unavailable,
    /// Another node owns the product's writer: ask it (the API forwards).
    #[error("the product is owned by node {}", .0.node_id)]
    NotOwner(store::lease::NodeAddress),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
