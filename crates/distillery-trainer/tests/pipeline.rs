//! A whole run over real Lance datasets: stream from the teacher cache, train, checkpoint, save,
//! evaluate, report; and a stopped run resumed from its checkpoint ends where an uninterrupted one
//! does.

mod common;

use candle_core::Device;
use distillery_models::student::load_student;
use distillery_trainer::TrainConfig;
use distillery_trainer::run::{RunOptions, RunReport, run};

fn weights(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> =
        t.into_iter().map(|(k, x)| (k, x.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_run_reports_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (faces, cache) = common::datasets(tmp.path(), 80).await;
    let cfg = TrainConfig::from_toml_str(&common::config_toml(&faces, Some(&cache), 10)).unwrap();

    let straight = tmp.path().join("straight");
    let report = run(&cfg, RunOptions::new(&straight)).await.unwrap();
    assert_eq!(report.train.steps, 10);
    assert_eq!(report.teacher.as_deref(), Some(common::meta().fingerprint.as_str()));
    let eval = report.eval.as_ref().expect("a finished run is evaluated");
    assert_eq!(eval.split, "val");
    assert_eq!(eval.n, 16);
    let agreement = eval.teacher.as_ref().expect("cache rows give teacher agreement");
    assert_eq!(agreement.n, 16);
    for f in ["report.json", "eval.json", "metrics.jsonl", "config.toml", "student.json", "model.safetensors"]
    {
        assert!(straight.join(f).is_file(), "{f} missing");
    }
    for f in ["training_curves.png", "confusion.png", "valence_arousal.png"] {
        assert!(straight.join("plots").join(f).is_file(), "plot {f} missing");
    }
    let on_disk: RunReport =
        serde_json::from_str(&std::fs::read_to_string(straight.join("report.json")).unwrap()).unwrap();
    assert_eq!(on_disk.train.steps, 10);
    let (spec, _, _) = load_student(&straight, &Device::Cpu).unwrap();
    assert_eq!(spec.name(), "tiny@32");
    // Feature matching needs a projection to the teacher's 6-wide embedding.
    assert_eq!(spec.embed_proj, Some(6));

    let resumed = tmp.path().join("resumed");
    let mut first = RunOptions::new(&resumed);
    first.stop_after = Some(6);
    let partial = run(&cfg, first).await.unwrap();
    assert_eq!(partial.train.steps, 6);
    assert!(partial.eval.is_none());
    let mut second = RunOptions::new(&resumed);
    second.resume = true;
    let done = run(&cfg, second).await.unwrap();
    assert_eq!(done.train.resumed_from, 6);
    assert_eq!(done.train.steps, 10);
    assert_eq!(weights(&straight), weights(&resumed), "resumed run ended with different weights");
    assert_eq!(
        std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap(),
        std::fs::read_to_string(resumed.join("metrics.jsonl")).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (faces, cache) = common::datasets(tmp.path(), 24).await;
    let cfg = TrainConfig::from_toml_with_overrides(
        &common::config_toml(&faces, Some(&cache), 2),
        &["data.teacher=00000000000000000000000000000000".to_string()],
    )
    .unwrap();
    let e = run(&cfg, RunOptions::new(tmp.path().join("r"))).await.unwrap_err().to_string();
    assert!(e.contains("data.teacher") && e.contains("not in cache"), "{e}");
    let cfg = TrainConfig::from_toml_with_overrides(
        &common::config_toml(&faces, None, 2),
        &["student.spec=tiny@30".to_string()],
    )
    .unwrap();
    let e = run(&cfg, RunOptions::new(tmp.path().join("r2"))).await.unwrap_err().to_string();
    assert!(e.contains("student"), "{e}");
}
