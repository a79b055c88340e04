//! Shared fixtures: a coordinator over an in-memory backend with a manual clock.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use distillery_coordinator::model::{JobSpec, TeacherKind, TeacherSpec, WorkerInfo};
use distillery_coordinator::{Coordinator, CoordinatorOptions, ManualClock, MemoryBackend};
use distillery_core::TeacherFingerprint;

pub const FACES: &str = "mem://faces";
pub const CACHE: &str = "mem://cache";
pub const TTL: Duration = Duration::from_secs(10);

pub fn fp(c: char) -> TeacherFingerprint {
    TeacherFingerprint::parse(&c.to_string().repeat(32)).unwrap()
}

pub fn spec(shard_size: u64) -> JobSpec {
    JobSpec {
        faces_uri: FACES.into(),
        cache_uri: CACHE.into(),
        teacher: TeacherSpec {
            kind: TeacherKind::Emonet8,
            config_path: String::new(),
            weights_path: "/weights/emonet_8.pth".into(),
            fingerprint: Some(fp('a')),
        },
        views: 1,
        shard_size,
        priority: 0,
        storage_options: BTreeMap::new(),
        view_seed: 0,
    }
}

pub fn worker(id: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: id.into(),
        address: String::new(),
        teacher_name: "emonet-8".into(),
        teacher_fingerprint: Some(fp('a')),
        device: "cpu".into(),
        max_batch: 8,
    }
}

pub struct Fixture {
    pub core: Coordinator,
    pub clock: Arc<ManualClock>,
    pub backend: Arc<MemoryBackend>,
}

pub async fn open(
    dir: &Path,
    backend: Arc<MemoryBackend>,
    clock: Arc<ManualClock>,
    max_attempts: u32,
) -> Fixture {
    let opts = CoordinatorOptions { state_dir: dir.to_path_buf(), lease_ttl: TTL, max_attempts };
    let core = Coordinator::open(opts, backend.clone(), backend.clone(), clock.clone(), Default::default())
        .await
        .expect("open coordinator");
    Fixture { core, clock, backend }
}

/// A backend with one faces dataset of two fragments (5 and 3 rows).
pub fn backend() -> Arc<MemoryBackend> {
    let b = Arc::new(MemoryBackend::new());
    b.add_dataset(FACES, &[5, 3]);
    b
}

pub fn staged(key: &str) -> Vec<u8> {
    format!("{{\"shard_key\":\"{key}\",\"fragments\":[]}}").into_bytes()
}
