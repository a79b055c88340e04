//! Connections between Distillery's components, shared by every server and client: how a client
//! dials a service ([`Target`]) and how a server loads its TLS identity ([`TlsPaths`]).
//!
//! An `http://` URL is plaintext. An `https://` URL is TLS, verified against the PEM certificate of
//! the CA that signed the server's certificate (`--tls-ca`, `DISTILLERY_TLS_CA` or `tls_ca`): the
//! binary carries no built-in trust store, so a CA is required (for a publicly trusted server, pass
//! the system bundle, e.g. `/etc/ssl/certs/ca-certificates.crt`). The server's certificate must name
//! the URL's host, as a DNS name or an IP address in its subjectAltName.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Environment variable the `--tls-ca` flags read.
pub const TLS_CA_ENV: &str = "DISTILLERY_TLS_CA";

/// Where a client finds a service: its URL and, for `https://`, the CA certificate (PEM) that
/// signed the server's certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub tls_ca: Option<PathBuf>,
}

/// Why a client could not be set up or could not reach its service.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not an `http://` or `https://` URL. Nothing was dialled.
    #[error("`{url}` is not an http:// or https:// URL{reason}")]
    Url { url: String, reason: String },
    /// The CA setting does not fit the URL, or the CA file is unusable. Nothing was dialled.
    #[error("{0}")]
    TlsCa(String),
    /// Dialling failed: refused, timed out, or the TLS handshake failed (the reason says why, e.g.
    /// a certificate the CA did not sign).
    #[error("cannot connect to {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

impl Target {
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), tls_ca: None }
    }

    /// The same URL, verified against `tls_ca` (when `https://`).
    pub fn with_tls_ca(mut self, tls_ca: Option<PathBuf>) -> Self {
        self.tls_ca = tls_ca;
        self
    }

    fn is_https(&self) -> bool {
        self.url.trim().starts_with("https://")
    }

    /// Checks the URL against the CA setting without reading the CA or dialling (configuration
    /// validation): `https://` needs a CA file that exists, `http://` takes none.
    pub fn check(&self) -> Result<(), ConnectError> {
        let url = self.url.trim();
        let scheme_ok = ["http://", "https://"].iter().any(|s| url.len() > s.len() && url.starts_with(s));
        if !scheme_ok {
            return Err(ConnectError::Url { url: url.to_owned(), reason: String::new() });
        }
        match (&self.tls_ca, self.is_https()) {
            (Some(ca), false) => Err(ConnectError::TlsCa(format!(
                "a CA certificate ({}) is set but `{url}` is plaintext: use an https:// URL to connect \
                 over TLS",
                ca.display()
            ))),
            (None, true) => Err(ConnectError::TlsCa(format!(
                "`{url}` is https:// but no CA certificate is set: give the PEM of the CA that signed \
                 the server's certificate (--tls-ca, {TLS_CA_ENV} or `tls_ca`)"
            ))),
            (Some(ca), true) if !ca.is_file() => Err(ConnectError::TlsCa(format!(
                "the CA certificate {} is not a readable file",
                ca.display()
            ))),
            _ => Ok(()),
        }
    }

    /// The endpoint to dial: plaintext for `http://`; for `https://`, TLS that trusts only the CA
    /// certificate (read now, so a bad file fails here, naming it) and checks the server's
    /// certificate against the URL's host.
    pub fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        self.check()?;
        install_crypto_provider();
        let url = self.url.trim();
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| ConnectError::Url {
            url: url.to_owned(),
            reason: format!(": {}", error_chain(&e)),
        })?;
        let Some(ca) = self.tls_ca.as_deref().filter(|_| self.is_https()) else { return Ok(endpoint) };
        let pem = read_pem(ca, "CERTIFICATE", "CA certificate").map_err(ConnectError::TlsCa)?;
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        endpoint.tls_config(tls).map_err(|e| {
            ConnectError::TlsCa(format!("the CA certificate {}: {}", ca.display(), error_chain(&e)))
        })
    }

    /// Dials the service (TCP, and the TLS handshake for `https://`), waiting at most
    /// `connect_timeout` for the connection. The error names the URL and the whole cause, e.g.
    /// `invalid peer certificate: UnknownIssuer` with a hint about the CA.
    pub async fn connect(&self, connect_timeout: Duration) -> Result<Channel, ConnectError> {
        let endpoint = self.endpoint()?.connect_timeout(connect_timeout);
        endpoint.connect().await.map_err(|e| {
            let mut reason = error_chain(&e);
            if self.is_https() && reason.contains("certificate") {
                reason.push_str(
                    " (the CA certificate must be the one that signed the server's certificate, and that \
                     certificate must name the URL's host)",
                );
            }
            ConnectError::Unreachable { url: self.url.trim().to_owned(), reason }
        })
    }
}

impl From<&str> for Target {
    fn from(url: &str) -> Self {
        Self::new(url)
    }
}

