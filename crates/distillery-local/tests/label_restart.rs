//! The labelling client (`submit_and_wait`, behind `distillery label --coordinator`) against a real
//! coordinator over loopback TCP that is shut down in the middle of the job and started again on
//! the same address and state directory: the client reconnects, re-reads the job and follows it to
//! the end. Waits are on events (progress callbacks, job state), not on sleeps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use distillery_coordinator::{
    Backends, CoordinatorConfig, MemoryBackend, RunningCoordinator, SystemClock, spawn_with,
};
use distillery_local::{Error, Reconnect, submit_and_wait, submit_and_wait_with};
use distillery_proto::transport::Target;
use distillery_proto::v1;
use tokio::sync::mpsc;

mod common;
use common::*;

async fn start(dir: &std::path::Path, listen: SocketAddr, b: &Arc<MemoryBackend>) -> RunningCoordinator {
    let mut cfg = CoordinatorConfig::new(dir);
    cfg.listen = listen;
    spawn_with(cfg, Backends::from_shared(b.clone()), Arc::new(SystemClock)).await.unwrap()
}

#[tokio::test]
async fn the_client_follows_a_job_across_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(MemoryBackend::new());
    b.add_dataset(FACES, &[5, 3]);
    let first = start(dir.path(), SocketAddr::from(([127, 0, 0, 1], 0)), &b).await;
    let addr = first.addr;
    let endpoint = Target::new(first.endpoint(false));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let client = tokio::spawn(async move {
        submit_and_wait(&endpoint, None, &request(), move |p| {
            let _ = tx.send(p.clone());
        })
        .await
    });
    // The submission, then the WatchJob snapshot: the client is watching.
    let submitted = next(&mut rx).await;
    assert_eq!(submitted.shards_total, 3);
    let watching = next(&mut rx).await;
    assert_eq!(watching.job_id, submitted.job_id);
    assert!(["pending", "running"].contains(&watching.state.as_str()), "{watching:?}");

    // Shutdown ends the watch stream (UNAVAILABLE) instead of waiting for the job.
    tokio::time::timeout(GUARD, first.shutdown()).await.expect("shutdown hung").unwrap();
    assert!(!client.is_finished(), "the client gave up when the coordinator went away");

    // Same address, same state: the job is still there, and the client finds it again.
    let second = start(dir.path(), addr, &b).await;
    assert_eq!(label_everything(&second).await, 3);
    let job = tokio::time::timeout(GUARD, client).await.expect("client hung").unwrap().unwrap();
    assert_eq!(job.job_id, submitted.job_id);
    assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
    let shards = job.shards.unwrap();
    assert_eq!((shards.committed, shards.total), (3, 3));
    assert_eq!(job.images_done, 8);
    // The client reported the end it saw after the restart.
    let mut last = watching;
    while let Ok(p) = rx.try_recv() {
        last = p;
    }
    assert_eq!((last.state.as_str(), last.shards_done), ("completed", 3));
    second.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_client_gives_up_when_the_coordinator_stays_away() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(MemoryBackend::new());
    b.add_dataset(FACES, &[5, 3]);
    let only = start(dir.path(), SocketAddr::from(([127, 0, 0, 1], 0)), &b).await;
    let endpoint = Target::new(only.endpoint(false));
    let policy = Reconnect {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
        give_up_after: Duration::from_millis(500),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let client = tokio::spawn(async move {
        submit_and_wait_with(&endpoint, None, &request(), policy, move |p| {
            let _ = tx.send(p.clone());
        })
        .await
    });
    next(&mut rx).await;
    next(&mut rx).await;
    only.shutdown().await.unwrap();
    let e = tokio::time::timeout(GUARD, client).await.expect("client hung").unwrap().unwrap_err();
    assert!(matches!(e, Error::CoordinatorLost { .. }), "{e}");
    assert!(e.to_string().contains("run the same command again"), "{e}");
}
