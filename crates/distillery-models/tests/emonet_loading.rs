//! Loading EmoNet weights: the `.pth` reader (on a tiny checkpoint saved the way the official ones
//! are), the `.safetensors` path, and the errors for missing, misshaped and unreadable weights.

mod emonet_fixture;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use distillery_models::Teacher;
use distillery_models::emonet::{EmoNet, EmoNetError, EmoNetVariant, read_state_dict};
use emonet_fixture::{fixture, fixture_dir, formula_state_dict, formula_values};

/// A scratch file path unique to this process and test.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("distillery-emonet-{}-{name}", std::process::id()))
}

#[test]
fn pth_reader_strips_module_prefix_and_counters() {
    let sd = read_state_dict(&fixture_dir().join("emonet_small.pth"), &Device::Cpu).unwrap();
    let mut keys: Vec<&str> = sd.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.weight", "conv1.bias", "conv1.weight"]
    );
    for (key, t) in &sd {
        assert_eq!(t.dtype(), DType::F32, "{key}");
        let want = formula_values(key, t.dims());
        let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want, "{key} values");
    }
    assert_eq!(sd["conv1.weight"].dims(), &[4, 3, 3, 3]);
}

#[test]
fn misshaped_weight_names_key_and_shapes() {
    // The small checkpoint has a 3→4 3×3 `conv1`, not EmoNet's 3→64 7×7 one.
    let path = fixture_dir().join("emonet_small.pth");
    let e = EmoNet::load(EmoNetVariant::Eight, &path, &Device::Cpu).unwrap_err();
    assert!(matches!(e, EmoNetError::Weights { .. }), "{e:?}");
    let msg = e.to_string();
    for part in ["emonet_small.pth", "emonet-8", "`conv1.weight`", "[4, 3, 3, 3]", "[64, 3, 7, 7]"] {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }
}

#[test]
fn missing_weight_names_key() {
    let fx = fixture();
    let mut sd = formula_state_dict(&fx, "emonet-5");
    sd.remove("m1.b2_plus_1.bn2.running_var").unwrap();
    let e = EmoNet::new(EmoNetVariant::Five, VarBuilder::from_tensors(sd, DType::F32, &Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`m1.b2_plus_1.bn2.running_var` is missing"), "{e}");

    // Five-class weights are not eight-class weights: the last layer's shape says so.
    let sd = formula_state_dict(&fx, "emonet-5");
    let e = EmoNet::new(EmoNetVariant::Eight, VarBuilder::from_tensors(sd, DType::F32, &Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`emo_fc_2.3.weight` has shape [7, 128], expected [10, 128]"), "{e}");
}

#[test]
fn safetensors_round_trip_with_module_prefix() {
    let fx = fixture();
    let sd = formula_state_dict(&fx, "emonet-5");
    let direct =
        EmoNet::new(EmoNetVariant::Five, VarBuilder::from_tensors(sd.clone(), DType::F32, &Device::Cpu))
            .unwrap();
    let mut prefixed: HashMap<String, Tensor> =
        sd.into_iter().map(|(k, v)| (format!("module.{k}"), v)).collect();
    prefixed.insert("module.bn1.num_batches_tracked".into(), Tensor::new(&[3i64], &Device::Cpu).unwrap());
    let path = scratch("weights.safetensors");
    candle_core::safetensors::save(&prefixed, &path).unwrap();
    let loaded = EmoNet::load(EmoNetVariant::Five, &path, &Device::Cpu);
    std::fs::remove_file(&path).ok();
    let loaded = loaded.unwrap();
    assert_eq!(loaded.info().fingerprint, direct.info().fingerprint);
    assert_eq!(loaded.parameter_count(), direct.parameter_count());
}

#[test]
fn unreadable_files_are_clear_errors() {
    let missing = scratch("absent.pth");
    let e = EmoNet::load(EmoNetVariant::Eight, &missing, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("absent.pth") && e.contains("no such file"), "{e}");

    let legacy = scratch("legacy.pth");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0alegacy pickle").unwrap();
    let e = EmoNet::load(EmoNetVariant::Eight, &legacy, &Device::Cpu).unwrap_err().to_string();
    std::fs::remove_file(&legacy).ok();
    assert!(e.contains("not a zip-format PyTorch file"), "{e}");

    let odd = scratch("weights.bin");
    std::fs::write(&odd, b"x").unwrap();
    let e = EmoNet::load(EmoNetVariant::Eight, &odd, &Device::Cpu).unwrap_err().to_string();
    std::fs::remove_file(&odd).ok();
    assert!(e.contains("unknown extension"), "{e}");
}

#[test]
fn variant_names_parse() {
    assert_eq!("emonet-8".parse::<EmoNetVariant>().unwrap(), EmoNetVariant::Eight);
    assert_eq!("EmoNet-5".parse::<EmoNetVariant>().unwrap(), EmoNetVariant::Five);
    assert_eq!(EmoNetVariant::Five.to_string(), "emonet-5");
    let e = "emonet-7".parse::<EmoNetVariant>().unwrap_err().to_string();
    assert!(e.contains("emonet-7"), "{e}");
}
