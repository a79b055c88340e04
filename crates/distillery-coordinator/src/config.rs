//! Configuration of a coordinator process (TOML or command-line flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use distillery_core::Error;
use serde::{Deserialize, Serialize};

/// Certificate and private key (PEM) for serving gRPC over TLS (shared by every server).
pub use distillery_proto::transport::TlsPaths;

/// Everything a coordinator process needs. Durations are written as `"30s"`, `"500ms"`, `"2m"`
/// or a number of seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC address; port 0 picks a free port (see [`crate::RunningCoordinator::addr`]).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory of the durable state; created when missing. Keep it private: job specs stored
    /// there include their object-store options.
    pub state_dir: PathBuf,
    /// A lease lapses this long after its grant or last heartbeat.
    #[serde(default = "default_lease_ttl", with = "duration_text")]
    pub lease_ttl: Duration,
    /// A shard is poisoned after this many failed attempts.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// When set, every `CoordinatorService` call must carry `authorization: Bearer <token>`
    /// (health and reflection stay open).
    #[serde(default)]
    pub auth_token: Option<String>,
    /// When set, gRPC is served over TLS.
    #[serde(default)]
    pub tls: Option<TlsPaths>,
    /// When set, Prometheus metrics are served on `http://<addr>/metrics`.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest gRPC message accepted or sent, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// A `WatchJob` stream sends progress at most this often (the latest counts; every worker
    /// heartbeat updates them). State changes and poisoned shards are sent at once.
    #[serde(default = "default_watch_progress_interval", with = "duration_text")]
    pub watch_progress_interval: Duration,
}

pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}
pub fn default_lease_ttl() -> Duration {
    Duration::from_secs(30)
}
pub fn default_max_attempts() -> u32 {
    3
}
pub fn default_max_message_bytes() -> usize {
    64 << 20
}
pub fn default_watch_progress_interval() -> Duration {
    Duration::from_millis(500)
}

impl CoordinatorConfig {
    /// A config with defaults for everything but the state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: default_listen(),
            state_dir: state_dir.into(),
            lease_ttl: default_lease_ttl(),
            max_attempts: default_max_attempts(),
            auth_token: None,
            tls: None,
            metrics_listen: None,
            max_message_bytes: default_max_message_bytes(),
            watch_progress_interval: default_watch_progress_interval(),
        }
    }

    /// Parses TOML; unknown keys are errors naming the key.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::config("coordinator", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), Error> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(Error::config("state_dir", "is required"));
        }
        if self.lease_ttl < Duration::from_millis(100) || self.lease_ttl > Duration::from_secs(86_400) {
            return Err(Error::config(
                "lease_ttl",
                format!("{:?} is not between 100ms and 24h", self.lease_ttl),
            ));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(Error::config("max_attempts", format!("{} is not in 1..=100", self.max_attempts)));
        }
        if let Some(t) = &self.auth_token
            && (t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(Error::config("auth_token", "must be non-empty without whitespace"));
        }
        if let Some(tls) = &self.tls {
            tls.check().map_err(|(key, reason)| Error::config(key, reason))?;
        }
        if !(1024..=(1 << 30)).contains(&self.max_message_bytes) {
            return Err(Error::config(
                "max_message_bytes",
                format!("{} is not between 1 KiB and 1 GiB", self.max_message_bytes),
            ));
        }
        if self.watch_progress_interval > Duration::from_secs(86_400) {
            return Err(Error::config(
                "watch_progress_interval",
                format!("{:?} is longer than 24h", self.watch_progress_interval),
            ));
        }
        if let Some(m) = self.metrics_listen
            && m == self.listen
            && m.port() != 0
        {
            return Err(Error::config("metrics_listen", "must differ from listen"));
        }
        Ok(())
    }
}

/// Parses `"30s"`, `"250ms"`, `"2m"`, `"1h"` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a duration like 30s, 500ms, 2m"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_secs_f64(v)),
            Raw::Secs(v) => Err(serde::de::Error::custom(format!("{v} is not a non-negative duration"))),
            Raw::Text(t) => super::parse_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let c = CoordinatorConfig::from_toml(
            "state_dir = \"/tmp/x\"\nlease_ttl = \"1500ms\"\nmax_attempts = 5\n",
        )
        .unwrap();
        assert_eq!(c.lease_ttl, Duration::from_millis(1500));
        assert_eq!(c.max_attempts, 5);
        let e =
            CoordinatorConfig::from_toml("state_dir = \"/tmp/x\"\nlease_tll = 3\n").unwrap_err().to_string();
        assert!(e.contains("lease_tll"), "{e}");
    }

    #[test]
    fn validate_names_the_key() {
        let mut c = CoordinatorConfig::new("/tmp/x");
        c.max_attempts = 0;
        assert!(c.validate().unwrap_err().to_string().contains("`max_attempts`"));
        let mut c = CoordinatorConfig::new("/tmp/x");
        c.lease_ttl = Duration::from_millis(5);
        assert!(c.validate().unwrap_err().to_string().contains("`lease_ttl`"));
        let mut c = CoordinatorConfig::new("/tmp/x");
        c.tls = Some(TlsPaths { cert: "/nonexistent/c.pem".into(), key: "/nonexistent/k.pem".into() });
        assert!(c.validate().unwrap_err().to_string().contains("`tls.cert`"));
        let mut c = CoordinatorConfig::new("/tmp/x");
        c.auth_token = Some("has space".into());
        assert!(c.validate().unwrap_err().to_string().contains("`auth_token`"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3 weeks").is_err());
    }
}
