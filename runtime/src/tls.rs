//! TLS on the workers' port (docs/deploy.md, "TLS"): each worker serves a self-signed
//! certificate of its own, and whoever connects to it (the coordinator, another board)
//! trusts exactly that certificate, pinned in the cluster file. The bearer token then
//! travels encrypted.

use anyhow::{Context, Result};
use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name every worker certificate carries and every client asks for. The pinned
/// certificate, not the name, is what identifies a board (boards are often reached by
/// an address no certificate names).
pub const WORKER_TLS_NAME: &str = "legion-worker";

/// A worker's certificate and private key, PEM.
#[derive(Clone, Debug)]
pub struct WorkerIdentity {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
}

impl WorkerIdentity {
    /// A new self-signed certificate (ECDSA P-256) naming [`WORKER_TLS_NAME`] and
    /// `names` (the board's name and host, for people reading it).
    pub fn generate(names: &[String]) -> Result<WorkerIdentity> {
        let mut alt = vec![WORKER_TLS_NAME.to_string()];
        for n in names {
            if !alt.contains(n) {
                alt.push(n.clone());
            }
        }
        let key = rcgen::generate_simple_self_signed(alt).context("making a certificate")?;
        Ok(WorkerIdentity {
            cert_pem: key.cert.pem(),
            key_pem: key.signing_key.serialize_pem(),
        })
    }

    /// Reads a certificate and key, naming the file that cannot be read or parsed.
    pub fn read(cert: &Path, key: &Path) -> Result<WorkerIdentity> {
        let read = |path: &Path, what: &str| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read the {what}", path.display()))?;
            anyhow::ensure!(
                text.contains("-----BEGIN"),
                "{}: not a PEM file (expected the {what} as `legion cluster keygen` writes it)",
                path.display()
            );
            Ok(text)
        };
        Ok(WorkerIdentity {
            cert_pem: read(cert, "certificate")?,
            key_pem: read(key, "private key")?,
        })
    }

    /// The server side of TLS with this identity.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// The client side of TLS to a worker whose certificate is `cert_pem`: that
/// certificate is the only one trusted.
pub fn pinned(cert_pem: &[u8]) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cert_pem))
        .domain_name(WORKER_TLS_NAME)
}
