//! The deterministic weight and input formulas of `fixtures/emonet_parity.py`, rebuilt in Rust,
//! and access to the fixture it wrote.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::Value;

/// This crate's folder: `$DISTILLERY_SOURCE/crates/distillery-models` when that is set (a bench
/// binary carried to another machine, as `benches/gpu.sh` does), else where it was built.
pub fn crate_dir() -> PathBuf {
    match std::env::var_os("DISTILLERY_SOURCE") {
        Some(root) => PathBuf::from(root).join("crates").join("distillery-models"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

pub fn fixture_dir() -> PathBuf {
    crate_dir().join("tests").join("fixtures")
}

pub fn fixture() -> Value {
    let path = fixture_dir().join("emonet_parity.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Conv/linear weight gain; must equal `weight_formula.gain` in the fixture.
pub const GAIN: f64 = 0.65;

fn fnv1a64(text: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// `u ∈ [0, 1)` for element `i` of the tensor named `name` (splitmix64 of a per-key seed).
fn uniform(seed: u64, i: u64) -> f64 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The formula value of every element of `name` with `shape`, as f32.
pub fn formula_values(name: &str, shape: &[usize]) -> Vec<f32> {
    let count: usize = shape.iter().product();
    let seed = fnv1a64(name);
    (0..count as u64)
        .map(|i| {
            let u = uniform(seed, i);
            let v = 2.0 * u - 1.0;
            let x = if name.ends_with("running_var") {
                0.8 + 0.4 * u
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                0.05 * v
            } else if name.ends_with(".weight") && shape.len() >= 2 {
                let fan_in = count / shape[0];
                v * GAIN * (3.0 / fan_in as f64).sqrt()
            } else if name.ends_with(".weight") {
                1.0 + 0.1 * v
            } else {
                panic!("no formula for {name}")
            };
            x as f32
        })
        .collect()
}

/// The state dict of `variant` ("emonet-8"/"emonet-5") as listed in the fixture, filled by the formula.
pub fn formula_state_dict(fixture: &Value, variant: &str) -> HashMap<String, Tensor> {
    let keys = fixture["variants"][variant]["keys"].as_array().expect("keys");
    keys.iter()
        .map(|entry| {
            let name = entry[0].as_str().unwrap().to_owned();
            let shape: Vec<usize> =
                entry[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let t = Tensor::from_vec(formula_values(&name, &shape), shape.as_slice(), &Device::Cpu).unwrap();
            (name, t)
        })
        .collect()
}

/// `[n, 3, size, size]` images: `0.5 + 0.5 sin(0.045 (h + 1)(c + 1) + 0.061 w (n + 1) + 0.7 n)`.
pub fn formula_images(n: usize, size: usize) -> Tensor {
    let mut v = Vec::with_capacity(n * 3 * size * size);
    for b in 0..n {
        for c in 0..3 {
            for h in 0..size {
                for w in 0..size {
                    // Same evaluation order as numpy: left to right.
                    let a = 0.045 * (h + 1) as f64 * (c + 1) as f64
                        + 0.061 * w as f64 * (b + 1) as f64
                        + 0.7 * b as f64;
                    v.push((0.5 + 0.5 * a.sin()) as f32);
                }
            }
        }
    }
    Tensor::from_vec(v, (n, 3, size, size), &Device::Cpu).unwrap()
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().unwrap()).collect()
}
