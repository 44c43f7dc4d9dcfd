//! Fixed-point integers for price and quantity, and their exact decimal-string form.
//!
//! A `Price` counts units of `10^-price_decimals` of the quote token; a `Qty` counts units of
//! `10^-size_decimals` of the base token. Parsing is exact (no floats anywhere) and every failure
//! names the rule the input broke, so the wire layer can tell a client what to fix.
//! This module must never round: a value that does not fit exactly is an error.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The most decimals a market may declare for prices or sizes (`10^18` still fits in `u64`).
pub const DECIMALS_MAX: u8 = 18;

/// The longest decimal string accepted; anything longer cannot be a valid `u64` amount.
pub const DECIMAL_LEN_MAX: usize = 40;

/// A price in integer units of `10^-price_decimals` (not yet divided by the tick).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Price(pub u64);

/// A quantity in integer units of `10^-size_decimals` (not yet divided by the lot).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Qty(pub u64);

impl Qty {
    pub const ZERO: Qty = Qty(0);
}

/// Why a decimal string was refused. The caller adds the field name and market.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecimalError {
    Empty,
    Whitespace,
    Negative,
    Exponent,
    Malformed,
    TooManyDecimals { decimals: usize, allowed: u8 },
    Overflow,
}

impl DecimalError {
    /// A sentence for a client: `describe("price", "65000.555", "BTC-USDC")`.
    pub fn describe(&self, field: &str, input: &str, market: &str) -> String {
        let shown: String = input.chars().take(DECIMAL_LEN_MAX + 4).collect();
        match self {
            DecimalError::Empty => {
                format!("{field} is empty; send a decimal string such as \"1.5\"")
            }
            DecimalError::Whitespace => format!(
                "{field} {shown:?} contains whitespace; send the digits only, such as \"1.5\""
            ),
            DecimalError::Negative => format!("{field} {shown} is negative; it must be above zero"),
            DecimalError::Exponent => format!(
                "{field} {shown} uses exponent notation; write it out in plain digits, such as \"0.0001\""
            ),
            DecimalError::Malformed => format!(
                "{field} {shown:?} is not a decimal number; send digits with at most one '.', such as \"65000.50\""
            ),
            DecimalError::TooManyDecimals { decimals, allowed } => {
                format!("{field} {shown} has {decimals} decimals; {market} allows {allowed}")
            }
            DecimalError::Overflow => format!(
                "{field} {shown} is too large; the largest amount {market} can hold is {}",
                u64::MAX
            ),
        }
    }
}

/// Parses a non-negative decimal string into integer units of `10^-decimals`.
///
/// Accepts `"65000"`, `"65000.5"`, `"65000.50"`, and trailing zeros past `decimals`
/// (`"1.500"` with 2 decimals is exactly 1.50). Refuses signs, exponents, whitespace, a bare
/// `"."`, `".5"` and `"5."`, non-zero digits past `decimals`, and anything above `u64::MAX` units.
pub fn parse_decimal(input: &str, decimals: u8) -> Result<u64, DecimalError> {
    let bytes = input.as_bytes();
    if bytes.is_empty() {
        return Err(DecimalError::Empty);
    }
    if bytes.iter().any(|b| b.is_ascii_whitespace()) {
        return Err(DecimalError::Whitespace);
    }
    if bytes[0] == b'-' {
        return Err(DecimalError::Negative);
    }
    if bytes.iter().any(|&b| b == b'e' || b == b'E') {
        return Err(DecimalError::Exponent);
    }
    if bytes.len() > DECIMAL_LEN_MAX {
        return if bytes.iter().all(|b| b.is_ascii_digit() || *b == b'.') {
            Err(DecimalError::Overflow)
        } else {
            Err(DecimalError::Malformed)
        };
    }
    let (int_part, frac_part) = match input.find('.') {
        Some(dot) => (&bytes[..dot], &bytes[dot + 1..]),
        None => (bytes, &bytes[..0]),
    };
    let has_dot = int_part.len() != bytes.len();
    if int_part.is_empty()
        || (has_dot && frac_part.is_empty())
        || !int_part.iter().all(u8::is_ascii_digit)
        || !frac_part.iter().all(u8::is_ascii_digit)
    {
        return Err(DecimalError::Malformed);
    }
    // Digits past the allowed decimals must all be zero.
    let significant = frac_part
        .iter()
        .rposition(|&b| b != b'0')
        .map_or(0, |last| last + 1);
    if significant > decimals as usize {
        return Err(DecimalError::TooManyDecimals {
            decimals: significant,
            allowed: decimals,
        });
    }
    let mut value: u64 = 0;
    for &digit in int_part {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit - b'0')))
            .ok_or(DecimalError::Overflow)?;
    }
    for i in 0..decimals as usize {
        let digit = frac_part.get(i).map_or(0, |d| d - b'0');
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit)))
            .ok_or(DecimalError::Overflow)?;
    }
    Ok(value)
}

