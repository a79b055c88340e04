//! Throughput of the face-api ONNX teacher at batch 1 and 32 (images/s), and the time per op type
//! of the raw graph (where an optimisation would pay). `DISTILLERY_DEVICE=cuda` runs it on a GPU
//! (a `cuda` build; see `benches/gpu.sh`).
//!
//! `./dev bench --bench onnx_faceapi` (needs `../shared/reference`); `FACEAPI_BENCH_NODES=30`
//! lists every node, `FACEAPI_BENCH_BATCHES=1,8` picks the batch sizes. The timed batches go
//! through the teacher (on the CPU in chunks of its `cpu_chunk` images); the per-node times are of
//! whole batches through the graph.

#![allow(clippy::print_stdout)]

/// The allocator the `distillery` binary uses, so the numbers match what users run.
#[global_allocator]
static GLOBAL: distillery_models::alloc::Allocator = distillery_models::alloc::Allocator;

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use distillery_models::Teacher;
use distillery_models::onnx::{OnnxTeacher, OnnxTeacherConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in `main`, before any other thread starts.
    unsafe { distillery_models::process::prepare() };
    let Some(reference) = distillery_core::reference::require("onnx_faceapi bench") else {
        return Ok(());
    };
    // `$DISTILLERY_SOURCE` (the checkout) when the binary runs away from where it was built.
    let root = std::env::var_os("DISTILLERY_SOURCE")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."), std::path::PathBuf::from);
    let cfg_path = root.join("configs/teachers/faceapi.toml");
    let mut cfg = OnnxTeacherConfig::from_file(&cfg_path)?;
    cfg.model = reference.join("teachers/faceapi_expression.onnx");
    let (device_name, device) = distillery_models::device::from_env()?;
    let t = OnnxTeacher::from_config(cfg.clone(), cfg_path.parent().unwrap(), &device)?;
    if !device.is_cpu() {
        // The device's probabilities for two random images against the CPU's.
        let cpu = OnnxTeacher::from_config(cfg, cfg_path.parent().unwrap(), &Device::Cpu)?;
        let x = Tensor::rand(0f32, 255.0, (2, 3, 112, 112), &Device::Cpu)?;
        let want = cpu.forward(&x)?.logits;
        let got = t.forward(&x.to_device(&device)?)?.logits.to_device(&Device::Cpu)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        println!("parity with the CPU (batch 2): logits max rel diff {diff:.2e}");
        // TF32 (on request, and cuDNN's default for convolutions) keeps 10 bits of mantissa.
        let tf32 = candle_core::cuda::gemm_reduced_precision_f32() || cfg!(feature = "cudnn");
        if diff > if tf32 { 1e-2 } else { 1e-3 } {
            return Err(format!("{device_name} disagrees with the CPU: {diff:.2e}").into());
        }
    }
    println!("faceapi teacher on {device_name}: {} nodes per batch after folding", t.graph().num_steps());
    // The slowest nodes listed per batch size: `$FACEAPI_BENCH_NODES`, 8 unless set.
    let shown = std::env::var("FACEAPI_BENCH_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    // Batch sizes: `$FACEAPI_BENCH_BATCHES` (e.g. `1` or `1,8,32`), 1 and 32 unless set.
    let batches: Vec<usize> = match std::env::var("FACEAPI_BENCH_BATCHES") {
        Ok(v) => v.split(',').map(|b| b.trim().parse()).collect::<Result<_, _>>()?,
        Err(_) => vec![1, 32],
    };
    for batch in batches {
        let x = (Tensor::rand(0f32, 255.0, (batch, 3, 112, 112), &device)?).to_dtype(DType::F32)?;
        t.forward(&x)?; // warm-up
        device.synchronize()?;
        let iters = (640 / batch).clamp(20, 300);
        let start = Instant::now();
        for _ in 0..iters {
            t.forward(&x)?;
        }
        device.synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "batch {batch:>2}: {:>8.1} images/s ({:.2} ms/batch)",
            (batch * iters) as f64 / secs,
            secs * 1e3 / iters as f64
        );
        // Where the time goes: the raw graph, node by node, summed per op type.
        let g = t.graph();
        let (input, output) = (g.input_names()[0].to_owned(), g.output_names()[0].clone());
        let mut totals = Vec::new();
        for _ in 0..iters {
            let (_, times) = g.run_profiled(&[(&input, &x)], &[&output])?;
            totals.extend(times);
        }
        // Per node over the iterations (every run lists the nodes in the same order).
        let per_run = totals.len() / iters;
        let mut slowest = totals[..per_run].to_vec();
        for (i, t) in totals.iter().enumerate().skip(per_run) {
            slowest[i % per_run].elapsed += t.elapsed;
        }
        slowest.sort_by_key(|t| std::cmp::Reverse(t.elapsed));
        for t in slowest.iter().take(shown) {
            println!(
                "    {:>7.3} ms/batch  {:<22} {:<12} → {:?}",
                t.elapsed.as_secs_f64() * 1e3 / iters as f64,
                t.op_type,
                t.node,
                t.output_shape
            );
        }
        for (op, d, count) in distillery_models::onnx::by_op_type(&totals) {
            println!(
                "    {op:<14} {:>7.3} ms/batch over {:>3} nodes",
                d.as_secs_f64() * 1e3 / iters as f64,
                count / iters
            );
        }
    }
    Ok(())
}
