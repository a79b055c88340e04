//! EmoNet forward throughput on CPU (images/s at batch 1 and 8), with formula weights; the values
//! do not affect the speed of dense convolutions. Set `EMONET_WEIGHTS` to a `.pth`/`.safetensors`
//! file to time real weights instead, and `EMONET_BENCH_ITERS` to change the repetitions.
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

fn main() {
    distillery_models::alloc::keep_freed_pages();
    let device = Device::Cpu;
    let variant = EmoNetVariant::Eight;
    let model = match std::env::var_os("EMONET_WEIGHTS") {
        Some(path) => EmoNet::load(variant, std::path::Path::new(&path), &device).expect("load weights"),
        None => {
            let fx = emonet_fixture::fixture();
            let sd = emonet_fixture::formula_state_dict(&fx, variant.name());
            EmoNet::new(variant, VarBuilder::from_tensors(sd, DType::F32, &device)).expect("build EmoNet")
        }
    };
    let iters: usize = std::env::var("EMONET_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    println!(
        "EmoNet-8, {} parameters, CPU, {iters} timed iterations after 1 warm-up",
        model.parameter_count()
    );
    for batch in [1usize, 8] {
        let x = emonet_fixture::formula_images(batch, 256);
        model.forward_all(&x).expect("warm-up forward");
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
