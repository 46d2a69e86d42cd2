//! The pure domain of the ledger: money, identifiers, double-entry postings,
//! events, and the deciders for the product sale, the customer account and
//! the payout.
//!
//! Nothing here performs I/O, reads a clock, generates randomness or knows
//! about async, SQL or HTTP: the shell stamps time and ids onto commands.

pub mod account;
pub mod decider;
pub mod ids;
pub mod money;
pub mod payout;
pub mod posting;
pub mod product;

pub use decider::{Decider, EventType};
pub use ids::{AccountId, OrderId, PayoutId, ProductId};
pub use money::{Amount, AmountError, Currency};
