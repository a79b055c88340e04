//! What the labelling-client tests share: a coordinator's in-memory datasets, the request they
//! submit, and a stand-in worker that labels every shard directly on the coordinator.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use distillery_coordinator::RunningCoordinator;
use distillery_coordinator::model::{LeaseOutcome, WorkerInfo};
use distillery_core::TeacherFingerprint;
use distillery_local::{JobProgress, LabelRequest};
use distillery_teacher::TeacherSpec;
use tokio::sync::mpsc;

pub const FACES: &str = "mem://faces";
pub const CACHE: &str = "mem://cache";
/// Guard against a hung test; never reached when things work.
pub const GUARD: Duration = Duration::from_secs(120);

pub fn request() -> LabelRequest {
    LabelRequest {
        faces_uri: FACES.into(),
        cache_uri: CACHE.into(),
        teacher: TeacherSpec::Emonet { classes: 8, weights: Some("/models/emonet_8.pth".into()) },
        views: 0,
        shard_size: 4,
        view_seed: 0,
        storage_options: Default::default(),
    }
}

/// Plays a worker directly on the coordinator: leases and commits every pending shard.
pub async fn label_everything(c: &RunningCoordinator) -> u32 {
    let core = &c.coordinator;
    let reg = core
        .register_worker(WorkerInfo {
            worker_id: "w1".into(),
            address: String::new(),
            teacher_name: "emonet-8".into(),
            teacher_fingerprint: Some(TeacherFingerprint::parse(&"a".repeat(32)).unwrap()),
            device: "cpu".into(),
            max_batch: 8,
        })
        .unwrap();
    let mut n = 0;
    while let LeaseOutcome::Granted(l) = core.lease_shard("w1", &reg.session).unwrap() {
        let staged = format!("{{\"shard_key\":\"{}\",\"fragments\":[]}}", l.shard_key);
        core.complete_shard("w1", &l.lease_id, staged.as_bytes(), l.range.len, 0).await.unwrap();
        n += 1;
    }
    n
}

pub async fn next(rx: &mut mpsc::UnboundedReceiver<JobProgress>) -> JobProgress {
    tokio::time::timeout(GUARD, rx.recv()).await.expect("no progress").expect("client gone")
}
