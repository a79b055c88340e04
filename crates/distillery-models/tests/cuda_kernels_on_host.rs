//! The CUDA kernels (`kernels/*.cu`) compiled for the host with `kernels/host.h` and run under
//! AddressSanitizer, against the CPU ops they mirror: depthwise convolution (forward and both
//! gradients), training batch norm with and without the fused ReLU6 (output, statistics, all
//! gradients), the AdamW update, and the one-pass epilogue (scale, shift, sums, ReLU). This checks
//! the kernels' indexing, reductions and launch shapes on machines without a GPU; a GPU run
//! (`benches/gpu.sh`) checks the device itself.
//!
//! Needs a C++20 compiler with AddressSanitizer (`$CXX`, else `c++`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use distillery_models::nn::BatchNorm2d;
use distillery_models::nn::adamw::{AdamWStep, adamw_update};
use distillery_models::nn::depthwise::{depthwise_conv3x3, out_side};

/// The driver program, built once per test run.
fn driver() -> &'static Path {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_host_driver");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args([
                "-std=c++20",
                "-O1",
                "-g",
                "-fsanitize=address",
                "-fno-omit-frame-pointer",
                "-pthread",
                "-I",
            ])
            .arg(&kernels)
            .arg(kernels.join("host_driver.cpp"))
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap_or_else(|e| panic!("running {cxx} (set CXX to a C++20 compiler): {e}"));
        assert!(status.success(), "{cxx} could not build kernels/host_driver.cpp ({status})");
        out
    })
}

fn write(dir: &Path, name: &str, t: &Tensor) -> Result<()> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(format!("{name}.bin")), bytes).map_err(candle_core::Error::wrap)
}

fn read_f32(dir: &Path, name: &str) -> Vec<f64> {
    let bytes = std::fs::read(dir.join(format!("{name}.bin"))).expect("driver output");
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
}

fn read_f64(dir: &Path, name: &str) -> Vec<f64> {
    let bytes = std::fs::read(dir.join(format!("{name}.bin"))).expect("driver output");
    bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
}

fn run(dir: &Path, args: &[String]) {
    let out = Command::new(driver()).arg(dir).args(args).output().expect("run the host driver");
    assert!(
        out.status.success(),
        "host driver {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Largest difference relative to the reference's largest magnitude.
fn assert_close(what: &str, got: &[f64], want: &Tensor, tol: f64) {
    let want = want.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale;
    assert!(worst < tol, "{what}: relative difference {worst:.2e}");
}

#[test]
fn depthwise_kernels_match_the_cpu_op() -> Result<()> {
    let dev = Device::Cpu;
    for (n, c, h, w, stride, parts) in
        [(2, 3, 9, 8, 1, 1), (2, 3, 9, 8, 2, 3), (1, 2, 5, 7, 2, 2), (3, 4, 6, 6, 1, 5)]
    {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, w), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1., (c, 1, 3, 3), &dev)?)?;
        let y = depthwise_conv3x3(&x, &k, stride)?;
        let gy = Tensor::randn(0f32, 1., y.shape(), &dev)?;
        let grads = (&y * &gy)?.sum_all()?.backward()?;
        for (name, t) in [("x", x.as_tensor()), ("k", k.as_tensor()), ("gy", &gy)] {
            write(dir.path(), name, t)?;
        }
        let (ho, wo) = (out_side(h, stride), out_side(w, stride));
        let args =
            ["dw", &n.to_string(), &c.to_string(), &h.to_string(), &w.to_string(), &stride.to_string(), "1"]
                .iter()
                .map(|s| s.to_string())
                .chain([ho, wo, parts].map(|v| v.to_string()))
                .collect::<Vec<_>>();
        run(dir.path(), &args);
        let what = format!("depthwise {n}x{c}x{h}x{w} stride {stride}, {parts} parts");
        assert_close(&format!("{what}: output"), &read_f32(dir.path(), "y"), &y, 1e-6);
        assert_close(
            &format!("{what}: input gradient"),
            &read_f32(dir.path(), "gx"),
            grads.get(&x).unwrap(),
            1e-6,
        );
        assert_close(
            &format!("{what}: kernel gradient"),
            &read_f32(dir.path(), "gk"),
            grads.get(&k).unwrap(),
            1e-6,
        );
    }
    Ok(())
}

