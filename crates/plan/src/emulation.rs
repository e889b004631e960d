//! What an emulated board is: a board class (or explicit numbers) giving a compute rate
//! and a link. A cluster file's `emulate` and `legion worker --emulate` take the same
//! spec; the runtime's emulator (docs/architecture.md, "The emulated clock") runs it.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A spec that is not a board class or a valid key list; the message says why and
/// gives the syntax.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BadEmulation(String);

type Result<T> = std::result::Result<T, BadEmulation>;

/// Fails with `message` unless `ok`.
fn ensure(ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(BadEmulation(message()))
    }
}

/// A class of edge board, defined by how long it takes to run VGG-16.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoardClass {
    /// Name accepted by [`Emulation::from_str`], e.g. `firefly-rk3399`.
    pub name: &'static str,
    /// Milliseconds for one VGG-16 inference (224x224, batch 1, with the FC head).
    pub vgg16_ms: f64,
    /// Link bandwidth, Mbit/s.
    pub mbps: f64,
    /// Link latency, one way, milliseconds.
    pub latency_ms: f64,
    /// Where `vgg16_ms` comes from.
    pub source: &'static str,
}

impl BoardClass {
    /// The class's compute rate in GFLOP/s: [`VGG16_FLOPS`] over `vgg16_ms`.
    pub fn gflops(&self) -> f64 {
        VGG16_FLOPS / (self.vgg16_ms / 1000.0) / 1e9
    }
}

/// The board classes a worker can emulate by name.
pub const BOARD_CLASSES: &[BoardClass] = &[
    BoardClass {
        name: "firefly-rk3399",
        vgg16_ms: 970.0,
        mbps: 100.0,
        latency_ms: 0.2,
        source: "TVM's published ARM CPU benchmark, VGG-16 on Firefly-RK3399",
    },
    BoardClass {
        name: "odroid-xu4",
        vgg16_ms: 1400.0,
        mbps: 100.0,
        latency_ms: 0.2,
        source: "assumption: no published figure",
    },
];

/// FLOPs of one VGG-16 inference as Legion counts them: `legion inspect`'s total, the
/// sum of `Stage::flops` over every stage of the imported `vgg16` model of
/// legion-models. That is 2 per multiply-accumulate of the convs (30,693,261,312) and
/// the FC layers (247,267,328), one per pooled window element (6,121,472) and one per
/// softmax element (1,000); Relus and biases fuse into their stages. Checked against
/// the import in `tests/emulate.rs`.
pub const VGG16_FLOPS: f64 = 30_946_651_112.0;

/// What a worker emulates: a compute rate and a link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Emulation {
    /// The board class this came from, if any (`None` for an explicit key list).
    pub class: Option<String>,
    /// The device's compute rate, GFLOP/s (FLOPs counted like [`VGG16_FLOPS`]).
    pub gflops: f64,
    /// Link bandwidth, Mbit/s.
    pub mbps: f64,
    /// Link latency, one way, milliseconds.
    pub latency_ms: f64,
}

/// The syntax accepted by [`Emulation::from_str`], for error messages.
fn syntax() -> String {
    let names: Vec<_> = BOARD_CLASSES.iter().map(|c| c.name).collect();
    format!(
        "expected a board class ({}) or `speed=GFLOPS,mbps=MBITS,latency_ms=MS` \
         (all three keys, any order, positive numbers; speed in GFLOP/s)",
        names.join(", ")
    )
}

/// Checks that `value` (the value of key `key`) is positive and finite.
fn positive(key: &str, value: f64) -> Result<f64> {
    ensure(value.is_finite() && value > 0.0, || {
        format!("{key}={value} must be a positive finite number")
    })?;
    Ok(value)
}

impl Emulation {
    /// The emulation of board class `name` (see [`BOARD_CLASSES`]); the error for an
    /// unknown name lists the valid ones.
    pub fn class(name: &str) -> Result<Emulation> {
        let class = BOARD_CLASSES
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| BadEmulation(format!("unknown board class {name:?}; {}", syntax())))?;
        Ok(Emulation {
            class: Some(class.name.to_string()),
            gflops: class.gflops(),
            mbps: class.mbps,
            latency_ms: class.latency_ms,
        })
    }

    /// An emulation with explicit numbers (no class); each must be positive and finite.
    pub fn custom(gflops: f64, mbps: f64, latency_ms: f64) -> Result<Emulation> {
        Ok(Emulation {
            class: None,
            gflops: positive("speed", gflops)?,
            mbps: positive("mbps", mbps)?,
            latency_ms: positive("latency_ms", latency_ms)?,
        })
    }
}

impl FromStr for Emulation {
    type Err = BadEmulation;

    /// Parses a board class name (`firefly-rk3399`) or a key list
    /// `speed=X,mbps=Y,latency_ms=Z` (speed in GFLOP/s; all three keys required, in
    /// any order, each once, positive and finite).
    fn from_str(s: &str) -> Result<Emulation> {
        let s = s.trim();
        if !s.contains('=') {
            return Emulation::class(s);
        }
        let mut values: [Option<f64>; 3] = [None; 3];
        const KEYS: [&str; 3] = ["speed", "mbps", "latency_ms"];
        for part in s.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(BadEmulation(format!(
                    "{part:?} in {s:?} is not KEY=VALUE; {}",
                    syntax()
                )));
            };
            let (key, value) = (key.trim(), value.trim());
            let Some(i) = KEYS.iter().position(|k| *k == key) else {
                return Err(BadEmulation(format!(
                    "unknown key {key:?} in {s:?}; {}",
                    syntax()
                )));
            };
            ensure(values[i].is_none(), || {
                format!("key {key:?} given twice in {s:?}; {}", syntax())
            })?;
            let number: f64 = value
                .parse()
                .map_err(|_| BadEmulation(format!("{key}={value:?} in {s:?} is not a number")))?;
            values[i] = Some(positive(key, number)?);
        }
        let missing: Vec<_> = KEYS
            .iter()
            .zip(values)
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| *k)
            .collect();
        ensure(missing.is_empty(), || {
            format!("missing {} in {s:?}; {}", missing.join(", "), syntax())
        })?;
        let [Some(gflops), Some(mbps), Some(latency_ms)] = values else {
            unreachable!("every key is present");
        };
        Emulation::custom(gflops, mbps, latency_ms)
    }
}

