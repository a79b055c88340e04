//! EmoNet forward throughput (images/s at batch 1 and 8), with formula weights; the values do not
//! affect the speed of dense convolutions. Set `EMONET_WEIGHTS` to a `.pth`/`.safetensors` file to
//! time real weights instead, `EMONET_BENCH_ITERS` to change the repetitions,
//! `EMONET_BENCH_BATCHES` (e.g. `1,8,64`) for other batch sizes and `DISTILLERY_DEVICE=cuda` for a
//! GPU (a `cuda` build; see `benches/gpu.sh`), where the outputs are first checked against the CPU.
//!
//! Run: `./dev bench --bench emonet`.

#![allow(clippy::print_stdout)]

/// The allocator the `distillery` binary uses, so the numbers match what users run.
#[global_allocator]
static GLOBAL: distillery_models::alloc::Allocator = distillery_models::alloc::Allocator;

#[path = "../tests/emonet_fixture/mod.rs"]
mod emonet_fixture;

use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use distillery_models::emonet::{EmoNet, EmoNetVariant};

fn model(variant: EmoNetVariant, device: &Device) -> EmoNet {
    match std::env::var_os("EMONET_WEIGHTS") {
        Some(path) => EmoNet::load(variant, std::path::Path::new(&path), device).expect("load weights"),
        None => {
            let fx = emonet_fixture::fixture();
            let sd = emonet_fixture::formula_state_dict(&fx, variant.name());
            EmoNet::new(variant, VarBuilder::from_tensors(sd, DType::F32, device)).expect("build EmoNet")
        }
    }
}

/// The device's logits and valence/arousal for two formula images against the CPU's.
fn check_against_cpu(variant: EmoNetVariant, device: &Device, on_device: &EmoNet) {
    let x = emonet_fixture::formula_images(2, 256);
    let cpu = model(variant, &Device::Cpu).forward_all(&x).expect("CPU forward");
    let dev = on_device.forward_all(&x.to_device(device).expect("input to device")).expect("device forward");
    let rel = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        let b = b.to_device(&Device::Cpu).expect("to host");
        let scale = a.abs().and_then(|t| t.max_all()).and_then(|t| t.to_scalar::<f32>()).expect("max");
        let diff = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>());
        diff.expect("diff") / scale.max(1e-6)
    };
    let logits = rel(&cpu.logits, &dev.logits);
    let valence = rel(cpu.valence.as_ref().expect("valence"), dev.valence.as_ref().expect("valence"));
    println!("parity with the CPU (batch 2): logits max rel diff {logits:.2e}, valence {valence:.2e}");
    // TF32 (on request, and cuDNN's default for convolutions) keeps 10 bits of mantissa.
    let tf32 = candle_core::cuda::gemm_reduced_precision_f32() || cfg!(feature = "cudnn");
    let tol = if tf32 { 1e-1 } else { 1e-2 };
    assert!(logits < tol && valence < tol, "{device:?} disagrees with the CPU");
}

fn main() {
    // SAFETY: first thing in `main`, before any other thread starts.
    unsafe { distillery_models::process::prepare() };
    let (device_name, device) = distillery_models::device::from_env().expect("device");
    let variant = EmoNetVariant::Eight;
    let model = model(variant, &device);
    if !device.is_cpu() {
        check_against_cpu(variant, &device, &model);
    }
    let iters: usize = std::env::var("EMONET_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let batches: Vec<usize> = std::env::var("EMONET_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .map(|b| b.trim().parse().expect("EMONET_BENCH_BATCHES: comma-separated batch sizes"))
        .collect();
    println!(
        "EmoNet-8, {} parameters, {device_name}, {iters} timed iterations after 1 warm-up",
        model.parameter_count()
    );
    for batch in batches {
        let x = emonet_fixture::formula_images(batch, 256).to_device(&device).expect("input to device");
        model.forward_all(&x).expect("warm-up forward");
        device.synchronize().expect("synchronize");
        let start = Instant::now();
        for _ in 0..iters {
            let out = model.forward_all(&x).expect("forward");
            // Force the outputs to host memory so lazy devices finish their work.
            out.logits.to_vec2::<f32>().expect("logits");
        }
        let secs = start.elapsed().as_secs_f64();
        let images = (batch * iters) as f64;
        println!(
            "batch {batch:>2}: {:>7.3} images/s  ({:.3} s per batch)",
            images / secs,
            secs / iters as f64
        );
    }
}
