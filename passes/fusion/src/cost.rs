//! [`Cost`]: predicted time in nanoseconds, with saturating addition and an infinity
//! sentinel for illegal groups. Integer nanoseconds add exactly, so the e-graph's
//! extraction and the dynamic program reach the same optimum bit for bit whatever
//! order they sum in.

use std::fmt;
use std::ops::Add;

/// A predicted (or measured) time, ns. [`Cost::INFINITY`] marks an illegal choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cost(u64);

impl Cost {
    /// Nothing to do.
    pub const ZERO: Cost = Cost(0);
    /// An illegal choice; absorbs every addition.
    pub const INFINITY: Cost = Cost(u64::MAX);

    /// From microseconds (rounded to the nanosecond); NaN, negative or infinite times
    /// are illegal.
    pub fn from_us(us: f64) -> Cost {
        if us.is_finite() && us >= 0.0 && us * 1e3 < u64::MAX as f64 {
            Cost((us * 1e3).round() as u64)
        } else {
            Cost::INFINITY
        }
    }

    /// From nanoseconds.
    pub fn from_ns(ns: u64) -> Cost {
        Cost(ns)
    }

    /// Nanoseconds (`u64::MAX` when infinite).
    pub fn ns(self) -> u64 {
        self.0
    }

    /// Microseconds (infinite when illegal).
    pub fn us(self) -> f64 {
        if self.is_finite() {
            self.0 as f64 / 1e3
        } else {
            f64::INFINITY
        }
    }

    /// False for [`Cost::INFINITY`].
    pub fn is_finite(self) -> bool {
        self != Cost::INFINITY
    }
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, other: Cost) -> Cost {
        Cost(self.0.saturating_add(other.0))
    }
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.is_finite() {
            write!(f, "{:.3} ms", self.0 as f64 / 1e6)
        } else {
            write!(f, "illegal")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinity_absorbs_and_saturates() {
        assert_eq!(Cost::from_us(1.5) + Cost::from_us(2.0), Cost::from_ns(3500));
        assert_eq!(Cost::from_us(1.0) + Cost::INFINITY, Cost::INFINITY);
        assert_eq!(
            Cost::from_ns(u64::MAX - 1) + Cost::from_ns(5),
            Cost::INFINITY
        );
        assert_eq!(Cost::from_us(f64::NAN), Cost::INFINITY);
        assert_eq!(Cost::from_us(-1.0), Cost::INFINITY);
        assert!(Cost::from_us(1e9) < Cost::INFINITY);
        assert_eq!(Cost::INFINITY.to_string(), "illegal");
        assert_eq!(Cost::from_us(1234.0).to_string(), "1.234 ms");
    }
}
