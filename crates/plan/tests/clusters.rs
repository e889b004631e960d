//! The paper's 14 emulated setups under testdata/clusters: every file loads, and each
//! holds the boards its name says, on 100 Mbit/s links with 0.2 ms latency.

use legion_plan::{Cluster, PAPER_SETUPS as SETUPS};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

/// Board class names as `legion worker --emulate` takes them (legion-plan does not
/// depend on the runtime that defines them).
const FIREFLY: &str = "firefly-rk3399";
const ODROID: &str = "odroid-xu4";

fn clusters_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/clusters")
}

/// (Fireflies, Odroids) from a setup name: `firefly-xN`, `odroid-xN` or `NfMo`.
fn expected_counts(name: &str) -> (usize, usize) {
    let number = |s: &str| -> usize {
        s.parse()
            .unwrap_or_else(|_| panic!("{name}: {s:?} is not a count"))
    };
    if let Some(n) = name.strip_prefix("firefly-x") {
        (number(n), 0)
    } else if let Some(n) = name.strip_prefix("odroid-x") {
        (0, number(n))
    } else {
        let (f, o) = name
            .strip_suffix('o')
            .and_then(|rest| rest.split_once('f'))
            .unwrap_or_else(|| panic!("{name}: not firefly-xN, odroid-xN or NfMo"));
        (number(f), number(o))
    }
}

#[test]
fn the_directory_holds_exactly_the_14_setups() {
    let found: BTreeSet<String> = std::fs::read_dir(clusters_dir())
        .expect("testdata/clusters exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = SETUPS.iter().map(|s| format!("{s}.toml")).collect();
    assert_eq!(found, want);
}

#[test]
fn setup_names_parse() {
    assert_eq!(expected_counts("firefly-x6"), (6, 0));
    assert_eq!(expected_counts("odroid-x3"), (0, 3));
    assert_eq!(expected_counts("3f2o"), (3, 2));
}

#[test]
fn every_setup_holds_the_boards_its_name_says() {
    for name in SETUPS {
        let path = clusters_dir().join(format!("{name}.toml"));
        let cluster = Cluster::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let (fireflies, odroids) = expected_counts(name);
        assert_eq!(cluster.devices.len(), fireflies + odroids, "{name}");
        assert!(cluster.is_emulated(), "{name}");
        assert_eq!(cluster.coordinator.mbps, 1000.0, "{name}");
        assert_eq!(cluster.token_file, None, "{name}");
        // Fireflies first, then Odroids, each class numbered from 0.
        let classes: Vec<&str> = cluster
            .devices
            .iter()
            .map(|d| d.emulate.as_ref().unwrap().class.as_deref().unwrap())
            .collect();
        let want: Vec<&str> = [FIREFLY]
            .repeat(fireflies)
            .into_iter()
            .chain([ODROID].repeat(odroids))
            .collect();
        assert_eq!(classes, want, "{name}");
        let names: Vec<&str> = cluster.devices.iter().map(|d| d.name.as_str()).collect();
        let want_names: Vec<String> = (0..fireflies)
            .map(|i| format!("firefly-{i}"))
            .chain((0..odroids).map(|i| format!("odroid-{i}")))
            .collect();
        assert_eq!(names, want_names, "{name}");
        // Consecutive local ports from 50051, so the addresses are unique.
        let addresses: HashSet<&str> = cluster.devices.iter().map(|d| d.address.as_str()).collect();
        assert_eq!(addresses.len(), cluster.devices.len(), "{name}");
        for (i, d) in cluster.devices.iter().enumerate() {
            assert_eq!(d.address, format!("127.0.0.1:{}", 50051 + i), "{name}");
            assert_eq!(
                (d.link_mbps, d.latency_ms),
                (100.0, 0.2),
                "{name}: {}",
                d.name
            );
            assert_eq!(d.memory_mb, None, "{name}: {}", d.name);
        }
    }
}

#[test]
fn every_file_says_how_to_start_it() {
    for name in SETUPS {
        let path = clusters_dir().join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let command = format!("legion cluster up --file testdata/clusters/{name}.toml");
        assert!(text.starts_with("# The paper's "), "{name}");
        assert!(text.contains(&command), "{name} should mention `{command}`");
    }
}
