//! Double-entry postings: every money-moving event exposes balanced postings.

use crate::ids::{AccountId, ProductId};
use crate::money::Amount;
use serde::{Deserialize, Serialize};

/// A ledger account in the platform's chart of accounts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LedgerAccount {
    /// Money the platform holds for a customer, free to spend or withdraw.
    CustomerAvailable {
        /// The customer account.
        account_id: AccountId,
    },
    /// Money customers invested in a product (funding raised).
    ProductFunding {
        /// The product.
        product_id: ProductId,
    },
    /// Interest the platform owes on a product, paid out to holders.
    ProductInterest {
        /// The product.
        product_id: ProductId,
    },
    /// The platform's cash at its banks and payment providers.
    PlatformCash,
}

/// Which side of a ledger account a posting lands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Left side.
    Debit,
    /// Right side.
    Credit,
}

/// One line of a balanced entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    /// The account posted to.
    pub account: LedgerAccount,
    /// Debit or credit.
    pub side: Side,
    /// Always positive.
    pub amount: Amount,
}

impl Posting {
    /// The posting's effect in the customer's view of their available balance:
    /// a credit raises it (positive), a debit lowers it (negative).
    pub fn signed_minor(&self) -> i128 {
        match self.side {
            Side::Credit => i128::from(self.amount.minor()),
            Side::Debit => -i128::from(self.amount.minor()),
        }
    }
}

/// A transfer of `amount` from `debit` to `credit`: the two postings of one entry.
pub fn transfer(debit: LedgerAccount, credit: LedgerAccount, amount: Amount) -> Vec<Posting> {
    vec![
        Posting {
            account: debit,
            side: Side::Debit,
            amount,
        },
        Posting {
            account: credit,
            side: Side::Credit,
            amount,
        },
    ]
}

/// True when the debits equal the credits and every amount is positive.
pub fn is_balanced(postings: &[Posting]) -> bool {
    let positive = postings.iter().all(|p| !p.amount.is_zero());
    let net: i128 = postings.iter().map(Posting::signed_minor).sum();
    positive && net == 0
}