#[test]
fn batch_norm_kernels_match_the_cpu_op() -> Result<()> {
    let dev = Device::Cpu;
    for (n, c, hw, relu6, parts) in
        [(3, 4, 50, false, 1), (3, 4, 50, true, 3), (2, 5, 7, true, 2), (4, 2, 9, false, 4)]
    {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        // Scaled and shifted so the ReLU6 clamps at both ends somewhere.
        let x = Var::from_tensor(&(Tensor::randn(0f32, 1., (n, c, hw, 1), &dev)? * 3.0)?)?;
        let gamma = Var::from_tensor(&(Tensor::randn(0f32, 0.3, c, &dev)? + 1.5)?)?;
        let beta = Var::from_tensor(&(Tensor::randn(0f32, 0.3, c, &dev)? + 1.0)?)?;
        let map = [
            ("weight", gamma.as_tensor().clone()),
            ("bias", beta.as_tensor().clone()),
            ("running_mean", Tensor::zeros(c, DType::F32, &dev)?),
            ("running_var", Tensor::ones(c, DType::F32, &dev)?),
        ]
        .into_iter()
        .map(|(k, t)| (k.to_owned(), t))
        .collect();
        let bn = BatchNorm2d::new(c, VarBuilder::from_tensors(map, DType::F32, &dev))?;
        let y = if relu6 { bn.forward_relu6_t(&x, true)? } else { bn.forward_t(&x, true)? };
        let g = Tensor::randn(0f32, 1., y.shape(), &dev)?;
        let grads = (&y * &g)?.sum_all()?.backward()?;
        for (name, t) in
            [("x", x.as_tensor()), ("gamma", gamma.as_tensor()), ("beta", beta.as_tensor()), ("g", &g)]
        {
            write(dir.path(), name, t)?;
        }
        let args =
            ["bn".to_string(), n.to_string(), c.to_string(), hw.to_string(), u8::from(relu6).to_string()]
                .into_iter()
                .chain([parts.to_string(), "1e-5".to_string()])
                .collect::<Vec<_>>();
        run(dir.path(), &args);
        let what = format!("batch norm {n}x{c}x{hw}, relu6 {relu6}, {parts} parts");
        assert_close(&format!("{what}: output"), &read_f32(dir.path(), "y"), &y, 1e-6);
        let stats = read_f64(dir.path(), "stats");
        let x3 = x.as_tensor().to_dtype(DType::F64)?.reshape((n, c, hw))?;
        let mean = (x3.sum_keepdim(2)?.sum_keepdim(0)? / (n * hw) as f64)?;
        let var = (x3.broadcast_sub(&mean)?.sqr()?.sum_keepdim(2)?.sum_keepdim(0)? / (n * hw) as f64)?;
        assert_close(&format!("{what}: mean"), &stats[..c], &mean, 1e-9);
        assert_close(&format!("{what}: variance"), &stats[c..2 * c], &var, 1e-9);
        let red = read_f64(dir.path(), "red");
        assert_close(&format!("{what}: weight gradient"), &red[..c], grads.get(&gamma).unwrap(), 1e-6);
        assert_close(&format!("{what}: bias gradient"), &red[c..], grads.get(&beta).unwrap(), 1e-6);
        assert_close(
            &format!("{what}: input gradient"),
            &read_f32(dir.path(), "dx"),
            grads.get(&x).unwrap(),
            1e-5,
        );
    }
    Ok(())
}

#[test]
fn adamw_kernels_match_the_cpu_op() -> Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
    let n = 1000;
    let p = Tensor::randn(0f32, 1., n, &dev)?;
    let g = Tensor::randn(0f32, 1., n, &dev)?;
    // Moments part-way through training: m of either sign, v positive.
    let mv =
        Tensor::cat(&[Tensor::randn(0f32, 0.1, (1, n), &dev)?, Tensor::rand(0f32, 0.01, (1, n), &dev)?], 0)?;
    for (name, t) in [("p", &p), ("g", &g), ("mv", &mv)] {
        write(dir.path(), name, t)?;
    }
    let step = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, decay: 1.0 - 1e-2 * 0.05, t: 3 };
    let (bc1, bc2) = (1.0 - step.beta1.powi(3), 1.0 - step.beta2.powi(3));
    let (p_cpu, mv_cpu) = (p.copy()?, mv.copy()?);
    adamw_update(&p_cpu, &mv_cpu, &g, &step)?;
    let consts = [step.lr, step.beta1, step.beta2, step.eps, bc1, bc2, step.decay];
    let args: Vec<String> = ["adamw".to_string(), n.to_string()]
        .into_iter()
        .chain(consts.iter().map(|v| format!("{v:e}")))
        .collect();
    run(dir.path(), &args);
    assert_close("adamw: parameter", &read_f32(dir.path(), "p"), &p_cpu, 1e-6);
    assert_close("adamw: moments", &read_f32(dir.path(), "mv"), &mv_cpu, 1e-6);
    Ok(())
}

#[test]
fn epilogue_kernel_matches_candle_ops() -> Result<()> {
    let dev = Device::Cpu;
    // (n, c, hw, scale, shift, adds, relu): an inference batch norm with and without its ReLU, a
    // bias, sums of one to three operands with or without a bias, and a plain ReLU.
    let cases = [
        (2, 3, 10, true, true, 0, true),
        (1, 4, 7, true, true, 0, false),
        (3, 2, 5, false, true, 0, false),
        (2, 5, 6, false, true, 2, true),
        (1, 3, 9, false, false, 1, false),
        (2, 2, 4, false, false, 3, true),
        (3, 1, 8, true, false, 1, true),
        (1, 6, 3, false, false, 0, true),
    ];
    for (n, c, hw, scale, shift, adds, relu) in cases {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let x = Tensor::randn(0f32, 1., (n, c, hw), &dev)?;
        write(dir.path(), "x", &x)?;
        let mut want = x.clone();
        if scale {
            let s = Tensor::randn(0f32, 1., c, &dev)?;
            write(dir.path(), "scale", &s)?;
            want = want.broadcast_mul(&s.reshape((1, c, 1))?)?;
        }
        if shift {
            let b = Tensor::randn(0f32, 1., c, &dev)?;
            write(dir.path(), "shift", &b)?;
            want = want.broadcast_add(&b.reshape((1, c, 1))?)?;
        }
        for i in 0..adds {
            let a = Tensor::randn(0f32, 1., (n, c, hw), &dev)?;
            write(dir.path(), &format!("a{i}"), &a)?;
            want = (want + a)?;
        }
        if relu {
            want = want.relu()?;
        }
        let flags = u8::from(scale) | (u8::from(shift) << 1) | (u8::from(relu) << 2);
        let args = ["ep".to_string(), n.to_string(), c.to_string(), hw.to_string()]
            .into_iter()
            .chain([flags.to_string(), adds.to_string()])
            .collect::<Vec<_>>();
        run(dir.path(), &args);
        let what =
            format!("epilogue {n}x{c}x{hw}, scale {scale}, shift {shift}, {adds} operands, relu {relu}");
        assert_close(&what, &read_f32(dir.path(), "y"), &want, 1e-6);
    }
    Ok(())
}
