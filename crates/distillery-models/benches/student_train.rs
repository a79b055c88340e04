//! CPU training throughput of MobileNetV2 1.0×: forward, backward and an AdamW step per batch.
//!
//! `./dev bench --bench student_train` prints images/s at 112² (batch 32)
//! and 224² (batch 16) after warm-up steps. `STUDENT_BENCH_STEPS` sets the timed steps (default 5).
#![allow(clippy::print_stdout)] // a bench binary reports on stdout

/// The allocator the `distillery` binary uses, so the numbers match what users run.
#[global_allocator]
static GLOBAL: distillery_models::alloc::Allocator = distillery_models::alloc::Allocator;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use distillery_models::losses::kd_loss;
use distillery_models::student::{StudentArch, StudentSpec, build_student, trainable_vars};

fn bench(side: usize, batch: usize, steps: usize) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let spec = StudentSpec {
        arch: StudentArch::MobileNetV2 { width: 1.0 },
        num_classes: 8,
        input_size: side,
        embed_proj: None,
    };
    let varmap = VarMap::new();
    let model = build_student(&spec, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut opt = AdamW::new(trainable_vars(&varmap), ParamsAdamW { lr: 1e-3, ..Default::default() })?;
    let x = Tensor::rand(0f32, 1., (batch, 3, side, side), &dev)?;
    let labels = Tensor::from_vec((0..batch as u32).map(|i| i % 8).collect::<Vec<_>>(), batch, &dev)?;
    let mask = Tensor::ones(batch, DType::F32, &dev)?;
    let teacher = Tensor::randn(0f32, 1., (batch, 8), &dev)?;
    let mut step = || -> candle_core::Result<f32> {
        let out = model.forward_t(&x, true)?;
        let loss = kd_loss(&out.logits, Some(&teacher), &labels, &mask, 0.5, 4.0)?.total;
        opt.backward_step(&loss)?;
        loss.to_scalar::<f32>()
    };
    for _ in 0..2 {
        step()?;
    }
    let t0 = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "mobilenetv2 1.0x {side}x{side} batch {batch}: {:.1} images/s ({:.3} s/step over {steps} steps, {} threads)",
        (steps * batch) as f64 / secs,
        secs / steps as f64,
        rayon::current_num_threads()
    );
    Ok(())
}

fn main() -> candle_core::Result<()> {
    distillery_models::alloc::keep_freed_pages();
    let steps = std::env::var("STUDENT_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    bench(112, 32, steps)?;
    bench(224, 16, steps)?;
    Ok(())
}
