//! Half-open ranges of rows, the unit every pass after import talks in.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;

/// A half-open range of rows `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Rows {
    /// First row.
    pub start: usize,
    /// One past the last row.
    pub end: usize,
}

impl Rows {
    /// `[start, end)`.
    #[inline]
    pub fn new(start: usize, end: usize) -> Rows {
        Rows {
            start,
            end: end.max(start),
        }
    }

    /// Number of rows.
    #[inline]
    pub fn len(self) -> usize {
        self.end - self.start
    }

    /// True when there are no rows.
    #[inline]
    pub fn is_empty(self) -> bool {
        self.end == self.start
    }

    /// The smallest range holding both (an empty range is neutral).
    #[inline]
    pub fn hull(self, other: Rows) -> Rows {
        match (self.is_empty(), other.is_empty()) {
            (true, _) => other,
            (_, true) => self,
            _ => Rows::new(self.start.min(other.start), self.end.max(other.end)),
        }
    }

    /// True when `other` lies inside `self`.
    pub fn contains(self, other: Rows) -> bool {
        other.is_empty() || (self.start <= other.start && other.end <= self.end)
    }

    /// As a `Range`.
    pub fn range(self) -> Range<usize> {
        self.start..self.end
    }
}

impl fmt::Debug for Rows {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "[{},{})", self.start, self.end)
    }
}

impl fmt::Display for Rows {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}
