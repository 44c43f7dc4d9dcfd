//! `Dec`: an exact, non-negative decimal as the journal writes them (`"65000.50"`), for the
//! sums and products the history store keeps (filled quantity, notional, candle volume).
//! Never a float: units in a `u128` and a count of decimals; an operation that would overflow
//! says so (`None`) instead of wrapping.

use std::cmp::Ordering;
use std::fmt;

/// Most decimals a `Dec` carries (a price's 18 plus a quantity's 18).
pub const SCALE_MAX: u8 = 36;

#[derive(Clone, Copy, Debug)]
pub struct Dec {
    units: u128,
    scale: u8,
}

impl Dec {
    pub const fn zero(scale: u8) -> Dec {
        Dec { units: 0, scale }
    }

    /// Reads `"123"`, `"123.45"` or `"0.001"`: ASCII digits with at most one point and at
    /// least one digit on each side of it.
    pub fn parse(text: &str) -> Option<Dec> {
        let (int, frac) = match text.split_once('.') {
            Some((i, f)) => (i, f),
            None => (text, ""),
        };
        if int.is_empty() || (text.contains('.') && frac.is_empty()) {
            return None;
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let scale = u8::try_from(frac.len()).ok().filter(|s| *s <= SCALE_MAX)?;
        let mut units: u128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            units = units.checked_mul(10)?.checked_add(u128::from(b - b'0'))?;
        }
        Some(Dec { units, scale })
    }

    pub fn scale(self) -> u8 {
        self.scale
    }

    pub fn is_zero(self) -> bool {
        self.units == 0
    }

    /// The units at this value's own scale, when they fit an `i64` (SQLite's integers).
    pub fn units_i64(self) -> Option<i64> {
        i64::try_from(self.units).ok()
    }

    /// The same value with `scale` decimals, when that loses nothing and fits.
    pub fn rescale(self, scale: u8) -> Option<Dec> {
        match scale.cmp(&self.scale) {
            Ordering::Equal => Some(self),
            Ordering::Greater => Some(Dec {
                units: self
                    .units
                    .checked_mul(10u128.checked_pow(u32::from(scale - self.scale))?)?,
                scale,
            }),
            Ordering::Less => {
                let div = 10u128.checked_pow(u32::from(self.scale - scale))?;
                self.units.is_multiple_of(div).then_some(Dec {
                    units: self.units / div,
                    scale,
                })
            }
        }
    }

    pub fn checked_add(self, other: Dec) -> Option<Dec> {
        let scale = self.scale.max(other.scale);
        let (a, b) = (self.rescale(scale)?, other.rescale(scale)?);
        Some(Dec {
            units: a.units.checked_add(b.units)?,
            scale,
        })
    }

    pub fn checked_sub(self, other: Dec) -> Option<Dec> {
        let scale = self.scale.max(other.scale);
        let (a, b) = (self.rescale(scale)?, other.rescale(scale)?);
        Some(Dec {
            units: a.units.checked_sub(b.units)?,
            scale,
        })
    }

    pub fn checked_mul(self, other: Dec) -> Option<Dec> {
        let scale = self.scale.checked_add(other.scale)?;
        (scale <= SCALE_MAX).then_some(())?;
        Some(Dec {
            units: self.units.checked_mul(other.units)?,
            scale,
        })
    }

    /// `self / other` with `scale` decimals, rounded half up; `None` for a zero divisor.
    pub fn div_round(self, other: Dec, scale: u8) -> Option<Dec> {
        if other.units == 0 {
            return None;
        }
        // self.units / 10^s1 / (other.units / 10^s2) * 10^scale
        //   = self.units * 10^(scale + s2 - s1) / other.units
        let up = i32::from(scale) + i32::from(other.scale) - i32::from(self.scale);
        let (num, den) = if up >= 0 {
            (
                self.units.checked_mul(10u128.checked_pow(up as u32)?)?,
                other.units,
            )
        } else {
            (
                self.units,
                other.units.checked_mul(10u128.checked_pow((-up) as u32)?)?,
            )
        };
        let q = num / den;
        let r = num % den;
        let units = if r.checked_mul(2)? >= den {
            q.checked_add(1)?
        } else {
            q
        };
        Some(Dec { units, scale })
    }
}

