//! The documented real-teacher example (docs/guide.md, "Example: a real ONNX teacher on real
//! photos"): the real face-api expression network, described by `configs/teachers/faceapi.toml`,
//! labels the real photos of `../shared/reference/faces/` through the whole pipeline — manifest
//! ingest with face boxes, an embedded coordinator and two gRPC workers, a Lance cache — and the
//! cached top-1 class of every real face agrees with onnxruntime's on the same crop.
#![allow(clippy::print_stdout)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use distillery_cache::TeacherCache;
use distillery_core::{FaceId, TeacherFingerprint};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

#[test]
fn faceapi_teacher_labels_the_real_photos_through_the_pipeline() {
    let Some(reference) = distillery_core::reference::require("faceapi example") else { return };
    let dir = tempdir();
    // 1. A manifest of the photos with their face boxes.
    let manifest = dir.path().join("photos.csv");
    let faces_meta = reference_manifest(&reference, &manifest);
    let faces = dir.path().join("photos.lance");
    let faces = path_str(&faces);
    let cache = dir.path().join("faceapi-cache.lance");
    let cache = path_str(&cache);

    // 2. Ingest, 3. label with the ONNX teacher on an embedded cluster (the guide's commands).
    let ingested =
        run_json(&["ingest", "manifest", "--file", path_str(&manifest), "--out", faces, "--format", "json"]);
    assert_eq!(ingested["accepted"].as_u64().unwrap() as usize, faces_meta.len(), "{ingested}");
    let teacher = repo_root().join("configs/teachers/faceapi.toml");
    let job = run_json(&[
        "label",
        "--faces",
        faces,
        "--cache",
        cache,
        "--teacher",
        path_str(&teacher),
        "--local",
        "--workers",
        "2",
        "--shard-size",
        "8",
        "--format",
        "json",
    ]);
    println!("{job}");
    assert_eq!(job["rows_written"].as_u64().unwrap() as usize, faces_meta.len(), "{job}");
    assert!(job["poisoned"].as_array().unwrap().is_empty(), "{job}");

    // 4. Read the cache back and compare each real face with onnxruntime's output.
    let fp = TeacherFingerprint::parse(job["teacher_fingerprint"].as_str().unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rows = rt.block_on(async { TeacherCache::open(cache).await.unwrap().rows(&fp).await.unwrap() });
    assert_eq!(rows.len(), faces_meta.len());
    let (mut real, mut agree) = (0, 0);
    for f in faces_meta {
        let bytes = std::fs::read(reference.join("faces/images").join(f["image"].as_str().unwrap())).unwrap();
        let b: Vec<f32> =
            f["box_xywh"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let id = FaceId::of(&bytes, Some([b[0], b[1], b[2], b[3]]));
        let row = rows.iter().find(|r| r.face_id == id && r.view.index == 0).unwrap_or_else(|| {
            panic!("no cache row for {} ({})", f["id"], id.as_str());
        });
        let ours: Vec<f64> = row.logits.iter().map(|&x| x as f64).collect();
        let ort: Vec<f64> =
            f["faceapi_onnxruntime_probs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let same = argmax(&ours) == argmax(&ort);
        println!(
            "{:<16} is_face={:<5} ours={} onnxruntime={} {}",
            f["id"].as_str().unwrap(),
            f["is_face"],
            argmax(&ours),
            argmax(&ort),
            if same { "" } else { "DIFFERENT" }
        );
        if f["is_face"].as_bool().unwrap() {
            real += 1;
            agree += usize::from(same);
        }
    }
    assert!(real > 0);
    assert_eq!(agree, real, "top-1 agreement on real faces: {agree}/{real}");
}
