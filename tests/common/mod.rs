//! Shared helpers for the end-to-end tests: they run the real `distillery` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `distillery` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_distillery"))
}

/// A `distillery` command with quiet logs and a fixed thread count.
pub fn distillery(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).env("DISTILLERY_LOG", "warn").env("RAYON_NUM_THREADS", "2");
    c
}

/// Runs `distillery ARGS` and returns its output, whatever the exit status.
pub fn run(args: &[&str]) -> Output {
    distillery(args).output().expect("spawn distillery")
}

/// Runs `distillery ARGS`, asserts success, and returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "distillery {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `distillery ARGS --format json` (the caller includes the flag) and parses stdout.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let s = run_ok(args);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("distillery {args:?}: stdout is not JSON ({e}):\n{s}"))
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Writes a manifest CSV of the real reference photos with their face boxes (split `test`) and
/// returns the parsed `faces.json` entries, in manifest order.
pub fn reference_manifest(reference: &Path, at: &Path) -> Vec<serde_json::Value> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("faces/faces.json")).unwrap()).unwrap();
    let faces = meta["faces"].as_array().unwrap().clone();
    let mut csv = String::from("path,x,y,w,h,split\n");
    for f in &faces {
        let b = f["box_xywh"].as_array().unwrap();
        let img = reference.join("faces/images").join(f["image"].as_str().unwrap());
        csv += &format!("{},{},{},{},{},test\n", img.display(), b[0], b[1], b[2], b[3]);
    }
    std::fs::write(at, csv).unwrap();
    faces
}
