//! Cluster files (TOML): the devices a plan runs on, their addresses, links and
//! emulation, and the coordinator's own link. The format is documented in
//! docs/cluster.md.

use crate::Emulation;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The paper's 14 emulated setups (its Fig. 6), as files `testdata/clusters/<name>.toml`:
/// 1-6 Fireflies, 1-3 Odroids, and mixes of the two.
pub const PAPER_SETUPS: [&str; 14] = [
    "firefly-x1",
    "firefly-x2",
    "firefly-x3",
    "firefly-x4",
    "firefly-x5",
    "firefly-x6",
    "odroid-x1",
    "odroid-x2",
    "odroid-x3",
    "1f1o",
    "2f1o",
    "2f2o",
    "3f2o",
    "3f3o",
];

/// A cluster: the coordinator's link and the devices, in the order strips are cut.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// The coordinator's own link; every strip sent or received crosses it.
    #[serde(default)]
    pub coordinator: CoordinatorLink,
    /// A file holding the workers' bearer token (relative paths are relative to the
    /// cluster file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The devices.
    #[serde(rename = "device", default)]
    pub devices: Vec<Device>,
}

/// The coordinator's link.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorLink {
    /// Bandwidth in Mbit/s (1 Gbit/s unless the file says otherwise).
    pub mbps: f64,
}

impl Default for CoordinatorLink {
    fn default() -> Self {
        CoordinatorLink { mbps: 1000.0 }
    }
}

/// A device's network link to the switch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Bandwidth in Mbit/s.
    pub mbps: f64,
    /// One-way latency in milliseconds.
    pub latency_ms: f64,
}

impl Link {
    /// Time to move `bytes` over this link alone: latency + bytes / bandwidth, in µs.
    pub fn time_us(&self, bytes: u64) -> f64 {
        self.latency_ms * 1e3 + bytes as f64 * 8.0 / self.mbps
    }
}

/// A device of a cluster: its position in the cluster file, which is also its
/// position in a profile of that cluster and in the coordinator. Plans and timings
/// name devices instead ([`Device::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(pub usize);

impl DeviceId {
    /// Its position, for indexing the cluster's, profile's or coordinator's devices.
    pub fn index(self) -> usize {
        self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "device #{}", self.0)
    }
}

/// One device (a worker).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DeviceFields")]
pub struct Device {
    /// Its name in plans and reports.
    pub name: String,
    /// The worker's address, `host:port`.
    pub address: String,
    /// The board it emulates, written as a class name or `speed=X,mbps=Y,latency_ms=Z`
    /// as given to `legion worker --emulate`, and parsed when the file loads. Absent
    /// for a real board.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulate: Option<Emulation>,
    /// The board's class, for a real board: boards of one class are the same hardware,
    /// and profiling measures them as one (docs/profile.md). An emulated board's class is
    /// its `emulate` class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Link bandwidth in Mbit/s.
    pub link_mbps: f64,
    /// Link latency in milliseconds.
    pub latency_ms: f64,
    /// Memory available to tiles, in MiB (checked by the compiler when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// The worker's certificate (PEM, as `legion cluster keygen` writes it): the
    /// coordinator and the other boards reach it over TLS, trusting this certificate
    /// alone. Relative paths are relative to the cluster file. Absent: plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
}

/// A device as the file spells it, before its emulation is parsed (so that a bad spec
/// is reported with the device's name).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFields {
    name: String,
    address: String,
    #[serde(default)]
    emulate: Option<String>,
    #[serde(default)]
    class: Option<String>,
    link_mbps: f64,
    latency_ms: f64,
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
}

impl TryFrom<DeviceFields> for Device {
    type Error = String;
    fn try_from(f: DeviceFields) -> Result<Device, String> {
        let emulate = f
            .emulate
            .map(|spec| {
                spec.parse::<Emulation>()
                    .map_err(|e| format!("device {}: emulate = {spec:?}: {e}", f.name))
            })
            .transpose()?;
        Ok(Device {
            name: f.name,
            address: f.address,
            emulate,
            class: f.class,
            link_mbps: f.link_mbps,
            latency_ms: f.latency_ms,
            memory_mb: f.memory_mb,
            tls_cert: f.tls_cert,
        })
    }
}