impl PartialEq for Dec {
    fn eq(&self, other: &Dec) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Dec {}

impl PartialOrd for Dec {
    fn partial_cmp(&self, other: &Dec) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dec {
    fn cmp(&self, other: &Dec) -> Ordering {
        let scale = self.scale.max(other.scale);
        match (self.rescale(scale), other.rescale(scale)) {
            (Some(a), Some(b)) => a.units.cmp(&b.units),
            // Only values beyond 10^38 fail to rescale: compare their integer parts.
            _ => {
                let int = |d: &Dec| d.units / 10u128.pow(u32::from(d.scale.min(38)));
                int(self).cmp(&int(other))
            }
        }
    }
}

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.units.to_string();
        let scale = usize::from(self.scale);
        if scale == 0 {
            return f.write_str(&digits);
        }
        if digits.len() > scale {
            let (int, frac) = digits.split_at(digits.len() - scale);
            write!(f, "{int}.{frac}")
        } else {
            write!(f, "0.{}{digits}", "0".repeat(scale - digits.len()))
        }
    }
}

/// `text` (a decimal as a database returns it: `"65000.500000000000000000"` from a fixed-scale
/// column, `"65000.5"` from an unconstrained one) written with exactly `scale` decimals, as
/// the engine writes it; the text as given when it does not read as a decimal or would lose
/// digits.
pub fn with_scale(text: &str, scale: u8) -> String {
    match Dec::parse(text.trim()) {
        Some(d) => {
            // Drop trailing zeros beyond `scale` without changing the value.
            let mut d = d;
            while d.scale > scale && d.units % 10 == 0 {
                d = Dec {
                    units: d.units / 10,
                    scale: d.scale - 1,
                };
            }
            d.rescale(scale.max(d.scale))
                .map_or_else(|| text.to_string(), |d| d.to_string())
        }
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dec {
        Dec::parse(s).unwrap()
    }

    #[test]
    fn parses_and_prints_what_the_engine_writes() {
        for s in [
            "0",
            "12",
            "0.001",
            "65000.50",
            "1.00000000",
            "18446744073709551615",
        ] {
            assert_eq!(d(s).to_string(), s);
        }
        for bad in ["", ".5", "5.", "-1", "1e5", "1.2.3", " 1", "0x10", "1,5"] {
            assert!(Dec::parse(bad).is_none(), "{bad:?}");
        }
        assert!(Dec::parse(&format!("0.{}", "1".repeat(37))).is_none());
    }

    #[test]
    fn sums_products_and_averages_are_exact() {
        assert_eq!(d("1.5").checked_add(d("0.25")).unwrap().to_string(), "1.75");
        assert_eq!(
            d("65000.50")
                .checked_mul(d("0.00100000"))
                .unwrap()
                .to_string(),
            "65.0005000000"
        );
        // (100.00 * 1 + 101.00 * 2) / 3 = 100.666...
        let notional = d("100.00")
            .checked_mul(d("1"))
            .unwrap()
            .checked_add(d("101.00").checked_mul(d("2")).unwrap())
            .unwrap();
        assert_eq!(
            notional.div_round(d("3"), 6).unwrap().to_string(),
            "100.666667"
        );
        assert_eq!(d("1").div_round(d("8"), 2).unwrap().to_string(), "0.13");
        assert!(d("1").div_round(d("0.00"), 2).is_none());
        assert!(d(&u128::MAX.to_string()).checked_add(d("1")).is_none());
    }

    #[test]
    fn compares_across_scales() {
        assert_eq!(d("1.50"), d("1.5"));
        assert!(d("1.49") < d("1.5"));
        assert_eq!(d("2").max(d("10.1")).to_string(), "10.1");
    }

    #[test]
    fn database_text_is_written_back_at_the_market_scale() {
        assert_eq!(with_scale("65000.500000000000000000", 2), "65000.50");
        assert_eq!(with_scale("65000.5", 2), "65000.50");
        assert_eq!(with_scale("3", 8), "3.00000000");
        assert_eq!(with_scale("0.123", 2), "0.123");
        assert_eq!(with_scale("abc", 2), "abc");
    }
}
