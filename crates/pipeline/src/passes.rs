//! The compile passes by name, their wall times, and what `--dump-after` prints.

use anyhow::Result;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// A pass of `compile`, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    /// Strips of every candidate group under every device option. The shares come from
    /// the cost model, so it runs with [`Pass::Cost`]; its dump shows the strips.
    Partition,
    /// The cost table: every legal group and device option, predicted or measured.
    Cost,
    /// The e-graph search and the Wild Card (or a baseline's configuration).
    Fusion,
    /// The candidates: every group's tiles and every party's program.
    Codegen,
}

impl Pass {
    /// Every pass, in order.
    pub const ALL: [Pass; 4] = [Pass::Partition, Pass::Cost, Pass::Fusion, Pass::Codegen];

    /// The pass's name, as `--dump-after` and `--stop-after` take it.
    pub fn name(self) -> &'static str {
        match self {
            Pass::Partition => "partition",
            Pass::Cost => "cost",
            Pass::Fusion => "fusion",
            Pass::Codegen => "codegen",
        }
    }
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Pass {
    type Err = String;
    fn from_str(s: &str) -> Result<Pass, String> {
        Pass::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Pass::ALL.iter().map(|p| p.name()).collect();
                format!("no pass '{s}'; the passes are {}", names.join(", "))
            })
    }
}

/// What a pass attached, as `--dump-after` prints it.
#[derive(Clone, Debug)]
pub struct Dump {
    /// The pass.
    pub pass: Pass,
    /// Human-readable text.
    pub text: String,
    /// The same, as JSON for tools.
    pub json: serde_json::Value,
}

/// Wall time of each pass, printed at the end like `-time-passes`.
#[derive(Default)]
pub struct PassTimes(Vec<(&'static str, Duration, String)>);

impl PassTimes {
    /// One line per pass: its name, milliseconds and note.
    pub fn report(&self) -> String {
        let mut out = String::from("time per pass:\n");
        for (pass, t, note) in &self.0 {
            out += &format!("  {pass:<8} {:>10.3} ms  {note}\n", t.as_secs_f64() * 1e3);
        }
        out
    }

    /// Runs `f` as the pass `pass` and records its wall time.
    pub fn time<T>(&mut self, pass: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let r = f()?;
        self.0.push((pass, start.elapsed(), String::new()));
        Ok(r)
    }

    /// Notes what the last timed pass did.
    pub fn note(&mut self, note: String) {
        if let Some(last) = self.0.last_mut() {
            last.2 = note;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_parse_by_name_and_an_unknown_one_lists_them() {
        for p in Pass::ALL {
            assert_eq!(p.name().parse::<Pass>(), Ok(p));
        }
        let e = "fuse".parse::<Pass>().unwrap_err();
        assert_eq!(
            e,
            "no pass 'fuse'; the passes are partition, cost, fusion, codegen"
        );
    }
}
