//! The data commands end to end, through the real binary and real files: `synth`, `ingest`
//! (manifest of the real reference photos, a folder with corrupt files), `faces inspect`,
//! `label --local`, `cache list|inspect|compact|cleanup`, `models`.
#![allow(clippy::print_stdout)]

mod common;

use common::*;
use serde_json::Value;

fn synth(out: &str, count: u32, size: u32, seed: u32) -> Value {
    run_json(&[
        "synth",
        "--count",
        &count.to_string(),
        "--size",
        &size.to_string(),
        "--seed",
        &seed.to_string(),
        "--out",
        out,
        "--format",
        "json",
    ])
}

#[test]
fn synth_is_deterministic_idempotent_and_inspectable() {
    let dir = tempdir();
    let uri = dir.path().join("faces.lance");
    let uri = path_str(&uri);
    let first = synth(uri, 120, 32, 7);
    assert_eq!(first["accepted"], 120, "{first}");
    assert_eq!(first["already_stored"], 0, "{first}");
    // Same seed again: the same faces (same content ids), so nothing is added.
    let again = synth(uri, 120, 32, 7);
    assert_eq!(again["accepted"], 0, "{again}");
    assert_eq!(again["already_stored"], 120, "{again}");

    let stats = run_json(&["faces", "inspect", uri, "--format", "json"]);
    println!("{stats}");
    assert_eq!(stats["faces"], 120);
    assert_eq!(stats["rejects"], 0);
    let splits = stats["splits"].as_object().unwrap();
    let total: u64 = splits.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 120);
    assert!(splits.len() >= 2, "synth makes more than one split: {splits:?}");
    // All eight classes appear in the training split.
    let train = stats["classes"]["train"].as_object().unwrap();
    assert_eq!(train.len(), 8, "classes in train: {train:?}");
    // Valence/arousal stay in [-1, 1].
    for key in ["valence", "arousal"] {
        let m = stats[key]["mean"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&m), "{key} mean {m}");
    }
}

#[test]
fn ingest_manifest_of_real_photos_with_boxes() {
    let Some(reference) = distillery_core::reference::require("ingest_manifest_of_real_photos_with_boxes")
    else {
        return;
    };
    let dir = tempdir();
    let manifest = dir.path().join("faces.csv");
    let n = reference_manifest(&reference, &manifest).len();
    let uri = dir.path().join("real.lance");
    let uri = path_str(&uri);
    let s =
        run_json(&["ingest", "manifest", "--file", path_str(&manifest), "--out", uri, "--format", "json"]);
    println!("{s}");
    assert_eq!(s["accepted"].as_u64().unwrap() as usize, n, "{s}");
    assert_eq!(s["rejected"], 0, "{s}");
    // Re-ingest adds nothing.
    let s =
        run_json(&["ingest", "manifest", "--file", path_str(&manifest), "--out", uri, "--format", "json"]);
    assert_eq!(s["accepted"], 0, "{s}");
    assert_eq!(s["already_stored"].as_u64().unwrap() as usize, n, "{s}");
    let stats = run_json(&["faces", "inspect", uri, "--format", "json"]);
    assert_eq!(stats["faces"].as_u64().unwrap() as usize, n);
    assert_eq!(stats["splits"]["test"].as_u64().unwrap() as usize, n);
}

