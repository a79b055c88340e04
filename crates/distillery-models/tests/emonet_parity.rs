//! EmoNet against the PyTorch reference: same formula weights and inputs, outputs compared with
//! `fixtures/emonet_parity.json` (written by `fixtures/emonet_parity.py`). Also checks the
//! parameter count, the MAC count (≈16.93 G per image for EmoNet-8) and the teacher metadata.

mod emonet_fixture;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use distillery_models::Teacher;
use distillery_models::cost;
use distillery_models::emonet::{EmoNet, EmoNetVariant};
use emonet_fixture::{GAIN, f64s, fixture, formula_images, formula_state_dict};
use serde_json::Value;

const TOL: f64 = 1e-3;

fn build(fx: &Value, variant: EmoNetVariant) -> EmoNet {
    let sd = formula_state_dict(fx, variant.name());
    EmoNet::new(variant, VarBuilder::from_tensors(sd, DType::F32, &Device::Cpu)).unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((f64::from(*g) - w).abs() <= tol, "{what}[{i}]: got {g}, reference {w} (tol {tol})");
    }
}

/// Runs `variant` on the fixture images and compares every recorded output.
fn check_variant(variant: EmoNetVariant) {
    let fx = fixture();
    assert_eq!(fx["weight_formula"]["gain"].as_f64(), Some(GAIN), "fixture and test disagree on the gain");
    let reference = &fx["variants"][variant.name()];
    let model = build(&fx, variant);
    let images = formula_images(2, 256);

    let (out, macs) = cost::count(|| model.forward_all(&images).unwrap());
    assert_eq!(macs / 2, reference["macs_per_image"].as_u64().unwrap(), "MACs per image vs PyTorch hooks");
    if variant == EmoNetVariant::Eight {
        let rel = ((macs / 2) as f64 - 16.93e9).abs() / 16.93e9;
        assert!(rel < 0.01, "EmoNet-8 MACs per image {} are not ≈16.93e9", macs / 2);
    }

    let n_expr = variant.n_expression();
    assert_eq!(out.logits.dims(), &[2, n_expr]);
    let logits = out.logits.to_vec2::<f32>().unwrap();
    let valence = out.valence.as_ref().unwrap().to_vec1::<f32>().unwrap();
    let arousal = out.arousal.as_ref().unwrap().to_vec1::<f32>().unwrap();
    let embedding = out.embedding.as_ref().unwrap().to_vec2::<f32>().unwrap();
    let landmarks = out.landmarks.as_ref().unwrap();
    assert_eq!(landmarks.dims(), &[2, 68, 2]);
    let landmarks = landmarks.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();

    for (n, img) in reference["images"].as_array().unwrap().iter().enumerate() {
        let tag = format!("{} image {n}", variant.name());
        let want_logits = f64s(&img["logits"]);
        // The outputs must be informative for the tolerance to mean anything.
        let spread = want_logits.iter().cloned().fold(f64::MIN, f64::max)
            - want_logits.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread > 0.5, "{tag}: reference logits are nearly constant");
        assert_close(&format!("{tag} logits"), &logits[n], &want_logits, TOL);
        assert_close(&format!("{tag} valence"), &valence[n..=n], &[img["valence"].as_f64().unwrap()], TOL);
        assert_close(&format!("{tag} arousal"), &arousal[n..=n], &[img["arousal"].as_f64().unwrap()], TOL);
        assert_close(&format!("{tag} embedding"), &embedding[n][..8], &f64s(&img["embedding_first8"]), TOL);
        let sum: f64 = embedding[n].iter().map(|v| f64::from(*v)).sum();
        let sum_sq: f64 = embedding[n].iter().map(|v| f64::from(*v).powi(2)).sum();
        let want_sum_sq = img["embedding_sum_sq"].as_f64().unwrap();
        assert!((sum - img["embedding_sum"].as_f64().unwrap()).abs() < 1e-2, "{tag}: embedding sum {sum}");
        assert!(
            (sum_sq - want_sum_sq).abs() < 1e-4 * want_sum_sq,
            "{tag}: embedding sum of squares {sum_sq}"
        );

        // Landmarks: the reference arg-max cell, where it is not a float-level tie.
        let cells = img["heatmap_argmax_row_col"].as_array().unwrap();
        let gaps = f64s(&img["heatmap_top2_gap"]);
        let mut checked = 0;
        for (k, (cell, gap)) in cells.iter().zip(&gaps).enumerate() {
            if *gap < 1e-4 {
                continue;
            }
            let (row, col) = (cell[0].as_f64().unwrap(), cell[1].as_f64().unwrap());
            let want = [(col + 0.5) * 4.0 - 0.5, (row + 0.5) * 4.0 - 0.5];
            let got = &landmarks[n][k];
            assert_eq!(
                [f64::from(got[0]), f64::from(got[1])],
                want,
                "{tag} landmark {k}: cell (row {row}, col {col})"
            );
            checked += 1;
        }
        assert!(checked >= 60, "{tag}: only {checked} landmarks were unambiguous");
    }
}

