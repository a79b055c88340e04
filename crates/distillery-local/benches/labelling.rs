//! End-to-end labelling throughput through the real system: a coordinator and K teacher workers as
//! gRPC servers on loopback, faces and cache in Lance on local disk, and a cheap teacher (a tiny
//! student trained for one step) so the numbers measure the system's own overhead.
//!
//! Prints, as JSON lines: images/s with 1, 2 and 4 workers, and the coordinator's overhead per
//! shard, taken as the slope of the one-worker wall time against the number of shards (the same
//! faces labelled in shards of 64 and of 1024).
//!
//! `./dev bench --bench labelling` (env: BENCH_FACES, default 4096; BENCH_SIDE, default 32).
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::time::Instant;

use distillery_cache::FaceStore;
use distillery_data::synth::{self, SynthConfig};
use distillery_local::{LabelRequest, LocalCluster, LocalClusterConfig, submit_and_wait};
use distillery_teacher::TeacherSpec;
use distillery_trainer::TrainConfig;
use distillery_trainer::run::{RunOptions, run};

#[global_allocator]
static GLOBAL: distillery_models::alloc::Allocator = distillery_models::alloc::Allocator;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Labels every face into a fresh cache with `workers` workers; returns (seconds, shards).
async fn label(
    dir: &Path,
    faces: &str,
    teacher: &Path,
    workers: usize,
    shard_size: u64,
    tag: &str,
) -> (f64, u64) {
    let mut cfg = LocalClusterConfig::new(dir.join(format!("coord-{tag}")), workers);
    cfg.decode_threads = 1;
    let cluster = LocalCluster::start(&cfg).await.expect("start cluster");
    let req = LabelRequest {
        faces_uri: faces.to_owned(),
        cache_uri: dir.join(format!("cache-{tag}.lance")).to_string_lossy().into_owned(),
        teacher: TeacherSpec::Student(teacher.to_path_buf()),
        views: 0,
        shard_size,
        view_seed: 0,
        storage_options: Default::default(),
    };
    let t0 = Instant::now();
    let job = submit_and_wait(&cluster.endpoint(), None, &req, |_| {}).await.expect("label");
    let secs = t0.elapsed().as_secs_f64();
    cluster.shutdown().await.expect("shutdown");
    assert!(job.poisoned.is_empty(), "poisoned shards: {:?}", job.poisoned);
    (secs, job.images_total.div_ceil(shard_size))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    distillery_models::alloc::keep_freed_pages();
    let n = env("BENCH_FACES", 4096);
    let side = env("BENCH_SIDE", 32) as u32;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let faces = dir.join("faces.lance").to_string_lossy().into_owned();
    let cfg = SynthConfig { count: n, size: side, seed: 1, ..SynthConfig::default() };
    let mut store = FaceStore::create_or_open(&faces).await.unwrap();
    store.append(synth::generate(cfg).collect()).await.unwrap();

    let teacher = dir.join("teacher");
    let mut tcfg = TrainConfig { seed: 1, ..TrainConfig::default() };
    tcfg.data.faces = Some(faces.clone());
    tcfg.data.batch_size = 16;
    tcfg.student.spec = format!("tiny@{side}");
    tcfg.optim.steps = Some(1);
    let mut opts = RunOptions::new(&teacher);
    opts.plots = false;
    run(&tcfg, opts).await.expect("train the cheap teacher");

    for workers in [1usize, 2, 4] {
        let (secs, shards) = label(dir, &faces, &teacher, workers, 256, &format!("w{workers}")).await;
        println!(
            "{}",
            serde_json::json!({
                "bench": "labelling", "workers": workers, "faces": n, "side": side, "shards": shards,
                "seconds": secs, "images_per_s": n as f64 / secs,
            })
        );
    }
    let (t_small, s_small) = label(dir, &faces, &teacher, 1, 64, "s64").await;
    let (t_large, s_large) = label(dir, &faces, &teacher, 1, 1024, "s1024").await;
    let per_shard_ms = 1e3 * (t_small - t_large) / (s_small - s_large) as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "shard_overhead", "faces": n, "shards_small": s_small, "seconds_small": t_small,
            "shards_large": s_large, "seconds_large": t_large, "overhead_ms_per_shard": per_shard_ms,
        })
    );
}
