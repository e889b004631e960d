//! The rows of a tensor a party holds.

use legion_ir::Rows;

/// Rows of one tensor a party holds, as sorted disjoint ranges. A tensor without a row
/// axis is held whole (`0..0`) or not at all.
#[derive(Clone, Debug, Default)]
pub struct Held(Vec<Rows>);

impl Held {
    /// Adds `rows` (`0..0`: all of a tensor without rows).
    pub fn insert(&mut self, rows: Rows) {
        let mut merged = rows;
        let mut kept = vec![];
        for r in self.0.drain(..) {
            if r.end < merged.start || merged.end < r.start {
                kept.push(r);
            } else {
                merged = merged.hull(r);
            }
        }
        kept.push(merged);
        kept.sort_by_key(|r| r.start);
        self.0 = kept;
    }

    /// The parts of `want` not held, in order; `want` empty means the whole of a
    /// tensor without rows.
    pub fn lacking(&self, want: Rows) -> Vec<Rows> {
        if want.is_empty() {
            return if self.0.is_empty() {
                vec![want]
            } else {
                vec![]
            };
        }
        let mut out = vec![];
        let mut from = want.start;
        for r in &self.0 {
            if r.end <= from || r.start >= want.end {
                continue;
            }
            if r.start > from {
                out.push(Rows::new(from, r.start));
            }
            from = from.max(r.end);
        }
        if from < want.end {
            out.push(Rows::new(from, want.end));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_rows_merge_and_report_what_is_lacking() {
        let mut h = Held::default();
        h.insert(Rows::new(10, 20));
        h.insert(Rows::new(30, 40));
        assert_eq!(
            h.lacking(Rows::new(5, 45)),
            [Rows::new(5, 10), Rows::new(20, 30), Rows::new(40, 45)]
        );
        h.insert(Rows::new(20, 30));
        assert_eq!(h.0, [Rows::new(10, 40)]);
        assert_eq!(h.lacking(Rows::new(12, 38)), []);
        // A tensor without rows is held whole or not at all.
        let mut whole = Held::default();
        assert_eq!(whole.lacking(Rows::new(0, 0)), [Rows::new(0, 0)]);
        whole.insert(Rows::new(0, 0));
        assert_eq!(whole.lacking(Rows::new(0, 0)), []);
    }
}