/// Writes `units` as a decimal with exactly `decimals` digits after the point (`"65000.50"`).
pub fn write_decimal(out: &mut impl fmt::Write, units: u64, decimals: u8) -> fmt::Result {
    if decimals == 0 {
        return write!(out, "{units}");
    }
    let scale = 10u64.pow(u32::from(decimals));
    write!(
        out,
        "{}.{:0width$}",
        units / scale,
        units % scale,
        width = decimals as usize
    )
}

/// `write_decimal` into a new `String`.
pub fn format_decimal(units: u64, decimals: u8) -> String {
    let mut s = String::with_capacity(24);
    // Writing into a String cannot fail.
    let _ = write_decimal(&mut s, units, decimals);
    s
}

/// `10^decimals`, for `decimals <= DECIMALS_MAX`.
pub fn pow10(decimals: u8) -> u64 {
    10u64.pow(u32::from(decimals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_values() {
        assert_eq!(parse_decimal("65000.50", 2), Ok(6_500_050));
        assert_eq!(parse_decimal("65000.5", 2), Ok(6_500_050));
        assert_eq!(parse_decimal("65000", 2), Ok(6_500_000));
        assert_eq!(parse_decimal("0.015", 8), Ok(1_500_000));
        assert_eq!(parse_decimal("1.500", 2), Ok(150));
        assert_eq!(parse_decimal("007", 0), Ok(7));
        assert_eq!(parse_decimal("0", 2), Ok(0));
        assert_eq!(parse_decimal("18446744073709551615", 0), Ok(u64::MAX));
        assert_eq!(parse_decimal("184467440737.09551615", 8), Ok(u64::MAX));
    }

    #[test]
    fn refuses_each_rule_by_name() {
        use DecimalError::*;
        assert_eq!(parse_decimal("", 2), Err(Empty));
        assert_eq!(parse_decimal(" 1.5", 2), Err(Whitespace));
        assert_eq!(parse_decimal("1.5 ", 2), Err(Whitespace));
        assert_eq!(parse_decimal("1 5", 2), Err(Whitespace));
        assert_eq!(parse_decimal("-1.5", 2), Err(Negative));
        assert_eq!(parse_decimal("1e5", 2), Err(Exponent));
        assert_eq!(parse_decimal("1.5E2", 2), Err(Exponent));
        assert_eq!(parse_decimal("+1.5", 2), Err(Malformed));
        assert_eq!(parse_decimal(".5", 2), Err(Malformed));
        assert_eq!(parse_decimal("5.", 2), Err(Malformed));
        assert_eq!(parse_decimal(".", 2), Err(Malformed));
        assert_eq!(parse_decimal("1.2.3", 2), Err(Malformed));
        assert_eq!(parse_decimal("0x10", 2), Err(Malformed));
        assert_eq!(parse_decimal("1,5", 2), Err(Malformed));
        assert_eq!(parse_decimal("NaN", 2), Err(Malformed));
        assert_eq!(parse_decimal("١٢", 2), Err(Malformed));
        assert_eq!(
            parse_decimal("65000.555", 2),
            Err(TooManyDecimals {
                decimals: 3,
                allowed: 2
            })
        );
        assert_eq!(parse_decimal("18446744073709551616", 0), Err(Overflow));
        assert_eq!(parse_decimal("184467440737.09551616", 8), Err(Overflow));
        assert_eq!(parse_decimal(&"9".repeat(60), 0), Err(Overflow));
        assert_eq!(parse_decimal(&"9x".repeat(30), 0), Err(Malformed));
    }

    #[test]
    fn messages_name_the_rule() {
        let e = parse_decimal("65000.555", 2).unwrap_err();
        assert_eq!(
            e.describe("price", "65000.555", "BTC-USDC"),
            "price 65000.555 has 3 decimals; BTC-USDC allows 2"
        );
    }

    #[test]
    fn formats_with_fixed_decimals() {
        assert_eq!(format_decimal(6_500_050, 2), "65000.50");
        assert_eq!(format_decimal(1_500_000, 8), "0.01500000");
        assert_eq!(format_decimal(7, 0), "7");
        assert_eq!(format_decimal(u64::MAX, 18), "18.446744073709551615");
        for (v, d) in [
            (0u64, 2u8),
            (1, 8),
            (123_456_789, 4),
            (u64::MAX, 0),
            (u64::MAX, 8),
        ] {
            assert_eq!(parse_decimal(&format_decimal(v, d), d), Ok(v));
        }
    }
}