impl Device {
    /// Its board class: the file's `class`, else the class it emulates (`None` for a
    /// real board without one and for an emulation given as numbers).
    pub fn board_class(&self) -> Option<&str> {
        self.class
            .as_deref()
            .or_else(|| self.emulate.as_ref()?.class.as_deref())
    }

    /// The device's link.
    pub fn link(&self) -> Link {
        Link {
            mbps: self.link_mbps,
            latency_ms: self.latency_ms,
        }
    }
}

/// A cluster file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The file cannot be read.
    #[error("{path}: cannot read the cluster file: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid cluster file.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

impl Cluster {
    /// Reads and validates a cluster file.
    pub fn load(path: &Path) -> Result<Cluster, ClusterError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ClusterError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut cluster: Cluster = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        cluster.validate().map_err(invalid)?;
        if let Some(t) = &cluster.token_file
            && t.is_relative()
        {
            let dir = path.parent().unwrap_or(Path::new("."));
            cluster.token_file = Some(dir.join(t));
        }
        for d in &mut cluster.devices {
            if let Some(c) = &d.tls_cert
                && c.is_relative()
            {
                d.tls_cert = Some(path.parent().unwrap_or(Path::new(".")).join(c));
            }
        }
        Ok(cluster)
    }

    /// The file's TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a cluster serializes to TOML")
    }

    /// Checks that the cluster can be used: devices exist, names and addresses are
    /// unique, links are positive. The message names the device and what to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.devices.is_empty() {
            return Err("the cluster has no devices; add `[[device]]` tables".into());
        }
        positive("coordinator.mbps", self.coordinator.mbps)?;
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for d in &self.devices {
            if d.name.is_empty() {
                return Err(format!("device at {} has an empty name", d.address));
            }
            if !names.insert(&d.name) {
                return Err(format!("two devices are named {:?}", d.name));
            }
            if !addresses.insert(&d.address) {
                return Err(format!("two devices have the address {}", d.address));
            }
            if !d.address.contains(':') {
                return Err(format!(
                    "device {}: address {:?} is not host:port",
                    d.name, d.address
                ));
            }
            if let Some(class) = &d.class {
                if class.is_empty() {
                    return Err(format!(
                        "device {}: class is empty; name the board's class or leave it out",
                        d.name
                    ));
                }
                if let Some(emulated) = d.emulate.as_ref().and_then(|e| e.class.as_ref())
                    && emulated != class
                {
                    return Err(format!(
                        "device {}: class = {class:?} but it emulates {emulated:?}; an \
                         emulated board's class is the one it emulates, so leave class out",
                        d.name
                    ));
                }
            }
            positive(&format!("device {}: link_mbps", d.name), d.link_mbps)?;
            if !(d.latency_ms >= 0.0 && d.latency_ms.is_finite()) {
                return Err(format!(
                    "device {}: latency_ms must be a finite number >= 0, got {}",
                    d.name, d.latency_ms
                ));
            }
        }
        let emulated = self.devices.iter().filter(|d| d.emulate.is_some()).count();
        if emulated != 0 && emulated != self.devices.len() {
            return Err(format!(
                "{emulated} of {} devices are emulated; a cluster is either all emulated or \
                 all real, since their times are on different clocks",
                self.devices.len()
            ));
        }
        Ok(())
    }

    /// Whether the devices are emulated (their times are on the emulated clock).
    pub fn is_emulated(&self) -> bool {
        self.devices.iter().all(|d| d.emulate.is_some())
    }

    /// The device named `name`.
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }
}

