//! Training throughput of MobileNetV2 1.0×: forward, backward and an AdamW step per batch.
//!
//! `./dev bench --bench student_train` prints images/s at 112² (batch 32)
//! and 224² (batch 16) after warm-up steps. `STUDENT_BENCH_STEPS` sets the timed steps (default 5),
//! `STUDENT_BENCH_SHAPES` other sizes (`side×batch,…`, e.g. `112x32,224x16,224x128`) and
//! `DISTILLERY_DEVICE=cuda` a GPU (a `cuda` build; see `benches/gpu.sh`).
#![allow(clippy::print_stdout)] // a bench binary reports on stdout

/// The allocator the `distillery` binary uses, so the numbers match what users run.
#[global_allocator]
static GLOBAL: distillery_models::alloc::Allocator = distillery_models::alloc::Allocator;

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use distillery_models::losses::kd_loss;
use distillery_models::nn::adamw::{AdamWStep, adamw_moments, adamw_update};
use distillery_models::nn::on_pool;
use distillery_models::student::{StudentArch, StudentSpec, build_student, trainable_vars};

/// Adds the time since `start` to `total` and returns now.
fn lap(total: &mut Duration, start: Instant) -> Instant {
    let now = Instant::now();
    *total += now - start;
    now
}

fn bench(dev: &Device, side: usize, batch: usize, steps: usize) -> candle_core::Result<()> {
    let dev = dev.clone();
    let spec = StudentSpec {
        arch: StudentArch::MobileNetV2 { width: 1.0 },
        num_classes: 8,
        input_size: side,
        embed_proj: None,
    };
    let varmap = VarMap::new();
    let model = build_student(&spec, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    // AdamW as the trainer runs it (`nn::adamw`: two in-place ops per parameter), with PyTorch's
    // defaults (lr 1e-3, weight decay 0.01 on every parameter) like the reference script.
    let params: Vec<(candle_core::Var, Tensor)> = trainable_vars(&varmap)
        .into_iter()
        .map(|v| adamw_moments(&v).map(|mv| (v, mv)))
        .collect::<candle_core::Result<_>>()?;
    let mut updates = 0u64;
    let mut adamw = |grads: &candle_core::backprop::GradStore| -> candle_core::Result<()> {
        updates += 1;
        let step =
            AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, decay: 1.0 - 1e-3 * 0.01, t: updates };
        for (var, mv) in &params {
            if let Some(g) = grads.get(var.as_tensor()) {
                adamw_update(var.as_tensor(), mv, g, &step)?;
            }
        }
        Ok(())
    };
    let x = Tensor::rand(0f32, 1., (batch, 3, side, side), &dev)?;
    let labels = Tensor::from_vec((0..batch as u32).map(|i| i % 8).collect::<Vec<_>>(), batch, &dev)?;
    let mask = Tensor::ones(batch, DType::F32, &dev)?;
    let teacher = Tensor::randn(0f32, 1., (batch, 8), &dev)?;
    // Forward (with the loss), backward and optimiser step, timed apart: the device is synchronised
    // after each, so the phases add up to the step.
    let mut phases = [Duration::ZERO; 3];
    let mut step = |phases: &mut [Duration; 3]| -> candle_core::Result<f32> {
        let t = Instant::now();
        // As the trainer does: on a rayon worker (`on_pool`).
        let out = on_pool(|| model.forward_t(&x, true))?;
        let loss = kd_loss(&out.logits, Some(&teacher), &labels, &mask, 0.5, 4.0)?.total;
        dev.synchronize()?;
        let t = lap(&mut phases[0], t);
        let grads = on_pool(|| loss.backward())?;
        dev.synchronize()?;
        let t = lap(&mut phases[1], t);
        adamw(&grads)?;
        let value = loss.to_scalar::<f32>()?;
        lap(&mut phases[2], t);
        Ok(value)
    };
    for _ in 0..2 {
        step(&mut [Duration::ZERO; 3])?;
    }
    let t0 = Instant::now();
    for _ in 0..steps {
        step(&mut phases)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / steps as f64;
    println!(
        "mobilenetv2 1.0x {side}x{side} batch {batch}: {:.1} images/s ({:.3} s/step over {steps} steps, {}; forward {:.1} ms, backward {:.1} ms, AdamW {:.1} ms)",
        (steps * batch) as f64 / secs,
        secs / steps as f64,
        if dev.is_cpu() {
            format!("{} threads", rayon::current_num_threads())
        } else {
            format!("{:?}", dev.location())
        },
        ms(phases[0]),
        ms(phases[1]),
        ms(phases[2]),
    );
    Ok(())
}

/// One layer on the device against the CPU: values of `f(inputs)` and the gradients of
/// `sum(f(inputs) · r)` (random `r`) for every input. Returns the largest relative difference.
fn layer_parity(
    dev: &Device,
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<f32> {
    let run = |device: &Device, r: Option<&Tensor>| -> candle_core::Result<(Tensor, Vec<Tensor>, Tensor)> {
        let vars = inputs
            .iter()
            .map(|t| candle_core::Var::from_tensor(&t.to_device(device)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let r = match r {
            Some(r) => r.to_device(device)?,
            None => Tensor::randn(0f32, 1., y.shape(), &Device::Cpu)?.to_device(device)?,
        };
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let g = vars
            .iter()
            .map(|v| grads.get(v).cloned().unwrap_or(v.as_tensor().zeros_like()?).to_device(&Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((y.to_device(&Device::Cpu)?, g, r.to_device(&Device::Cpu)?))
    };
    let (y_cpu, g_cpu, r) = run(&Device::Cpu, None)?;
    let (y_dev, g_dev, _) = run(dev, Some(&r))?;
    let rel = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
        let scale = a.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12);
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    };
    let mut line = format!("    {name:<34} value {:.1e}", rel(&y_cpu, &y_dev)?);
    let mut worst = rel(&y_cpu, &y_dev)?;
    for (i, (a, b)) in g_cpu.iter().zip(&g_dev).enumerate() {
        let d = rel(a, b)?;
        worst = worst.max(d);
        line.push_str(&format!(", grad {i} {d:.1e}"));
    }
    println!("{line}");
    Ok(worst)
}

/// The layers MobileNetV2 trains with, one at a time at its last stages' sizes.
fn layers_against_cpu(dev: &Device) -> candle_core::Result<f32> {
    use distillery_models::nn::{
        BatchNorm2d, depthwise::depthwise_conv3x3, global_avg_pool, pointwise_conv, relu6,
    };
    let cpu = Device::Cpu;
    let randn = |shape: &[usize], scale: f64| Tensor::randn(0f32, 1., shape, &cpu)? * scale;
    let mut worst = 0f32;
    for (c, side, stride) in [(960, 2, 1), (192, 8, 2), (32, 16, 1)] {
        let (x, w) = (randn(&[4, c, side, side], 1.0)?, randn(&[c, 1, 3, 3], 0.3)?);
        let name = format!("depthwise {c}x{side}x{side} stride {stride}");
        worst = worst.max(layer_parity(dev, &name, &[x, w], |v| depthwise_conv3x3(&v[0], &v[1], stride))?);
    }
    // The stem: a dense 3×3 stride-2 convolution, here on sides of mixed parity.
    let (x, w) = (randn(&[4, 3, 18, 17], 1.0)?, randn(&[32, 3, 3, 3], 0.3)?);
    worst = worst.max(layer_parity(dev, "conv 3x3 stride 2, 3→32 at 18x17", &[x, w], |v| {
        distillery_models::nn::im2col::conv2d_unfolded(&v[0], &v[1], 2, 1)
    })?);
    let (x, w) = (randn(&[4, 320, 2, 2], 1.0)?, randn(&[1280, 320, 1, 1], 0.05)?);
    worst = worst
        .max(layer_parity(dev, "pointwise 320→1280 at 2x2", &[x, w], |v| pointwise_conv(&v[0], &v[1]))?);
    let x = randn(&[4, 1280, 2, 2], 4.0)?;
    worst = worst.max(layer_parity(dev, "relu6", std::slice::from_ref(&x), |v| relu6(&v[0]))?);
    worst = worst
        .max(layer_parity(dev, "global average pool", std::slice::from_ref(&x), |v| global_avg_pool(&v[0]))?);
    let (gamma, beta) = ((randn(&[1280], 0.2)? + 1.0)?, randn(&[1280], 0.2)?);
    let layer = |v: &[Tensor]| -> candle_core::Result<BatchNorm2d> {
        let dev = v[0].device();
        let stats = [
            ("running_mean", Tensor::zeros(1280, DType::F32, dev)?),
            ("running_var", Tensor::ones(1280, DType::F32, dev)?),
        ];
        let mut map: std::collections::HashMap<String, Tensor> =
            stats.into_iter().map(|(k, t)| (k.to_owned(), t)).collect();
        map.insert("weight".into(), v[1].clone());
        map.insert("bias".into(), v[2].clone());
        BatchNorm2d::new(1280, VarBuilder::from_tensors(map, DType::F32, dev))
    };
    let bn = |v: &[Tensor]| layer(v)?.forward_t(&v[0], true);
    worst = worst.max(layer_parity(
        dev,
        "batch norm (training) 1280 at 2x2",
        &[x.clone(), gamma.clone(), beta.clone()],
        bn,
    )?);
    let head = |v: &[Tensor]| global_avg_pool(&relu6(&bn(v)?)?);
    worst = worst.max(layer_parity(
        dev,
        "batch norm → relu6 → pool",
        &[x.clone(), gamma.clone(), beta.clone()],
        head,
    )?);
    // The fused form MobileNetV2 trains with; the pool keeps the loss from depending on the
    // clamped values only.
    let fused = |v: &[Tensor]| global_avg_pool(&layer(v)?.forward_relu6_t(&v[0], true)?);
    worst = worst.max(layer_parity(dev, "batch norm + relu6 (fused) → pool", &[x, gamma, beta], fused)?);
    Ok(worst)
}

/// Features and all gradients of MobileNetV2 in training mode on `device` in `dtype`, as f64 on
/// the host: the gradient of `sum(features²)` (features come before the heads' dropout, which
/// draws its own masks per device). Weights are `weights`' values.
fn features_and_grads(
    weights: &VarMap,
    device: &Device,
    dtype: DType,
    x: &Tensor,
) -> candle_core::Result<(Tensor, Vec<(String, Tensor)>)> {
    let spec = StudentSpec {
        arch: StudentArch::MobileNetV2 { width: 1.0 },
        num_classes: 8,
        input_size: 64,
        embed_proj: None,
    };
    let vars = VarMap::new();
    for (name, var) in weights.data().lock().expect("varmap lock").iter() {
        let copy = candle_core::Var::from_tensor(&var.as_tensor().to_dtype(dtype)?.to_device(device)?)?;
        vars.data().lock().expect("varmap lock").insert(name.clone(), copy);
    }
    let model = build_student(&spec, VarBuilder::from_varmap(&vars, dtype, device))?;
    let features = model.forward_t(&x.to_dtype(dtype)?.to_device(device)?, true)?.embedding;
    let grads = features.sqr()?.sum_all()?.backward()?;
    let host = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    let mut named = Vec::new();
    for (k, v) in vars.data().lock().expect("varmap lock").iter() {
        if let Some(g) = grads.get(v) {
            named.push((k.clone(), host(g)?));
        }
    }
    named.sort_by(|a: &(String, Tensor), b| a.0.cmp(&b.0));
    Ok((host(&features)?, named))
}

/// On a device other than the CPU, first checks it against the CPU with the same MobileNetV2
/// weights and batch (64², batch 4) in training mode: in f64, features and every gradient must
/// match the CPU kernels' (the same function); in f32, the features. (f32 gradients are not
/// compared one by one: a few nearly cancel, and two f32 summation orders can differ there by
/// percents; the CPU test `portable_layers_train_like_the_cpu_kernels` explains.)
fn check_against_cpu(dev: &Device) -> candle_core::Result<()> {
    let cpu = Device::Cpu;
    let weights = VarMap::new();
    let spec = StudentSpec {
        arch: StudentArch::MobileNetV2 { width: 1.0 },
        num_classes: 8,
        input_size: 64,
        embed_proj: None,
    };
    build_student(&spec, VarBuilder::from_varmap(&weights, DType::F32, &cpu))?;
    let x = Tensor::rand(0f32, 1., (4, 3, 64, 64), &cpu)?;
    let (cpu64, dev64) = (
        features_and_grads(&weights, &cpu, DType::F64, &x)?,
        features_and_grads(&weights, dev, DType::F64, &x)?,
    );
    let (cpu32, dev32) = (
        features_and_grads(&weights, &cpu, DType::F32, &x)?,
        features_and_grads(&weights, dev, DType::F32, &x)?,
    );
    // Relative L2 error, against at least a millionth of the largest gradient's norm: some
    // gradients are zero up to rounding (every `project_bn.bias`).
    let norm = |t: &Tensor| -> candle_core::Result<f64> { t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>() };
    let mut floor = 0f64;
    for (_, g) in &cpu64.1 {
        floor = floor.max(norm(g)? * 1e-6);
    }
    let err =
        |a: &Tensor, r: &Tensor| -> candle_core::Result<f64> { Ok(norm(&(a - r)?)? / norm(r)?.max(floor)) };
    if cpu64.1.is_empty() || cpu64.1.len() != dev64.1.len() {
        candle_core::bail!(
            "gradients: {} tensors on the CPU, {} on {:?}",
            cpu64.1.len(),
            dev64.1.len(),
            dev.location()
        );
    }
    let mut worst = (0f64, "");
    for ((name, c), (_, d)) in cpu64.1.iter().zip(&dev64.1) {
        let e = err(d, c)?;
        if e > worst.0 {
            worst = (e, name.as_str());
        }
    }
    let (f64_features, f32_features) = (err(&dev64.0, &cpu64.0)?, err(&dev32.0, &cpu32.0)?);
    println!(
        "parity with the CPU (64x64, batch 4, relative L2): f64 features {f64_features:.1e}, worst f64 gradient {:.1e} ({}) over {} tensors; f32 features {f32_features:.1e}",
        worst.0,
        worst.1,
        cpu64.1.len()
    );
    // TF32 (on request, and cuDNN's default for convolutions) keeps 10 bits of mantissa.
    let tf32 = candle_core::cuda::gemm_reduced_precision_f32() || cfg!(feature = "cudnn");
    if f64_features > 1e-10 || worst.0 > 1e-8 || f32_features > if tf32 { 5e-2 } else { 1e-4 } {
        candle_core::bail!("{:?} disagrees with the CPU", dev.location());
    }
    Ok(())
}

fn main() -> candle_core::Result<()> {
    // SAFETY: first thing in `main`, before any other thread starts.
    unsafe { distillery_models::process::prepare() };
    let steps = std::env::var("STUDENT_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let (_, dev) = distillery_models::device::from_env()?;
    if !dev.is_cpu() {
        println!("layers against the CPU (max relative difference):");
        let worst = layers_against_cpu(&dev)?;
        // No convolution here: only a TF32 request changes the precision.
        if worst > if candle_core::cuda::gemm_reduced_precision_f32() { 1e-2 } else { 1e-4 } {
            candle_core::bail!("{:?}: a layer disagrees with the CPU ({worst:.1e})", dev.location());
        }
        check_against_cpu(&dev)?;
    }
    let shapes = std::env::var("STUDENT_BENCH_SHAPES").unwrap_or_else(|_| "112x32,224x16".into());
    for shape in shapes.split(',') {
        let parsed = shape.trim().split_once('x').and_then(|(s, b)| Some((s.parse().ok()?, b.parse().ok()?)));
        let Some((side, batch)) = parsed else {
            candle_core::bail!("STUDENT_BENCH_SHAPES: `{shape}` is not SIDExBATCH");
        };
        bench(&dev, side, batch, steps)?;
    }
    Ok(())
}
