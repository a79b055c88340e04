//! `distillery quickstart --quick` from a clean directory: every stage runs (synthesis, teacher
//! training, labelling by two gRPC workers, distillation, baseline, evaluation, report) and the
//! report's numbers are present and sane, with the distilled student at least as accurate as the
//! baseline trained without the teacher.
#![allow(clippy::print_stdout)]

mod common;

use common::*;
use serde_json::Value;

fn num(row: &Value, key: &str) -> f64 {
    row[key].as_f64().unwrap_or_else(|| panic!("row {} lacks numeric {key}: {row}", row["name"]))
}

#[test]
fn quick_quickstart_writes_a_sane_report() {
    let dir = tempdir();
    let out = dir.path().join("qs");
    let summary = run_json(&["quickstart", "--quick", "--dir", path_str(&out), "--format", "json"]);
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());

    let faces = summary["faces"].as_u64().unwrap();
    assert!(faces > 0);
    // Every face gets a plain view and one augmented view from the teacher.
    assert_eq!(summary["labelled_rows"].as_u64().unwrap(), 2 * faces);

    let rows = summary["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["teacher", "student-kd", "student-baseline"]);
    for r in rows {
        for key in ["accuracy", "macro_f1"] {
            let v = num(r, key);
            assert!((0.0..=1.0).contains(&v), "{key} {v} of {}", r["name"]);
        }
        for key in ["valence_ccc", "arousal_ccc"] {
            let v = num(r, key);
            assert!((-1.0..=1.0).contains(&v), "{key} {v} of {}", r["name"]);
        }
        for key in ["valence_rmse", "arousal_rmse", "images_per_second"] {
            let v = num(r, key);
            assert!(v.is_finite() && v > 0.0, "{key} {v} of {}", r["name"]);
        }
        assert!(r["parameters"].as_u64().unwrap() > 0);
        assert!(r["macs"].as_u64().unwrap() > 0);
    }
    let acc = |name: &str| num(rows.iter().find(|r| r["name"] == name).unwrap(), "accuracy");
    // Eight balanced classes: chance is 0.125. The teacher saw every label and learnt something.
    assert!(acc("teacher") > 0.15, "teacher accuracy {}", acc("teacher"));
    assert!(
        acc("student-kd") >= acc("student-baseline"),
        "distilled student {} below the baseline {}",
        acc("student-kd"),
        acc("student-baseline")
    );

    // The report and its plots are on disk.
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in ["| model |", "accuracy", "teacher", "student, KD + teacher bound", "student, labels only"]
    {
        assert!(report.contains(needle), "report.md lacks {needle:?}:\n{report}");
    }
    for png in [
        "plots/confusion-teacher.png",
        "plots/confusion-student-kd.png",
        "plots/valence-arousal-student-kd.png",
        "student-kd/plots/training_curves.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
    }
    // And the Lance datasets it wrote are there for later runs.
    assert!(out.join("faces.lance/_versions").is_dir());
    assert!(out.join("cache.lance/_versions").is_dir());
}