impl From<String> for Target {
    fn from(url: String) -> Self {
        Self::new(url)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.trim())
    }
}

/// Certificate (chain) and private key, PEM, with which a server serves gRPC over TLS. In TOML, a
/// `[tls]` table with `cert` and `key`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A TLS file of a server that cannot be used; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct TlsFileError {
    pub path: PathBuf,
    pub reason: String,
}

impl TlsPaths {
    /// Checks that both files exist (configuration validation); the error is the key (`tls.cert` or
    /// `tls.key`) and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (key, p) in [("tls.cert", &self.cert), ("tls.key", &self.key)] {
            if !p.is_file() {
                return Err((key, format!("{} is not a readable file", p.display())));
            }
        }
        Ok(())
    }

    /// Reads both files into a server TLS configuration. The error names the file that cannot be
    /// read or holds no PEM of the expected kind.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsFileError> {
        install_crypto_provider();
        let read = |path: &Path, label, what| {
            read_pem(path, label, what).map_err(|reason| TlsFileError { path: path.to_owned(), reason })
        };
        let cert = read(&self.cert, "CERTIFICATE", "TLS certificate")?;
        let key = read(&self.key, "PRIVATE KEY", "TLS private key")?;
        Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
    }
}

/// Makes rustls' `ring` provider the process default unless one is installed already. Tonic's TLS
/// server asks rustls for the process default, and rustls cannot pick one by itself here: the
/// object-store stack linked into the same binary enables its `aws-lc-rs` provider next to `ring`
/// (tonic's `tls-ring`), and with both compiled in, a TLS server would panic at its first use.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Reads `path` and checks that it holds a PEM block whose label ends with `label`.
fn read_pem(path: &Path, label: &str, what: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !found {
        return Err(format!("{} holds no PEM {what} (`-----BEGIN ...{label}-----`)", path.display()));
    }
    Ok(bytes)
}

/// `e` and its sources, joined with `: ` (a repeated message is shown once). Tonic's transport
/// errors say only `transport error` at the top; the cause is below.
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let s = err.to_string();
        if parts.last() != Some(&s) && !s.is_empty() {
            parts.push(s);
        }
        next = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tls").join(name)
    }

    fn target(url: &str, ca: Option<PathBuf>) -> Target {
        Target::new(url).with_tls_ca(ca)
    }

    #[test]
    fn the_url_and_the_ca_must_agree() {
        let ca = Some(fixture("ca.pem"));
        assert!(target("http://127.0.0.1:1", None).check().is_ok());
        assert!(target("https://localhost:1", ca.clone()).check().is_ok());
        let e = target("127.0.0.1:1", None).check().unwrap_err();
        assert!(matches!(e, ConnectError::Url { .. }), "{e}");
        let e = target("https://localhost:1", None).check().unwrap_err().to_string();
        assert!(e.contains("no CA certificate") && e.contains("--tls-ca"), "{e}");
        let e = target("http://localhost:1", ca).check().unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("https://"), "{e}");
    }

    #[test]
    fn a_bad_ca_file_is_named() {
        let missing = fixture("missing.pem");
        let e = target("https://localhost:1", Some(missing)).endpoint().unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        // A key is a file, but not a certificate.
        let e = target("https://localhost:1", Some(fixture("server.key"))).endpoint().unwrap_err();
        assert!(matches!(e, ConnectError::TlsCa(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("server.key") && e.contains("no PEM CA certificate"), "{e}");
        let dir = std::env::temp_dir().join(format!("distillery-proto-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = target("https://localhost:1", Some(dir.clone())).endpoint().unwrap_err().to_string();
        assert!(e.contains(&dir.display().to_string()), "{e}");
        std::fs::remove_dir(&dir).unwrap();
        assert!(target("https://localhost:1", Some(fixture("ca.pem"))).endpoint().is_ok());
    }

    #[test]
    fn server_files_are_checked_and_named() {
        let good = TlsPaths { cert: fixture("server.pem"), key: fixture("server.key") };
        good.check().unwrap();
        good.server_config().unwrap();
        let swapped = TlsPaths { cert: fixture("server.key"), key: fixture("server.pem") };
        let e = swapped.server_config().unwrap_err().to_string();
        assert!(e.contains("server.key") && e.contains("certificate"), "{e}");
        let missing = TlsPaths { cert: fixture("server.pem"), key: fixture("nope.key") };
        assert_eq!(missing.check().unwrap_err().0, "tls.key");
        let e = missing.server_config().unwrap_err().to_string();
        assert!(e.contains("nope.key"), "{e}");
    }

    #[test]
    fn error_chains_skip_repeats() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl fmt::Display for E {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        impl StdError for E {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E("transport error", Some(Box::new(E("bad cert", Some(Box::new(E("bad cert", None)))))));
        assert_eq!(error_chain(&e), "transport error: bad cert");
    }
}
