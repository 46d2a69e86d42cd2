//! Identifier newtypes and the stream names derived from them.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Longest caller-chosen identifier or reference accepted, in bytes.
pub const IDENTIFIER_LENGTH_MAX: usize = 64;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "identifier must be 1 to {IDENTIFIER_LENGTH_MAX} characters of A-Z a-z 0-9 '-' '_' '.', got {0:?}"
)]
pub struct IdentifierError(pub String);

/// Checks a caller-chosen identifier: short, printable ASCII, no separators
/// that could be confused in stream names or logs.
pub fn validate_identifier(text: &str) -> Result<(), IdentifierError> {
    let acceptable = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if text.is_empty() || text.len() > IDENTIFIER_LENGTH_MAX || !text.chars().all(acceptable) {
        return Err(IdentifierError(text.to_owned()));
    }
    Ok(())
}

/// A product's id: caller-chosen or a UUID, validated by [`validate_identifier`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProductId(String);

impl ProductId {
    /// Validates and wraps a product id.
    pub fn parse(text: &str) -> Result<ProductId, IdentifierError> {
        validate_identifier(text)?;
        Ok(ProductId(text.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The product's event stream: `product-{id}`.
    pub fn stream(&self) -> String {
        format!("product-{}", self.0)
    }
}

impl TryFrom<String> for ProductId {
    type Error = IdentifierError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        validate_identifier(&text)?;
        Ok(ProductId(text))
    }
}

impl From<ProductId> for String {
    fn from(id: ProductId) -> String {
        id.0
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// The event stream of this entity.
            pub fn stream(&self) -> String {
                format!(concat!($prefix, "-{}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A customer account's id; its stream is `account-{id}`.
    AccountId,
    "account"
);
uuid_id!(
    /// An order's id, which is also the id of its quota reservation.
    OrderId,
    "order"
);
uuid_id!(
    /// A payout's id, derived by the shell from (product, period, holder);
    /// its stream is `payout-{id}`.
    PayoutId,
    "payout"
);

/// Why a free-text reference (deposit or withdrawal reference, period label) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reference must be 1 to 128 printable characters without control characters")]
pub struct ReferenceError;

/// Longest reference accepted, in characters.
pub const REFERENCE_LENGTH_MAX: usize = 128;

/// Checks a free-text reference: non-empty after trimming, bounded, no control characters.
pub fn validate_reference(text: &str) -> Result<(), ReferenceError> {
    let length = text.chars().count();
    if text.trim().is_empty()
        || text.trim() != text
        || length > REFERENCE_LENGTH_MAX
        || text.chars().any(char::is_control)
    {
        return Err(ReferenceError);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated() {
        assert!(ProductId::parse("bond-2026_Q4.a").is_ok());
        for bad in [
            "",
            " x",
            "a/b",
            "a b",
            "x'; DROP TABLE events;--",
            "ä",
            &"a".repeat(65),
        ] {
            assert!(ProductId::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(serde_json::from_str::<ProductId>("\"a b\"").is_err());
        assert_eq!(ProductId::parse("p1").unwrap().stream(), "product-p1");
    }

    #[test]
    fn references_are_validated() {
        assert!(validate_reference("bank-transfer 2026/11/26 #42").is_ok());
        for bad in [
            "",
            "   ",
            " lead",
            "trail ",
            "a\nb",
            "a\u{0}b",
            &"r".repeat(129),
        ] {
            assert!(validate_reference(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
