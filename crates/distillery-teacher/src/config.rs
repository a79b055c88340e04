//! Configuration of a teacher worker, as given on the command line or in a TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use distillery_proto::transport::{ConnectError, Target, TlsPaths};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::load::{TeacherSpec, check_device_name};
use crate::pipeline::PipelineConfig;

/// Everything a worker needs. Unknown keys are rejected; [`WorkerConfig::validate`] names the bad key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Coordinator URL, e.g. `http://127.0.0.1:50051`, or `https://` with [`WorkerConfig::tls_ca`].
    pub coordinator: String,
    /// PEM certificate of the CA that signed the coordinator's certificate; required with an
    /// `https://` coordinator, refused with `http://`.
    pub tls_ca: Option<PathBuf>,
    /// When set, the worker's `TeacherService` is served over TLS (a `[tls]` table with `cert`
    /// and `key`, PEM).
    pub tls: Option<TlsPaths>,
    /// Where the worker's `TeacherService` listens; port 0 picks a free port.
    pub listen: SocketAddr,
    /// `host:port` the coordinator should give clients for this worker; default: the bound address.
    pub advertise: Option<String>,
    /// Where `GET /metrics` is served; none disables the endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Teacher to load at start (see [`TeacherSpec`]). None: load the teacher each lease names.
    pub teacher: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Largest batch given to the teacher (also capped by the teacher's own limit).
    pub max_batch: usize,
    /// Longest a partial batch waits for more images, in milliseconds.
    pub max_delay_ms: u64,
    /// Parallel image decoders.
    pub decode_threads: usize,
    /// Bound of the queue of prepared images waiting for a batch.
    pub queue_capacity: usize,
    /// Bearer token: required from `TeacherService` clients and sent to the coordinator.
    pub auth_token: Option<String>,
    /// Stable worker id (1..=128 of `[A-Za-z0-9._:-]`); default `worker-<host>-<pid>-<port>`.
    pub worker_id: Option<String>,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// On shutdown, how long the current shard may take to finish before its lease is released.
    pub drain_timeout_ms: u64,
    /// First and largest delay between attempts to reach the coordinator.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:50051".into(),
            tls_ca: None,
            tls: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 50061)),
            advertise: None,
            metrics_listen: None,
            teacher: None,
            device: "cpu".into(),
            max_batch: 32,
            max_delay_ms: 20,
            decode_threads: 2,
            queue_capacity: 128,
            auth_token: None,
            worker_id: None,
            max_message_bytes: 64 << 20,
            drain_timeout_ms: 120_000,
            retry_initial_ms: 200,
            retry_max_ms: 10_000,
        }
    }
}

/// True when `id` is a valid worker id.
pub fn valid_worker_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

