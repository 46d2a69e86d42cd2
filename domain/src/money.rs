//! Money in integer minor units (fen) with checked arithmetic.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an amount could not be built or computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// The result would be below zero.
    #[error("amount would be negative")]
    Negative,
    /// The result would not fit in 63 bits.
    #[error("amount overflows")]
    Overflow,
}

/// A non-negative amount of money in minor units (fen). Arithmetic is checked:
/// an overflow or a negative result is an error, never a wrap.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "i64", into = "i64")]
pub struct Amount(i64);

impl Amount {
    /// Zero minor units.
    pub const ZERO: Amount = Amount(0);
    /// The largest representable amount.
    pub const MAX: Amount = Amount(i64::MAX);
    /// The largest amount, quota, deposit or running total the ledger
    /// accepts: 10^15 minor units (10 trillion yuan). Commands whose effect
    /// would push a balance or total beyond it are refused in `decide`, so
    /// no `evolve` can ever overflow.
    pub const LIMIT: Amount = Amount(1_000_000_000_000_000);

    /// Builds an amount from minor units; negative values are refused.
    pub const fn new(minor: i64) -> Result<Amount, AmountError> {
        if minor < 0 {
            Err(AmountError::Negative)
        } else {
            Ok(Amount(minor))
        }
    }

    /// The amount in minor units.
    pub const fn minor(self) -> i64 {
        self.0
    }

    /// True when the amount is zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// True when the amount is at most `Amount::LIMIT`.
    pub const fn within_limit(self) -> bool {
        self.0 <= Amount::LIMIT.0
    }

    /// `self + other` if the sum stays within `Amount::LIMIT`.
    pub fn add_within_limit(self, other: Amount) -> Option<Amount> {
        self.checked_add(other)
            .ok()
            .filter(|sum| sum.within_limit())
    }

    /// `self + other`, or `Overflow`.
    pub fn checked_add(self, other: Amount) -> Result<Amount, AmountError> {
        self.0
            .checked_add(other.0)
            .map(Amount)
            .ok_or(AmountError::Overflow)
    }

    /// `self - other`, or `Negative` when `other > self`.
    pub fn checked_sub(self, other: Amount) -> Result<Amount, AmountError> {
        if other.0 > self.0 {
            return Err(AmountError::Negative);
        }
        Ok(Amount(self.0 - other.0))
    }

    /// `self * numerator / denominator`, rounded down, computed in 128 bits so
    /// the intermediate product cannot overflow. Used for interest.
    pub fn mul_div_floor(self, numerator: u64, denominator: u64) -> Result<Amount, AmountError> {
        assert!(denominator > 0, "BUG: mul_div_floor by zero");
        let wide = i128::from(self.0) * i128::from(numerator) / i128::from(denominator);
        i64::try_from(wide)
            .map(Amount)
            .map_err(|_| AmountError::Overflow)
    }
}

impl TryFrom<i64> for Amount {
    type Error = AmountError;
    fn try_from(minor: i64) -> Result<Self, Self::Error> {
        Amount::new(minor)
    }
}

impl From<Amount> for i64 {
    fn from(amount: Amount) -> i64 {
        amount.0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a currency code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("currency must be three upper-case ASCII letters, got {0:?}")]
pub struct CurrencyError(pub String);

/// An ISO 4217 currency code such as `CNY`. Amounts are in its minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// Chinese yuan; minor unit fen. The platform's default currency.
    pub const CNY: Currency = Currency(*b"CNY");

    /// Parses a three-letter upper-case code.
    pub fn parse(code: &str) -> Result<Currency, CurrencyError> {
        let bytes = code.as_bytes();
        if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_uppercase) {
            return Err(CurrencyError(code.to_owned()));
        }
        Ok(Currency([bytes[0], bytes[1], bytes[2]]))
    }

    /// The code as a string slice.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("BUG: currency holds ASCII only")
    }
}

impl Default for Currency {
    fn default() -> Self {
        Currency::CNY
    }
}

impl TryFrom<String> for Currency {
    type Error = CurrencyError;
    fn try_from(code: String) -> Result<Self, Self::Error> {
        Currency::parse(&code)
    }
}

impl From<Currency> for String {
    fn from(currency: Currency) -> String {
        currency.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_checked() {
        let one = Amount::new(1).unwrap();
        assert_eq!(Amount::new(-1), Err(AmountError::Negative));
        assert_eq!(Amount::MAX.checked_add(one), Err(AmountError::Overflow));
        assert_eq!(Amount::ZERO.checked_sub(one), Err(AmountError::Negative));
        assert_eq!(one.checked_add(one).unwrap().minor(), 2);
        assert_eq!(
            Amount::MAX.mul_div_floor(2, 1),
            Err(AmountError::Overflow),
            "a product that does not fit is an error"
        );
        assert_eq!(
            Amount::new(1_000_000)
                .unwrap()
                .mul_div_floor(365, 10_000)
                .unwrap()
                .minor(),
            36_500
        );
    }

    #[test]
    fn serde_refuses_negative_amounts_and_bad_currencies() {
        assert!(serde_json::from_str::<Amount>("-5").is_err());
        assert_eq!(serde_json::from_str::<Amount>("5").unwrap().minor(), 5);
        assert!(serde_json::from_str::<Currency>("\"cny\"").is_err());
        assert!(serde_json::from_str::<Currency>("\"CNYY\"").is_err());
        assert_eq!(serde_json::to_string(&Currency::CNY).unwrap(), "\"CNY\"");
    }
}
