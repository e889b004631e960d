//! How a plan's rows move between the parties at run time.

/// How a candidate's rows move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Every board runs its program and sends rows straight to the boards that read
    /// them; the coordinator only feeds the input and collects the outputs.
    #[default]
    Programs,
    /// The coordinator runs the groups in order, cutting every strip out and pasting
    /// every result back (the paper's runtime).
    Hub,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Transport, String> {
        match s {
            "programs" => Ok(Transport::Programs),
            "hub" => Ok(Transport::Hub),
            _ => Err(format!("unknown transport {s:?}; valid: programs, hub")),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Programs => "programs",
            Transport::Hub => "hub",
        })
    }
}