#[test]
fn emonet8_matches_pytorch_reference() {
    check_variant(EmoNetVariant::Eight);
}

#[test]
fn emonet5_matches_pytorch_reference() {
    check_variant(EmoNetVariant::Five);
}

#[test]
fn emonet_parameters_and_keys_match_reference() {
    let fx = fixture();
    let model = build(&fx, EmoNetVariant::Eight);
    assert_eq!(model.parameter_count(), 13_963_410);
    let reference = &fx["variants"]["emonet-8"];
    assert_eq!(model.parameter_count() as u64, reference["parameters"].as_u64().unwrap());
    // The model uses exactly the reference state dict's keys (minus num_batches_tracked).
    let want: Vec<(String, Vec<usize>)> = reference["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let shape = e[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (e[0].as_str().unwrap().to_owned(), shape)
        })
        .collect();
    assert_eq!(model.weight_shapes(), want.as_slice());
    let five = build(&fx, EmoNetVariant::Five);
    assert_eq!(five.parameter_count() as u64, fx["variants"]["emonet-5"]["parameters"].as_u64().unwrap());
}

#[test]
fn teacher_info_and_fingerprint() {
    let fx = fixture();
    let a = build(&fx, EmoNetVariant::Eight);
    let b = build(&fx, EmoNetVariant::Eight);
    let info = a.info();
    assert_eq!(info.name, "emonet-8");
    assert_eq!(info.classes.names()[7], "contempt");
    assert_eq!(info.embedding_dim, Some(256));
    assert!(info.has_valence_arousal && info.has_landmarks);
    assert_eq!(info.preprocess, distillery_core::Preprocess::emonet());
    assert_eq!(info.fingerprint, b.info().fingerprint, "fingerprint is deterministic");

    // One weight changed by one value changes the fingerprint.
    let mut sd = formula_state_dict(&fx, "emonet-8");
    let key = "emo_fc_2.3.bias";
    let bumped = (sd[key].clone() + 1e-3).unwrap();
    sd.insert(key.to_owned(), bumped);
    let c =
        EmoNet::new(EmoNetVariant::Eight, VarBuilder::from_tensors(sd, DType::F32, &Device::Cpu)).unwrap();
    assert_ne!(info.fingerprint, c.info().fingerprint);

    let five = build(&fx, EmoNetVariant::Five);
    assert_eq!(five.info().classes.len(), 5);
    assert_ne!(info.fingerprint, five.info().fingerprint);
}

#[test]
fn wrong_input_shape_is_an_error() {
    let fx = fixture();
    let model = build(&fx, EmoNetVariant::Five);
    let x = Tensor::zeros((1, 3, 128, 128), DType::F32, &Device::Cpu).unwrap();
    let e = model.forward_all(&x).unwrap_err().to_string();
    assert!(e.contains("[1, 3, 128, 128]"), "{e}");
}