impl WorkerConfig {
    /// Parses a TOML document; `origin` (e.g. the file path) prefixes errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let cfg: WorkerConfig =
            toml::from_str(text).map_err(|e| Error::config(origin, e.to_string().trim().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        self.coordinator_target().check().map_err(|e| match e {
            ConnectError::Url { .. } => Error::config("coordinator", e.to_string()),
            other => Error::config("tls_ca", other.to_string()),
        })?;
        if let Some(tls) = &self.tls {
            tls.check().map_err(|(key, reason)| Error::config(key, reason))?;
        }
        if let Some(a) = &self.advertise
            && (a.is_empty() || !a.contains(':'))
        {
            return Err(Error::config("advertise", format!("`{a}` is not host:port")));
        }
        if let Some(t) = &self.teacher {
            TeacherSpec::parse(t)?;
        }
        check_device_name(&self.device)?;
        if !(1..=4096).contains(&self.max_batch) {
            return Err(Error::config("max_batch", format!("{} is not in 1..=4096", self.max_batch)));
        }
        if self.max_delay_ms > 60_000 {
            return Err(Error::config("max_delay_ms", format!("{} is above 60000", self.max_delay_ms)));
        }
        if !(1..=256).contains(&self.decode_threads) {
            return Err(Error::config(
                "decode_threads",
                format!("{} is not in 1..=256", self.decode_threads),
            ));
        }
        if !(1..=1 << 20).contains(&self.queue_capacity) {
            return Err(Error::config(
                "queue_capacity",
                format!("{} is not in 1..=1048576", self.queue_capacity),
            ));
        }
        if self.auth_token.as_deref().is_some_and(|t| t.trim().is_empty() || t.contains(char::is_whitespace))
        {
            return Err(Error::config("auth_token", "must be non-empty without whitespace"));
        }
        if let Some(id) = &self.worker_id
            && !valid_worker_id(id)
        {
            return Err(Error::config(
                "worker_id",
                format!("`{id}` is not 1..=128 characters of [A-Za-z0-9._:-]"),
            ));
        }
        if self.max_message_bytes < 1 << 20 {
            return Err(Error::config(
                "max_message_bytes",
                format!("{} is below 1 MiB", self.max_message_bytes),
            ));
        }
        if self.retry_initial_ms == 0 || self.retry_max_ms < self.retry_initial_ms {
            return Err(Error::config("retry_max_ms", "need 0 < retry_initial_ms <= retry_max_ms"));
        }
        Ok(())
    }

    /// The coordinator's URL and the CA to verify it with.
    pub fn coordinator_target(&self) -> Target {
        Target::new(self.coordinator.trim()).with_tls_ca(self.tls_ca.clone())
    }

    /// The pipeline sizes implied by this configuration.
    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            max_batch: self.max_batch,
            max_delay: Duration::from_millis(self.max_delay_ms),
            decode_threads: self.decode_threads,
            decode_queue: self.queue_capacity.div_ceil(2).max(1),
            ready_queue: self.queue_capacity,
            infer_queue: 2,
            stage_rows: 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let cfg = WorkerConfig::from_toml(
            "coordinator = \"http://c:1\"\nmax_batch = 8\nteacher = \"tiny\"\n",
            "w.toml",
        )
        .unwrap();
        assert_eq!(cfg.max_batch, 8);
        assert_eq!(cfg.teacher.as_deref(), Some("tiny"));
        let e = WorkerConfig::from_toml("max_bach = 8\n", "w.toml").unwrap_err().to_string();
        assert!(e.contains("max_bach") && e.contains("w.toml"), "{e}");
    }

    #[test]
    fn tls_keys_in_toml() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tls");
        let p = |f: &str| dir.join(f).display().to_string();
        let text = format!(
            "coordinator = \"https://localhost:1\"\ntls_ca = \"{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        );
        let cfg = WorkerConfig::from_toml(&text, "w.toml").unwrap();
        assert_eq!(cfg.tls_ca.as_deref(), Some(dir.join("ca.pem").as_path()));
        assert_eq!(cfg.tls.unwrap().key, dir.join("server.key"));
        let e = WorkerConfig::from_toml("[tls]\ncert = \"/x\"\n", "w.toml").unwrap_err().to_string();
        assert!(e.contains("key"), "{e}");
    }

    #[test]
    fn validate_names_the_key() {
        type Breaker = Box<dyn Fn(&mut WorkerConfig)>;
        let bad: Vec<(&str, Breaker)> = vec![
            ("coordinator", Box::new(|c| c.coordinator = "127.0.0.1:5".into())),
            ("max_batch", Box::new(|c| c.max_batch = 0)),
            ("decode_threads", Box::new(|c| c.decode_threads = 0)),
            ("worker_id", Box::new(|c| c.worker_id = Some("a b".into()))),
            ("device", Box::new(|c| c.device = "tpu".into())),
            ("teacher", Box::new(|c| c.teacher = Some("nothing-like-this".into()))),
            ("auth_token", Box::new(|c| c.auth_token = Some(" ".into()))),
            ("max_message_bytes", Box::new(|c| c.max_message_bytes = 10)),
            ("tls_ca", Box::new(|c| c.coordinator = "https://c:1".into())),
            ("tls_ca", Box::new(|c| c.tls_ca = Some("/etc/hostname".into()))),
            ("tls.cert", Box::new(|c| c.tls = Some(TlsPaths { cert: "/nope".into(), key: "/nope".into() }))),
        ];
        for (key, f) in bad {
            let mut c = WorkerConfig::default();
            c.validate().unwrap();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
    }
}