fn png(side: u32, seed: u8) -> Vec<u8> {
    let mut img = image::RgbImage::new(side, side);
    for (x, y, p) in img.enumerate_pixels_mut() {
        *p = image::Rgb([(x as u8).wrapping_mul(seed), (y as u8).wrapping_add(seed), seed]);
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A PNG whose header claims 60000×60000 pixels: a decompression bomb if decoded.
fn bomb_png() -> Vec<u8> {
    let mut head = png(4, 1);
    // IHDR width and height live at bytes 16..24; the CRC is not recomputed, and either way the
    // file must be refused, not decoded.
    head[16..20].copy_from_slice(&60000u32.to_be_bytes());
    head[20..24].copy_from_slice(&60000u32.to_be_bytes());
    head
}

#[test]
fn ingest_folder_records_corrupt_files_and_keeps_the_good_ones() {
    let dir = tempdir();
    let root = dir.path().join("fer");
    for class in ["happy", "sad"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
    }
    for i in 0..3u8 {
        std::fs::write(root.join("happy").join(format!("ok{i}.png")), png(24, i + 1)).unwrap();
        std::fs::write(root.join("sad").join(format!("ok{i}.png")), png(24, i + 10)).unwrap();
    }
    let good = png(24, 99);
    std::fs::write(root.join("happy/zero.png"), b"").unwrap();
    std::fs::write(root.join("happy/truncated.png"), &good[..good.len() / 2]).unwrap();
    std::fs::write(root.join("sad/notes.jpg"), b"this is not an image at all").unwrap();
    std::fs::write(root.join("sad/bomb.png"), bomb_png()).unwrap();

    let uri = dir.path().join("fer.lance");
    let uri = path_str(&uri);
    let s = run_json(&["ingest", "folder", "--root", path_str(&root), "--out", uri, "--format", "json"]);
    println!("{s}");
    assert_eq!(s["accepted"], 6, "{s}");
    assert_eq!(s["rejected"], 4, "{s}");
    let stats = run_json(&["faces", "inspect", uri, "--format", "json"]);
    assert_eq!(stats["faces"], 6);
    assert_eq!(stats["rejects"], 4);

    // Nothing usable: exit code 3, and the reason is on stderr.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(bad.join("happy")).unwrap();
    std::fs::write(bad.join("happy/zero.png"), b"").unwrap();
    let out = run(&[
        "ingest",
        "folder",
        "--root",
        path_str(&bad),
        "--out",
        path_str(&dir.path().join("bad.lance")),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing usable"));

    // Missing input: a failure naming the path.
    let missing = dir.path().join("no-such-folder");
    let out = run(&["ingest", "folder", "--root", path_str(&missing), "--out", uri]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-folder"), "{err}");
}

#[test]
fn label_locally_then_inspect_compact_and_clean_the_cache() {
    let dir = tempdir();
    let faces = dir.path().join("faces.lance");
    let faces = path_str(&faces);
    let cache = dir.path().join("cache.lance");
    let cache = path_str(&cache);
    synth(faces, 90, 16, 3);
    // The teacher: a tiny student trained for a few steps (any student run directory is a teacher).
    let teacher = dir.path().join("teacher");
    run_ok(&[
        "train",
        "--faces",
        faces,
        "--student",
        "tiny@16",
        "--set",
        "optim.steps=3",
        "--set",
        "data.batch_size=16",
        "--out",
        path_str(&teacher),
        "--no-progress",
    ]);
    // The student answers `predict` one JSON line per input, in input order.
    let img = dir.path().join("face.png");
    std::fs::write(&img, png(16, 3)).unwrap();
    let other = dir.path().join("other.png");
    std::fs::write(&other, png(40, 9)).unwrap();
    let lines = run_ok(&[
        "predict",
        "--model",
        path_str(&teacher),
        "--image",
        path_str(&img),
        "--image",
        path_str(&other),
        "--format",
        "jsonl",
    ]);
    let preds: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(preds.len(), 2, "{lines}");
    for p in &preds {
        assert_eq!(p["logits"].as_array().unwrap().len(), 8, "{p}");
        let total: f64 = p["probs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-4, "{p}");
        assert_eq!(p["classes"].as_array().unwrap().len(), 8, "{p}");
        assert!(p["valence"].is_number() && p["arousal"].is_number(), "{p}");
    }
    let label = |views: &str| {
        run_json(&[
            "label",
            "--faces",
            faces,
            "--cache",
            cache,
            "--teacher",
            path_str(&teacher),
            "--views",
            views,
            "--local",
            "--workers",
            "2",
            "--shard-size",
            "16",
            "--format",
            "json",
        ])
    };
    let job = label("1");
    println!("{job}");
    assert_eq!(job["rows_written"], 180, "{job}");

    let inspected = run_json(&["cache", "inspect", cache, "--faces", faces, "--format", "json"]);
    println!("{inspected}");
    assert_eq!(inspected["rows"], 180);
    assert_eq!(inspected["views"]["0"], 90);
    assert_eq!(inspected["views"]["1"], 90);
    let cov = &inspected["coverage"][0];
    assert_eq!(
        (cov["faces"].as_u64(), cov["covered"].as_u64(), cov["missing"].as_u64()),
        (Some(90), Some(90), Some(0))
    );

    let listed = run_json(&["cache", "list", cache, "--format", "json"]);
    let teachers = listed.as_array().unwrap();
    assert_eq!(teachers.len(), 1);
    assert_eq!(teachers[0]["rows"], 180);
    assert_eq!(teachers[0]["fingerprint"], job["teacher_fingerprint"]);

    // The same job again: every face is already cached, no rows are written.
    let again = label("1");
    assert_eq!(again["rows_written"], 0, "{again}");

    // Compaction merges the per-shard fragments and keeps every row.
    let c = run_json(&["cache", "compact", cache, "--format", "json"]);
    println!("{c}");
    assert!(c["fragments_before"].as_u64().unwrap() > 1, "{c}");
    assert!(c["fragments_after"].as_u64().unwrap() < c["fragments_before"].as_u64().unwrap(), "{c}");
    let cleaned = run_json(&["cache", "cleanup", cache, "--older-than-hours", "0", "--format", "json"]);
    println!("{cleaned}");
    assert!(cleaned["old_versions"].as_u64().unwrap() > 0, "{cleaned}");
    let after = run_json(&["cache", "inspect", cache, "--format", "json"]);
    assert_eq!(after["rows"], 180);
    assert_eq!(after["versions"].as_array().unwrap().len(), 1, "{after}");
}

#[test]
fn models_lists_the_zoo_with_computed_costs() {
    let rows = run_json(&["models", "--student", "tiny@48", "--format", "json"]);
    let rows = rows.as_array().unwrap();
    let find = |name: &str| {
        rows.iter().find(|r| r["name"] == name).unwrap_or_else(|| {
            panic!("{name} not listed: {:?}", rows.iter().map(|r| &r["name"]).collect::<Vec<_>>())
        })
    };
    let emonet = find("emonet-8");
    assert_eq!(emonet["parameters"], 13_963_410);
    let gmacs = emonet["macs"].as_u64().unwrap() as f64 / 1e9;
    assert!((gmacs - 16.93).abs() < 0.01, "EmoNet-8 {gmacs} GMACs");
    assert_eq!(emonet["input_shape"], serde_json::json!([3, 256, 256]));
    assert!(find("tiny@48")["macs"].as_u64().unwrap() > 0);
    let m = find("mobilenetv2:1@224");
    let gmacs = m["macs"].as_u64().unwrap() as f64 / 1e9;
    assert!((gmacs - 0.30).abs() < 0.01, "MobileNetV2 {gmacs} GMACs");
    for r in rows {
        assert!(r["parameters"].as_u64().unwrap() > 0 && r["macs"].as_u64().unwrap() > 0, "{r}");
    }
}

#[test]
fn predict_with_the_onnx_teacher_matches_onnxruntime() {
    let Some(reference) = distillery_core::reference::require("predict_with_the_onnx_teacher") else {
        return;
    };
    let teacher =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/teachers/faceapi.toml");
    let npy = reference.join("faces/faceapi_inputs_112.npy");
    let lines =
        run_ok(&["predict", "--teacher", path_str(&teacher), "--npy", path_str(&npy), "--format", "jsonl"]);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("faces/faces.json")).unwrap()).unwrap();
    let faces = meta["faces"].as_array().unwrap();
    let preds: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(preds.len(), faces.len());
    for (p, f) in preds.iter().zip(faces) {
        assert!(p["valence"].is_null(), "face-api has no valence: {p}");
        let ours = p["probs"].as_array().unwrap();
        let ort = f["faceapi_onnxruntime_probs"].as_array().unwrap();
        for (a, b) in ours.iter().zip(ort) {
            let d = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
            assert!(d < 1e-4, "{}: {a} vs onnxruntime {b}", f["id"]);
        }
    }
}
