//! The face-api expression network as an ONNX teacher, against onnxruntime's outputs on the same
//! input tensors (`../shared/reference`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use distillery_models::Teacher;
use distillery_models::onnx::{OnnxTeacher, OnnxTeacherConfig};

type R = Result<(), Box<dyn std::error::Error>>;

fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/teachers/faceapi.toml")
}

/// The teacher from `configs/teachers/faceapi.toml`, its model taken from `reference` when the
/// config's relative path does not reach it from this checkout.
fn teacher(reference: &Path) -> Result<OnnxTeacher, Box<dyn std::error::Error>> {
    let path = config_path();
    let mut cfg = OnnxTeacherConfig::from_file(&path)?;
    let base = path.parent().unwrap();
    if !cfg.model_path(base).is_file() {
        cfg.model = reference.join("teachers/faceapi_expression.onnx");
    }
    Ok(OnnxTeacher::from_config(cfg, base, &Device::Cpu)?)
}

fn reference_probs(reference: &Path) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference.join("faces/faces.json"))?)?;
    let faces = json["faces"].as_array().ok_or("faces.json: no `faces` array")?;
    Ok(faces
        .iter()
        .map(|f| {
            f["faceapi_onnxruntime_probs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect())
}

#[test]
fn config_resolves_the_model_beside_the_checkout() -> R {
    let path = config_path();
    let cfg = OnnxTeacherConfig::from_file(&path)?;
    let resolved = cfg.model_path(path.parent().unwrap());
    assert!(
        resolved.ends_with("shared/reference/teachers/faceapi_expression.onnx"),
        "{}",
        resolved.display()
    );
    assert_eq!(cfg.classes.len(), 7);
    assert!(cfg.preprocess.pad_to_square);
    Ok(())
}

#[test]
fn faceapi_matches_onnxruntime_on_reference_inputs() -> R {
    let Some(reference) =
        distillery_core::reference::require("faceapi_matches_onnxruntime_on_reference_inputs")
    else {
        return Ok(());
    };
    let t = teacher(&reference)?;
    let info = t.info();
    assert_eq!(info.classes.names()[3], "angry");
    assert!(!info.has_valence_arousal);
    let x = Tensor::read_npy(reference.join("faces/faceapi_inputs_112.npy"))?;
    assert_eq!(x.dims(), &[36, 3, 112, 112]);
    let want = reference_probs(&reference)?;
    let probs = t.run(&[("input", &x)], &["probs"])?.remove(0).to_vec2::<f32>()?;
    let mut worst = 0f32;
    for (i, (got, want)) in probs.iter().zip(&want).enumerate() {
        for (g, w) in got.iter().zip(want) {
            let d = (g - w).abs();
            assert!(d <= 1e-4, "face {i}: |Δp| = {d} ({got:?} vs {want:?})");
            worst = worst.max(d);
        }
    }
    #[allow(clippy::print_stderr)]
    {
        eprintln!("faceapi vs onnxruntime: max |Δp| = {worst:.3e} over 36 faces");
    }
    // The Teacher interface: logits are ln(max(p, 1e-7)); on the CPU a batch runs in chunks of
    // `cpu_chunk` images (8 here: 8 + 8 + 4 for 20 faces), beyond `max_batch` in batches of that.
    assert_eq!(t.config().cpu_chunk, 8);
    let logits_of = |t: &OnnxTeacher, n: usize| -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
        Ok(t.forward(&x.narrow(0, 0, n)?)?.logits.to_vec2::<f32>()?)
    };
    let logits = logits_of(&t, 20)?;
    assert_eq!(logits.len(), 20);
    for (row, p) in logits.iter().zip(&probs) {
        for (l, p) in row.iter().zip(p) {
            assert!((l - p.max(1e-7).ln()).abs() < 1e-4, "{l} vs ln({p})");
        }
    }
    // Other chunk sizes, and max_batch below cpu_chunk, give the same rows.
    for (cpu_chunk, max_batch) in [(3, 64), (64, 64), (8, 5)] {
        let path = config_path();
        let mut cfg = OnnxTeacherConfig::from_file(&path)?;
        cfg.model = reference.join("teachers/faceapi_expression.onnx");
        (cfg.cpu_chunk, cfg.max_batch) = (cpu_chunk, max_batch);
        let other = OnnxTeacher::from_config(cfg, path.parent().unwrap(), &Device::Cpu)?;
        assert_eq!(other.info().fingerprint, t.info().fingerprint, "chunking is not part of the teacher");
        for (a, b) in logits_of(&other, 20)?.iter().zip(&logits) {
            let d = a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d < 1e-5, "cpu_chunk {cpu_chunk}, max_batch {max_batch}: rows differ by {d}");
        }
    }
    Ok(())
}

#[test]
fn faceapi_fingerprint_depends_on_preprocessing_and_interpretation() -> R {
    let Some(reference) = distillery_core::reference::require("faceapi_fingerprint") else {
        return Ok(());
    };
    let path = config_path();
    let base = path.parent().unwrap();
    let mut cfg = OnnxTeacherConfig::from_file(&path)?;
    cfg.model = reference.join("teachers/faceapi_expression.onnx");
    let a = OnnxTeacher::from_config(cfg.clone(), base, &Device::Cpu)?;
    let mut c2 = cfg.clone();
    c2.preprocess.filter = distillery_core::ResizeFilter::Nearest;
    let b = OnnxTeacher::from_config(c2, base, &Device::Cpu)?;
    let mut c3 = cfg.clone();
    c3.outputs = distillery_models::onnx::OutputKind::Logits;
    let c = OnnxTeacher::from_config(c3, base, &Device::Cpu)?;
    let again = OnnxTeacher::from_config(cfg.clone(), base, &Device::Cpu)?;
    assert_eq!(a.info().fingerprint, again.info().fingerprint);
    assert_ne!(a.info().fingerprint, b.info().fingerprint);
    assert_ne!(a.info().fingerprint, c.info().fingerprint);
    // A config naming a value the graph lacks, or the wrong class count, fails at load naming the key.
    let mut bad = cfg.clone();
    bad.output = "nope".into();
    let e = OnnxTeacher::from_config(bad, base, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("`output`") && e.contains("nope"), "{e}");
    let mut bad = cfg;
    bad.classes.pop();
    let e = OnnxTeacher::from_config(bad, base, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("`classes`"), "{e}");
    Ok(())
}
