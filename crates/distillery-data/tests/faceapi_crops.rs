//! Real faces through the whole path: decode the photo, crop the box (zero-padded square),
//! bilinear resize to 112, and (a) compare with the exact tensors face-api was given, (b) run the
//! face-api ONNX teacher and agree with onnxruntime on the top class. Needs `../shared/reference`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use distillery_data::preprocess::{batch_to_tensor, crop, decode, to_chw};
use distillery_models::Teacher;
use distillery_models::onnx::{OnnxTeacher, OnnxTeacherConfig};

type R = Result<(), Box<dyn std::error::Error>>;

struct Face {
    image: String,
    box_xywh: [f32; 4],
    is_face: bool,
    probs: Vec<f32>,
}

fn faces(reference: &Path) -> Result<Vec<Face>, Box<dyn std::error::Error>> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference.join("faces/faces.json"))?)?;
    let arr = json["faces"].as_array().ok_or("faces.json: no `faces` array")?;
    arr.iter()
        .map(|f| {
            let b: Vec<f32> = f["box_xywh"]
                .as_array()
                .ok_or("box_xywh")?
                .iter()
                .map(|v| v.as_f64().unwrap_or(0.0) as f32)
                .collect();
            Ok(Face {
                image: f["image"].as_str().ok_or("image")?.to_string(),
                box_xywh: [b[0], b[1], b[2], b[3]],
                is_face: f["is_face"].as_bool().ok_or("is_face")?,
                probs: f["faceapi_onnxruntime_probs"]
                    .as_array()
                    .ok_or("probs")?
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
                    .collect(),
            })
        })
        .collect()
}

fn teacher(reference: &Path) -> Result<OnnxTeacher, Box<dyn std::error::Error>> {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/teachers/faceapi.toml");
    let mut cfg = OnnxTeacherConfig::from_file(&path)?;
    cfg.model = reference.join("teachers/faceapi_expression.onnx");
    Ok(OnnxTeacher::from_config(cfg, path.parent().unwrap(), &Device::Cpu)?)
}

/// Each face cropped and preprocessed the teacher's way, in faces.json order.
fn inputs(
    reference: &Path,
    t: &OnnxTeacher,
    fs: &[Face],
) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
    let p = &t.info().preprocess;
    let mut cache: std::collections::HashMap<String, image::RgbImage> = Default::default();
    let mut out = Vec::new();
    for f in fs {
        if !cache.contains_key(&f.image) {
            let bytes = std::fs::read(reference.join("faces/images").join(&f.image))?;
            cache.insert(f.image.clone(), decode(&bytes)?);
        }
        let c = crop(&cache[&f.image], f.box_xywh, p.pad_to_square);
        out.push(to_chw(&c, p));
    }
    Ok(out)
}

#[test]
fn crops_match_the_reference_input_tensors() -> R {
    let Some(reference) = distillery_core::reference::require("crops_match_the_reference_input_tensors")
    else {
        return Ok(());
    };
    let t = teacher(&reference)?;
    let fs = faces(&reference)?;
    let ours = inputs(&reference, &t, &fs)?;
    let want = Tensor::read_npy(reference.join("faces/faceapi_inputs_112.npy"))?
        .flatten_from(1)?
        .to_vec2::<f32>()?;
    assert_eq!(want.len(), fs.len());
    // PNG decoding is exact, so the astronaut crop isolates the crop/resize arithmetic; JPEG
    // decoders (IDCT, chroma upsampling) legitimately differ by a few levels per pixel.
    let (mut worst_png, mut worst_jpg, mut sum, mut n) = (0f32, 0f32, 0f64, 0usize);
    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        let mean = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / a.len() as f64;
        sum += mean * a.len() as f64;
        n += a.len();
        if fs[i].image.ends_with(".png") {
            worst_png = worst_png.max(d);
        } else {
            worst_jpg = worst_jpg.max(d);
        }
        assert!(mean <= 0.5, "face {i} ({}): mean |Δ| = {mean} (0..255 scale)", fs[i].image);
    }
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "crop+resize vs faceapi_inputs_112.npy (0..255): max |Δ| PNG {worst_png:.5}, JPEG {worst_jpg:.4}; mean |Δ| {:.5}",
            sum / n as f64
        );
    }
    assert!(worst_png <= 1e-3, "PNG crop differs by {worst_png}");
    assert!(worst_jpg <= 6.0, "JPEG crop differs by {worst_jpg}");
    Ok(())
}

#[test]
fn teacher_on_real_face_crops_agrees_with_onnxruntime_top1() -> R {
    let Some(reference) =
        distillery_core::reference::require("teacher_on_real_face_crops_agrees_with_onnxruntime_top1")
    else {
        return Ok(());
    };
    let t = teacher(&reference)?;
    let fs: Vec<Face> = faces(&reference)?.into_iter().filter(|f| f.is_face).collect();
    assert_eq!(fs.len(), 18);
    let x = batch_to_tensor(&inputs(&reference, &t, &fs)?, &t.info().preprocess, &Device::Cpu)?;
    let logits = t.forward(&x)?.logits.to_vec2::<f32>()?;
    let argmax =
        |v: &[f32]| v.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
    for (f, l) in fs.iter().zip(&logits) {
        assert_eq!(
            argmax(l),
            argmax(&f.probs),
            "{} {:?}: logits {l:?} vs probs {:?}",
            f.image,
            f.box_xywh,
            f.probs
        );
    }
    Ok(())
}