impl Emulation {
    /// The spec this parses from: the class name, or the key list.
    pub fn spec(&self) -> String {
        match &self.class {
            Some(class) => class.clone(),
            None => format!(
                "speed={},mbps={},latency_ms={}",
                self.gflops, self.mbps, self.latency_ms
            ),
        }
    }
}

impl TryFrom<String> for Emulation {
    type Error = BadEmulation;
    fn try_from(spec: String) -> Result<Emulation> {
        spec.parse()
    }
}

impl From<Emulation> for String {
    fn from(e: Emulation) -> String {
        e.spec()
    }
}

impl fmt::Display for Emulation {
    /// `firefly-rk3399 (31.9 GFLOP/s, 100 Mbit/s, 0.2 ms)`, or without the class name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(class) = &self.class {
            write!(f, "{class} ")?;
        }
        write!(
            f,
            "({:.1} GFLOP/s, {} Mbit/s, {} ms)",
            self.gflops, self.mbps, self.latency_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        format!("{:#}", s.parse::<Emulation>().unwrap_err())
    }

    #[test]
    fn parses_class_names() {
        let e: Emulation = "firefly-rk3399".parse().unwrap();
        assert_eq!(e.class.as_deref(), Some("firefly-rk3399"));
        assert_eq!((e.mbps, e.latency_ms), (100.0, 0.2));
        assert_eq!(e.gflops, VGG16_FLOPS / 0.97 / 1e9);
        assert_eq!(e, Emulation::class("firefly-rk3399").unwrap());
        let o: Emulation = " odroid-xu4 ".parse().unwrap();
        assert_eq!(o.class.as_deref(), Some("odroid-xu4"));
        assert_eq!(o.gflops, VGG16_FLOPS / 1.4 / 1e9);
    }

    #[test]
    fn parses_key_lists_in_any_order() {
        let want = Emulation {
            class: None,
            gflops: 12.5,
            mbps: 100.0,
            latency_ms: 0.5,
        };
        assert_eq!(
            "speed=12.5,mbps=100,latency_ms=0.5"
                .parse::<Emulation>()
                .unwrap(),
            want
        );
        assert_eq!(
            "latency_ms=0.5, speed = 12.5 ,mbps=1e2"
                .parse::<Emulation>()
                .unwrap(),
            want
        );
    }

    #[test]
    fn errors_name_the_problem_and_the_syntax() {
        let syntax = [
            "firefly-rk3399, odroid-xu4",
            "speed=",
            "mbps=",
            "latency_ms=",
        ];
        for (input, what) in [
            ("raspberry-pi", "unknown board class \"raspberry-pi\""),
            ("", "unknown board class \"\""),
            ("speed=10,mbps=100", "missing latency_ms"),
            ("mbps=100", "missing speed, latency_ms"),
            (
                "speed=10,mbps=100,latency_ms=1,gpu=1",
                "unknown key \"gpu\"",
            ),
            (
                "speed=10,speed=20,mbps=1,latency_ms=1",
                "key \"speed\" given twice",
            ),
            ("speed=10,mbps=100,latency_ms", "\"latency_ms\" in"),
        ] {
            let e = err(input);
            assert!(e.contains(what), "{input:?}: {e}");
            for s in syntax {
                assert!(e.contains(s), "{input:?} does not mention {s:?}: {e}");
            }
        }
        assert!(err("speed=fast,mbps=1,latency_ms=1").contains("speed=\"fast\""));
        for bad in ["0", "-1", "inf", "NaN"] {
            let e = err(&format!("speed=10,mbps={bad},latency_ms=1"));
            assert!(e.contains("positive finite"), "{bad}: {e}");
        }
    }

    #[test]
    fn class_rates_keep_the_published_ratio() {
        let firefly = Emulation::class("firefly-rk3399").unwrap();
        let odroid = Emulation::class("odroid-xu4").unwrap();
        let ratio = firefly.gflops / odroid.gflops;
        assert!((ratio - 1400.0 / 970.0).abs() < 1e-12, "{ratio}");
        for class in BOARD_CLASSES {
            assert_eq!(Emulation::class(class.name).unwrap().gflops, class.gflops());
        }
    }

    #[test]
    fn serde_round_trip() {
        let e = Emulation::class("odroid-xu4").unwrap();
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, "\"odroid-xu4\"");
        assert_eq!(serde_json::from_str::<Emulation>(&json).unwrap(), e);
        let custom = Emulation::custom(12.5, 100.0, 0.5).unwrap();
        assert_eq!(custom.spec(), "speed=12.5,mbps=100,latency_ms=0.5");
        assert_eq!(custom.spec().parse::<Emulation>().unwrap(), custom);
        assert_eq!(
            e.to_string(),
            "odroid-xu4 (22.1 GFLOP/s, 100 Mbit/s, 0.2 ms)"
        );
    }
}
