//! The labelling client (`submit_and_wait`, behind `distillery label --coordinator https://...
//! --tls-ca`) against a real coordinator serving TLS over loopback TCP, with the committed test
//! certificates of `tests/fixtures/tls`: with the CA that signed the server's certificate a job is
//! submitted and followed to its end; without it, with another CA or in plaintext, the client is
//! refused with an error that says why, and nothing reaches the coordinator. Waits are on events.

use std::path::PathBuf;
use std::sync::Arc;

use distillery_coordinator::{
    Backends, CoordinatorConfig, MemoryBackend, RunningCoordinator, SystemClock, TlsPaths, spawn_with,
};
use distillery_local::{Error, submit_and_wait};
use distillery_proto::transport::Target;
use distillery_proto::v1;
use tokio::sync::mpsc;

mod common;
use common::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tls").join(name)
}

async fn tls_coordinator(dir: &std::path::Path, b: &Arc<MemoryBackend>) -> RunningCoordinator {
    let mut cfg = CoordinatorConfig::new(dir);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.tls = Some(TlsPaths { cert: fixture("server.pem"), key: fixture("server.key") });
    spawn_with(cfg, Backends::from_shared(b.clone()), Arc::new(SystemClock)).await.unwrap()
}

/// `https://localhost:PORT` of `c`, trusting the CA `ca` (a fixture name) when given.
fn target(c: &RunningCoordinator, ca: Option<&str>) -> Target {
    Target::new(format!("https://localhost:{}", c.addr.port())).with_tls_ca(ca.map(fixture))
}

#[tokio::test]
async fn the_label_client_with_the_ca_follows_a_job_on_a_tls_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(MemoryBackend::new());
    b.add_dataset(FACES, &[5, 3]);
    let c = tls_coordinator(dir.path(), &b).await;
    let coordinator = target(&c, Some("ca.pem"));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let client = tokio::spawn(async move {
        submit_and_wait(&coordinator, None, &request(), move |p| {
            let _ = tx.send(p.clone());
        })
        .await
    });
    let submitted = next(&mut rx).await;
    assert_eq!(submitted.shards_total, 3);
    assert_eq!(c.coordinator.list_jobs(&[], 10).len(), 1, "the job reached the coordinator");
    assert_eq!(label_everything(&c).await, 3);
    let job = tokio::time::timeout(GUARD, client).await.expect("client hung").unwrap().unwrap();
    assert_eq!(job.job_id, submitted.job_id);
    assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
    assert_eq!(job.shards.unwrap().committed, 3);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn clients_without_the_right_ca_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(MemoryBackend::new());
    b.add_dataset(FACES, &[5, 3]);
    let c = tls_coordinator(dir.path(), &b).await;
    let label = |t: Target| async move {
        tokio::time::timeout(GUARD, submit_and_wait(&t, None, &request(), |_| {}))
            .await
            .expect("client hung")
            .expect_err("the client got through")
    };

    // Another CA: the TLS handshake fails on the server's certificate.
    let e = label(target(&c, Some("other-ca.pem"))).await;
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("invalid peer certificate") && msg.contains("CA certificate"), "{msg}");
    assert!(msg.contains(&format!("https://localhost:{}", c.addr.port())), "{msg}");

    // No CA for an https:// URL, an unreadable CA file, a CA for an http:// URL: refused before
    // dialling, saying what to set.
    let e = label(target(&c, None)).await.to_string();
    assert!(e.contains("no CA certificate") && e.contains("--tls-ca"), "{e}");
    let e = label(target(&c, Some("missing-ca.pem"))).await.to_string();
    assert!(e.contains("missing-ca.pem"), "{e}");
    let plain_with_ca = Target::new(format!("http://127.0.0.1:{}", c.addr.port()));
    let e = label(plain_with_ca.clone().with_tls_ca(Some(fixture("ca.pem")))).await.to_string();
    assert!(e.contains("ca.pem") && e.contains("https://"), "{e}");

    // Plaintext to a TLS server: no gRPC conversation happens.
    label(plain_with_ca).await;

    assert!(c.coordinator.list_jobs(&[], 10).is_empty(), "a refused client submitted a job");
    c.shutdown().await.unwrap();
}