fn positive(what: &str, v: f64) -> Result<(), String> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(format!("{what} must be a positive number, got {v}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
token_file = "token"
[coordinator]
mbps = 1000.0

[[device]]
name = "firefly-0"
address = "127.0.0.1:50051"
emulate = "firefly-rk3399"
link_mbps = 100.0
latency_ms = 0.2

[[device]]
name = "odroid-0"
address = "127.0.0.1:50052"
emulate = "odroid-xu4"
link_mbps = 100.0
latency_ms = 0.2
memory_mb = 2048
"#;

    fn load_str(text: &str) -> Result<Cluster, ClusterError> {
        let dir = std::env::temp_dir().join(format!("legion-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("c{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        Cluster::load(&path)
    }

    #[test]
    fn loads_and_round_trips() {
        let c = load_str(TWO).unwrap();
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[1].memory_mb, Some(2048));
        assert!(c.is_emulated());
        assert!(c.token_file.as_ref().unwrap().ends_with("token"));
        assert!(c.token_file.as_ref().unwrap().is_absolute());
        let again: Cluster = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again, c);
        // 1 MB over 100 Mbit/s: 80 ms plus 0.2 ms latency
        assert_eq!(c.devices[0].link().time_us(1_000_000), 80_200.0);
    }

    /// A real board's class is the file's; an emulated board's is the one it emulates.
    #[test]
    fn board_class_is_declared_or_emulated() {
        let c = load_str(TWO).unwrap();
        assert_eq!(c.devices[1].board_class(), Some("odroid-xu4"));
        let real = TWO
            .replace("emulate = \"firefly-rk3399\"\n", "class = \"rk3399\"\n")
            .replace("emulate = \"odroid-xu4\"\n", "");
        let c = load_str(&real).unwrap();
        assert_eq!(c.devices[0].board_class(), Some("rk3399"));
        assert_eq!(c.devices[1].board_class(), None);
        let again: Cluster = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn coordinator_defaults_to_1_gbit() {
        let text = TWO.replace("[coordinator]\nmbps = 1000.0\n", "");
        assert_eq!(load_str(&text).unwrap().coordinator.mbps, 1000.0);
    }

    #[test]
    fn rejects_bad_files_naming_the_problem() {
        let cases = [
            (
                TWO.replace("odroid-0", "firefly-0"),
                "two devices are named",
            ),
            (
                TWO.replace("50052", "50051"),
                "two devices have the address",
            ),
            (
                TWO.replace(
                    "link_mbps = 100.0\nlatency_ms = 0.2\nmemory",
                    "link_mbps = 0.0\nlatency_ms = 0.2\nmemory",
                ),
                "odroid-0: link_mbps must be a positive",
            ),
            (
                TWO.replace("emulate = \"odroid-xu4\"\n", ""),
                "1 of 2 devices are emulated",
            ),
            (
                TWO.replace("\"odroid-xu4\"", "\"raspberry-pi\""),
                "device odroid-0: emulate = \"raspberry-pi\": unknown board class",
            ),
            (
                TWO.replace("address = \"127.0.0.1:50052\"", "address = \"nowhere\""),
                "not host:port",
            ),
            (TWO.replace("memory_mb", "memroy_mb"), "unknown field"),
            (
                TWO.replace("memory_mb", "class = \"firefly-rk3399\"\nmemory_mb"),
                "device odroid-0: class = \"firefly-rk3399\" but it emulates \"odroid-xu4\"",
            ),
            (
                TWO.replace("memory_mb", "class = \"\"\nmemory_mb"),
                "device odroid-0: class is empty",
            ),
            ("[coordinator]\nmbps = 1000.0\n".to_string(), "no devices"),
        ];
        for (text, want) in cases {
            let err = load_str(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(err.contains(".toml"), "{err:?} should name the file");
        }
    }

    #[test]
    fn missing_file_is_named() {
        let err = Cluster::load(Path::new("/nonexistent/c.toml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/c.toml: cannot read")
        );
    }
}
