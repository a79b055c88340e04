//! Cross-checks our datasets with pylance (`tests/pylance_check.py`). Runs only when a Python with
//! `lance` is available: `$DISTILLERY_PYTHON` or `python3`; skips with a message otherwise.
#![allow(clippy::print_stdout)]

mod common;

use std::process::{Command, Stdio};

use common::*;
use distillery_cache::{CacheOptions, FaceStore, TeacherCache};
use distillery_data::views_for;

fn python_with_lance() -> Option<String> {
    let py = std::env::var("DISTILLERY_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import lance"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(py)
}

#[tokio::test]
async fn pylance_reads_our_datasets_as_documented() {
    let Some(py) = python_with_lance() else {
        println!("SKIPPED: no python with `lance` (set DISTILLERY_PYTHON to a venv with pylance)");
        return;
    };
    let dir = tempdir();
    let (fu, cu) = (uri(&dir, "faces.lance"), uri(&dir, "cache.lance"));
    let mut store = FaceStore::create_or_open(&fu).await.unwrap();
    store.append(faces(0..8)).await.unwrap();
    let mut cache = TeacherCache::create_or_open(&cu, CacheOptions::default()).await.unwrap();
    let rows: Vec<_> = faces(0..8)
        .iter()
        .flat_map(|f| views_for(&f.id, 1, 0).into_iter().map(|v| row(&f.id, v)).collect::<Vec<_>>())
        .collect();
    let s = cache.stage(&meta(1), "k", "w", rows).await.unwrap();
    cache.commit("k", s).await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pylance_check.py");
    let out = Command::new(py).args([script, &fu, &cu, "8", "16"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pylance check failed:\n{text}");
    println!("{text}");
}
