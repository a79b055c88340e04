//! Our own CUDA kernels (the `cuda` feature): where candle has no single kernel for an op that
//! the students and ONNX teachers run many times, a composition of candle ops costs dozens of
//! launches per layer. PTX is built from `kernels/*.cu` by build.rs and loaded once per device.
//!
//! - 3×3 depthwise convolution: forward and both gradients (`kernels/depthwise.cu`), behind the
//!   same candle ops as the CPU kernels in [`super::depthwise`], so candle's autograd uses them.
//! - The AdamW update, two in-place kernels per parameter (`kernels/adamw.cu`, [`super::adamw`]).
//! - Training-mode batch norm with its fused ReLU6: statistics, output, and the backward pass
//!   (`kernels/batchnorm.cu`, [`super::batchnorm`]); statistics stay on the device.
//! - The epilogue of an inference step in one pass: a per-channel scale and shift (an inference
//!   batch norm, a bias), up to three added tensors and a ReLU (`kernels/epilogue.cu`,
//!   [`super::channel_epilogue`]), for the teachers.
//! - With `cudnn`, not a kernel: cuDNN's forward algorithm for candle's convolution chosen once
//!   per shape ([`conv2d_cudnn`], family `conv-algo`).
//!
//! `DISTILLERY_CUDA_KERNELS=0` turns them off (the portable compositions run instead) and a list
//! (`depthwise,batchnorm,adamw,epilogue,conv-algo`) keeps only the families named, to compare or
//! bisect on a GPU.
//! A failed launch names its kernel.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Layout, Result, Tensor, bail};

use super::Kernels;

const DEPTHWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/depthwise.ptx"));
const ADAMW_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
const BATCHNORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/batchnorm.ptx"));
const EPILOGUE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/epilogue.ptx"));
const BLOCK: u32 = 256;

/// Every family with its name in `DISTILLERY_CUDA_KERNELS`.
const FAMILIES: [(Kernels, &str); 5] = [
    (Kernels::Depthwise, "depthwise"),
    (Kernels::BatchNorm, "batchnorm"),
    (Kernels::AdamW, "adamw"),
    (Kernels::Epilogue, "epilogue"),
    (Kernels::ConvAlgo, "conv-algo"),
];

/// Whether `t` is on a CUDA device and `family`'s kernels serve it (f32 or f64, not turned off:
/// `DISTILLERY_CUDA_KERNELS` unset or `1` enables all, `0` none, a list such as
/// `depthwise,adamw` those named).
pub(crate) fn serves(t: &Tensor, family: Kernels) -> bool {
    static ON: OnceLock<Vec<Kernels>> = OnceLock::new();
    let on = ON.get_or_init(|| {
        let v = std::env::var("DISTILLERY_CUDA_KERNELS").unwrap_or_default();
        let v = v.trim();
        match v {
            "" | "1" => FAMILIES.iter().map(|f| f.0).collect(),
            "0" => Vec::new(),
            list => FAMILIES
                .iter()
                .filter(|(_, name)| list.split(',').any(|x| x.trim() == *name))
                .map(|f| f.0)
                .collect(),
        }
    });
    t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::F64) && on.contains(&family)
}

fn launch_error(
    kernel: &str,
    e: candle_core::cuda_backend::cudarc::driver::DriverError,
) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA kernel {kernel}: {e:?}"))
}

/// Sizes of one depthwise convolution: input `[n, c, h, w]`, output `[n, c, ho, wo]`, stride
/// `s` and `p` zero rows/columns before the image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Depthwise {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub ho: usize,
    pub wo: usize,
    pub s: usize,
    pub p: usize,
}

impl Depthwise {
    fn ints(&self) -> Result<[i32; 7]> {
        let v = [self.c, self.h, self.w, self.ho, self.wo, self.s, self.p];
        let mut out = [0i32; 7];
        for (o, x) in out.iter_mut().zip(v) {
            *o = i32::try_from(x)
                .map_err(|_| candle_core::Error::Msg(format!("depthwise-cuda: size {x} too large")))?;
        }
        Ok(out)
    }
}

fn grid(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(BLOCK as usize).clamp(1, 1 << 24) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F64 => Ok("f64"),
        d => bail!("{op}: unsupported dtype {d:?} on CUDA (f32 or f64)"),
    }
}

/// The contiguous elements of `s` under `l`.
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// Runs an elementwise-output kernel `name_{f32,f64}(a, b, out, planes, c, h, w, ho, wo, s, p)`
/// with `total` outputs.
fn launch_map<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    g: Depthwise,
    total: usize,
) -> Result<CudaStorage> {
    let sfx = suffix(a.dtype(), name)?;
    let (a, b) = (view::<T>(a, al, name, "first operand")?, view::<T>(b, bl, name, "second operand")?);
    let func =
        dev.get_or_load_custom_func(&format!("{name}_{sfx}"), "distillery_depthwise", DEPTHWISE_PTX)?;
    // SAFETY: the kernel writes every one of the `total` elements.
    let out = unsafe { dev.alloc::<T>(total)? };
    let planes = (g.n * g.c) as i64;
    let [c, h, w, ho, wo, s, p] = g.ints()?;
    let mut builder = func.builder();
    builder.arg(&a).arg(&b).arg(&out).arg(&planes);
    builder.arg(&c).arg(&h).arg(&w).arg(&ho).arg(&wo).arg(&s).arg(&p);
    // SAFETY: arguments match the kernel's signature in kernels/depthwise.cu; the grid-stride loop
    // stays inside `total` and the sizes the layouts were checked against.
    unsafe { builder.launch(grid(total)) }.map_err(|e| launch_error(name, e))?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `y [n,c,ho,wo]` from `x [n,c,h,w]` and `k [c,1,3,3]`.
pub(crate) fn depthwise_fwd(
    x: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    g: Depthwise,
) -> Result<CudaStorage> {
    let dev = x.0.device();
    let total = g.n * g.c * g.ho * g.wo;
    match x.0.dtype() {
        DType::F64 => launch_map::<f64>(dev, "dw3x3_fwd", x, k, g, total),
        _ => launch_map::<f32>(dev, "dw3x3_fwd", x, k, g, total),
    }
}

/// `grad_x [n,c,h,w]` from `grad_y [n,c,ho,wo]` and `k [c,1,3,3]`.
pub(crate) fn depthwise_bwd_input(
    gy: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    g: Depthwise,
) -> Result<CudaStorage> {
    let dev = gy.0.device();
    let total = g.n * g.c * g.h * g.w;
    match gy.0.dtype() {
        DType::F64 => launch_map::<f64>(dev, "dw3x3_bwd_input", gy, k, g, total),
        _ => launch_map::<f32>(dev, "dw3x3_bwd_input", gy, k, g, total),
    }
}

/// `grad_k [c,1,3,3]` from `x [n,c,h,w]` and `grad_y [n,c,ho,wo]`: per-channel sums in f64,
/// split into parts for parallelism and added in a fixed order.
pub(crate) fn depthwise_bwd_weight(
    x: (&CudaStorage, &Layout),
    gy: (&CudaStorage, &Layout),
    g: Depthwise,
) -> Result<CudaStorage> {
    match x.0.dtype() {
        DType::F64 => bwd_weight::<f64>(x, gy, g),
        _ => bwd_weight::<f32>(x, gy, g),
    }
}

fn bwd_weight<T: CudaDType + DeviceRepr>(
    (xs, xl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    g: Depthwise,
) -> Result<CudaStorage> {
    const OP: &str = "dw3x3_bwd_weight";
    let dev = xs.device();
    let sfx = suffix(xs.dtype(), OP)?;
    let (x, gy) = (view::<T>(xs, xl, OP, "input")?, view::<T>(gs, gl, OP, "grad")?);
    // About 32 elements per thread and part; at most 128 parts per channel.
    let per = g.n * g.ho * g.wo;
    let parts = per.div_ceil(BLOCK as usize * 32).clamp(1, 128);
    let parts_i = parts as i32;
    let n =
        i32::try_from(g.n).map_err(|_| candle_core::Error::Msg(format!("{OP}: batch {} too large", g.n)))?;
    let [c, h, w, ho, wo, s, p] = g.ints()?;
    let partials_fn =
        dev.get_or_load_custom_func(&format!("{OP}_parts_{sfx}"), "distillery_depthwise", DEPTHWISE_PTX)?;
    // SAFETY: every (channel, part) block writes its nine partials.
    let partial = unsafe { dev.alloc::<f64>(g.c * parts * 9)? };
    let mut builder = partials_fn.builder();
    builder.arg(&x).arg(&gy).arg(&partial).arg(&n);
    builder.arg(&c).arg(&h).arg(&w).arg(&ho).arg(&wo).arg(&s).arg(&p);
    let cfg = LaunchConfig {
        grid_dim: (g.c as u32, parts as u32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel; it reads only inside the checked layouts.
    unsafe { builder.launch(cfg) }.map_err(|e| launch_error(OP, e))?;
    let sum_fn =
        dev.get_or_load_custom_func(&format!("{OP}_sum_{sfx}"), "distillery_depthwise", DEPTHWISE_PTX)?;
    // SAFETY: one thread per (channel, tap) writes each element.
    let out = unsafe { dev.alloc::<T>(g.c * 9)? };
    let mut builder = sum_fn.builder();
    builder.arg(&partial).arg(&out).arg(&c).arg(&parts_i);
    // SAFETY: as above.
    unsafe { builder.launch(grid(g.c * 9)) }.map_err(|e| launch_error(OP, e))?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// A mutable contiguous view of `s` under `l`.
fn view_mut<'a, T: CudaDType>(
    s: &'a mut CudaStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(a..b)),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// `mv [2, n]` (m, then v) ← the moments' update from the gradient `g [n]`, in place.
pub(crate) fn adamw_moments(
    (mv, ml): (&mut CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    beta1: f64,
    beta2: f64,
) -> Result<()> {
    fn go<T: CudaDType + DeviceRepr>(
        (mv, ml): (&mut CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
        b: [T; 2],
    ) -> Result<()> {
        const OP: &str = "adamw_moments";
        let dev = mv.device().clone();
        let sfx = suffix(mv.dtype(), OP)?;
        let n = gl.shape().elem_count();
        if ml.shape().elem_count() != 2 * n {
            bail!("{OP}: moments {:?} do not fit a gradient of {n} elements", ml.dims());
        }
        let func = dev.get_or_load_custom_func(&format!("{OP}_{sfx}"), "distillery_adamw", ADAMW_PTX)?;
        let g = view::<T>(g, gl, OP, "gradient")?;
        let mut mv = view_mut::<T>(mv, ml, OP, "moments")?;
        let n_i = n as i64;
        let mut builder = func.builder();
        builder.arg(&mut mv).arg(&g).arg(&n_i).arg(&b[0]).arg(&b[1]);
        // SAFETY: arguments match kernels/adamw.cu; the kernel stays inside the 2n and n elements.
        unsafe { builder.launch(grid(n)) }.map_err(|e| launch_error(OP, e))?;
        Ok(())
    }
    match mv.dtype() {
        DType::F64 => go::<f64>((mv, ml), (g, gl), [beta1, beta2]),
        _ => go::<f32>((mv, ml), (g, gl), [beta1 as f32, beta2 as f32]),
    }
}

/// `p [n]` ← its AdamW step from the moments `mv [2, n]`, in place; `c` = [lr, ε, bc1, bc2, decay].
pub(crate) fn adamw_param(
    (p, pl): (&mut CudaStorage, &Layout),
    (mv, ml): (&CudaStorage, &Layout),
    c: [f64; 5],
) -> Result<()> {
    fn go<T: CudaDType + DeviceRepr>(
        (p, pl): (&mut CudaStorage, &Layout),
        (mv, ml): (&CudaStorage, &Layout),
        c: [T; 5],
    ) -> Result<()> {
        const OP: &str = "adamw_param";
        let dev = p.device().clone();
        let sfx = suffix(p.dtype(), OP)?;
        let n = pl.shape().elem_count();
        if ml.shape().elem_count() != 2 * n {
            bail!("{OP}: moments {:?} do not fit a parameter of {n} elements", ml.dims());
        }
        let func = dev.get_or_load_custom_func(&format!("{OP}_{sfx}"), "distillery_adamw", ADAMW_PTX)?;
        let mv = view::<T>(mv, ml, OP, "moments")?;
        let mut p = view_mut::<T>(p, pl, OP, "parameter")?;
        let n_i = n as i64;
        let mut builder = func.builder();
        builder.arg(&mut p).arg(&mv).arg(&n_i);
        for v in &c {
            builder.arg(v);
        }
        // SAFETY: arguments match kernels/adamw.cu; the kernel stays inside the n and 2n elements.
        unsafe { builder.launch(grid(n)) }.map_err(|e| launch_error(OP, e))?;
        Ok(())
    }
    match p.dtype() {
        DType::F64 => go::<f64>((p, pl), (mv, ml), c),
        _ => go::<f32>((p, pl), (mv, ml), c.map(|v| v as f32)),
    }
}

/// The CUDA storage of `t` (a tensor held by an op rather than passed to it), with its layout.
pub(crate) fn with_storage<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cuda(c) => f(c, l),
        _ => bail!("expected a tensor on a CUDA device, got one on {:?}", t.device()),
    }
}

/// Sizes of one batch norm: `[n, c, hw]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bn {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

impl Bn {
    /// Blocks per channel for the reductions: about 16 values per thread, at most 64.
    fn parts(&self) -> usize {
        (self.n * self.hw).div_ceil(BLOCK as usize * 16).clamp(1, 64)
    }

    fn ints(&self, op: &str) -> Result<(i32, i32, i64)> {
        let n = i32::try_from(self.n)
            .map_err(|_| candle_core::Error::Msg(format!("{op}: batch {} too large", self.n)))?;
        let c = i32::try_from(self.c)
            .map_err(|_| candle_core::Error::Msg(format!("{op}: {} channels too many", self.c)))?;
        Ok((n, c, self.hw as i64))
    }

    fn reduce_grid(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.c as u32, self.parts() as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Loads a kernel of `kernels/batchnorm.cu` (once per device).
macro_rules! bn_func {
    ($dev:expr, $name:expr) => {
        $dev.get_or_load_custom_func(&$name, "distillery_batchnorm", BATCHNORM_PTX)?
    };
}

/// Per-channel mean, biased variance and `1/√(var + ε)` of `x [n, c, hw]`: `[3, c]` f64.
pub(crate) fn bn_stats((xs, xl): (&CudaStorage, &Layout), d: Bn, eps: f64) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(xs: &CudaStorage, xl: &Layout, d: Bn, eps: f64) -> Result<CudaStorage> {
        const OP: &str = "bn_stats";
        let dev = xs.device();
        let sfx = suffix(xs.dtype(), OP)?;
        let x = view::<T>(xs, xl, OP, "input")?;
        let (n, c, hw) = d.ints(OP)?;
        let parts = d.parts();
        // SAFETY: every (channel, part) block writes its two sums.
        let partial = unsafe { dev.alloc::<f64>(d.c * parts * 2)? };
        let f = bn_func!(dev, &format!("bn_stats_parts_{sfx}"));
        let mut b = f.builder();
        b.arg(&x).arg(&partial).arg(&n).arg(&c).arg(&hw);
        // SAFETY: arguments match kernels/batchnorm.cu; reads stay inside x's n·c·hw values.
        unsafe { b.launch(d.reduce_grid()) }.map_err(|e| launch_error(OP, e))?;
        // SAFETY: one thread per channel writes its three statistics.
        let stats = unsafe { dev.alloc::<f64>(3 * d.c)? };
        let (parts_i, m) = (parts as i32, (d.n * d.hw) as f64);
        let f = bn_func!(dev, "bn_stats_finish");
        let mut b = f.builder();
        b.arg(&partial).arg(&stats).arg(&c).arg(&parts_i).arg(&m).arg(&eps);
        // SAFETY: as above.
        unsafe { b.launch(grid(d.c)) }.map_err(|e| launch_error(OP, e))?;
        Ok(CudaStorage::wrap_cuda_slice(stats, dev.clone()))
    }
    match xs.dtype() {
        DType::F64 => go::<f64>(xs, xl, d, eps),
        _ => go::<f32>(xs, xl, d, eps),
    }
}

/// `y = (x − μ)·γσ⁻¹ + β` (clamped to [0, 6] with `relu6`) from `stats` of [`bn_stats`].
pub(crate) fn bn_apply(
    x: (&CudaStorage, &Layout),
    gamma: (&CudaStorage, &Layout),
    beta: (&CudaStorage, &Layout),
    stats: (&CudaStorage, &Layout),
    d: Bn,
    relu6: bool,
) -> Result<CudaStorage> {
    type In<'a> = (&'a CudaStorage, &'a Layout);
    fn go<T: CudaDType + DeviceRepr>(
        x: In,
        gamma: In,
        beta: In,
        stats: In,
        d: Bn,
        relu6: bool,
    ) -> Result<CudaStorage> {
        const OP: &str = "bn_apply";
        let dev = x.0.device();
        let sfx = suffix(x.0.dtype(), OP)?;
        let (xv, gv, bv) = (
            view::<T>(x.0, x.1, OP, "input")?,
            view::<T>(gamma.0, gamma.1, OP, "weight")?,
            view::<T>(beta.0, beta.1, OP, "bias")?,
        );
        let sv = view::<f64>(stats.0, stats.1, OP, "statistics")?;
        let (_, c, hw) = d.ints(OP)?;
        let total = d.n * d.c * d.hw;
        let (total_i, relu6) = (total as i64, i32::from(relu6));
        // SAFETY: the kernel writes each of the `total` outputs.
        let y = unsafe { dev.alloc::<T>(total)? };
        let f = bn_func!(dev, &format!("bn_apply_{sfx}"));
        let mut b = f.builder();
        b.arg(&xv).arg(&gv).arg(&bv).arg(&sv).arg(&y).arg(&total_i).arg(&c).arg(&hw).arg(&relu6);
        // SAFETY: arguments match kernels/batchnorm.cu.
        unsafe { b.launch(grid(total)) }.map_err(|e| launch_error(OP, e))?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    match x.0.dtype() {
        DType::F64 => go::<f64>(x, gamma, beta, stats, d, relu6),
        _ => go::<f32>(x, gamma, beta, stats, d, relu6),
    }
}

/// `[2, c]` f64: `∂γ = σ⁻¹·Σg'(x − μ)` and `∂β = Σg'`, g' the gradient masked by the ReLU6.
pub(crate) fn bn_grad_reduce(
    x: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    y: (&CudaStorage, &Layout),
    stats: (&CudaStorage, &Layout),
    d: Bn,
    relu6: bool,
) -> Result<CudaStorage> {
    type In<'a> = (&'a CudaStorage, &'a Layout);
    fn go<T: CudaDType + DeviceRepr>(
        x: In,
        g: In,
        y: In,
        stats: In,
        d: Bn,
        relu6: bool,
    ) -> Result<CudaStorage> {
        const OP: &str = "bn_grad_reduce";
        let dev = x.0.device();
        let sfx = suffix(x.0.dtype(), OP)?;
        let (xv, gv, yv) = (
            view::<T>(x.0, x.1, OP, "input")?,
            view::<T>(g.0, g.1, OP, "grad")?,
            view::<T>(y.0, y.1, OP, "output")?,
        );
        let sv = view::<f64>(stats.0, stats.1, OP, "statistics")?;
        let (n, c, hw) = d.ints(OP)?;
        let parts = d.parts();
        let relu6 = i32::from(relu6);
        // SAFETY: every (channel, part) block writes its two sums.
        let partial = unsafe { dev.alloc::<f64>(d.c * parts * 2)? };
        let f = bn_func!(dev, &format!("bn_grad_parts_{sfx}"));
        let mut b = f.builder();
        b.arg(&xv).arg(&gv).arg(&yv).arg(&sv).arg(&partial).arg(&n).arg(&c).arg(&hw).arg(&relu6);
        // SAFETY: arguments match kernels/batchnorm.cu.
        unsafe { b.launch(d.reduce_grid()) }.map_err(|e| launch_error(OP, e))?;
        // SAFETY: one thread per channel writes both sums.
        let red = unsafe { dev.alloc::<f64>(2 * d.c)? };
        let parts_i = parts as i32;
        let f = bn_func!(dev, "bn_grad_finish");
        let mut b = f.builder();
        b.arg(&partial).arg(&sv).arg(&red).arg(&c).arg(&parts_i);
        // SAFETY: as above.
        unsafe { b.launch(grid(d.c)) }.map_err(|e| launch_error(OP, e))?;
        Ok(CudaStorage::wrap_cuda_slice(red, dev.clone()))
    }
    match x.0.dtype() {
        DType::F64 => go::<f64>(x, g, y, stats, d, relu6),
        _ => go::<f32>(x, g, y, stats, d, relu6),
    }
}

/// `∂x` from the gradient, the statistics and the sums of [`bn_grad_reduce`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_grad_input(
    x: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    y: (&CudaStorage, &Layout),
    gamma: (&CudaStorage, &Layout),
    stats: (&CudaStorage, &Layout),
    red: (&CudaStorage, &Layout),
    d: Bn,
    relu6: bool,
) -> Result<CudaStorage> {
    type In<'a> = (&'a CudaStorage, &'a Layout);
    #[allow(clippy::too_many_arguments)]
    fn go<T: CudaDType + DeviceRepr>(
        x: In,
        g: In,
        y: In,
        gamma: In,
        stats: In,
        red: In,
        d: Bn,
        relu6: bool,
    ) -> Result<CudaStorage> {
        const OP: &str = "bn_grad_input";
        let dev = x.0.device();
        let sfx = suffix(x.0.dtype(), OP)?;
        let (xv, gv, yv) = (
            view::<T>(x.0, x.1, OP, "input")?,
            view::<T>(g.0, g.1, OP, "grad")?,
            view::<T>(y.0, y.1, OP, "output")?,
        );
        let wv = view::<T>(gamma.0, gamma.1, OP, "weight")?;
        let (sv, rv) =
            (view::<f64>(stats.0, stats.1, OP, "statistics")?, view::<f64>(red.0, red.1, OP, "sums")?);
        let (_, c, hw) = d.ints(OP)?;
        let total = d.n * d.c * d.hw;
        let (total_i, m, relu6) = (total as i64, (d.n * d.hw) as f64, i32::from(relu6));
        // SAFETY: the kernel writes each of the `total` outputs.
        let dx = unsafe { dev.alloc::<T>(total)? };
        let f = bn_func!(dev, &format!("bn_grad_input_{sfx}"));
        let mut b = f.builder();
        b.arg(&xv).arg(&gv).arg(&yv).arg(&wv).arg(&sv).arg(&rv).arg(&dx);
        b.arg(&total_i).arg(&c).arg(&hw).arg(&m).arg(&relu6);
        // SAFETY: arguments match kernels/batchnorm.cu.
        unsafe { b.launch(grid(total)) }.map_err(|e| launch_error(OP, e))?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    }
    match x.0.dtype() {
        DType::F64 => go::<f64>(x, g, y, gamma, stats, red, d, relu6),
        _ => go::<f32>(x, g, y, gamma, stats, red, d, relu6),
    }
}

/// `relu?(x·scale[ch] + shift[ch] + Σ adds)` in one kernel for `x [n, c, …]` (channels on axis 1),
/// `scale` and `shift` holding `c` values and each of the (at most three) `adds` `x`'s shape, all
/// contiguous and of one dtype, as [`super::channel_epilogue`] checks.
pub(crate) fn channel_epilogue(
    x: &Tensor,
    scale: Option<&Tensor>,
    shift: Option<&Tensor>,
    adds: &[&Tensor],
    relu: bool,
) -> Result<Tensor> {
    const OP: &str = "channel_epilogue";
    type In<'a> = (&'a CudaStorage, &'a Layout);
    fn go<T: CudaDType + DeviceRepr>(ins: &[In; 6], ints: (i64, i32, i64, i32, i32)) -> Result<CudaStorage> {
        let dev = ins[0].0.device();
        let sfx = suffix(ins[0].0.dtype(), OP)?;
        let func =
            dev.get_or_load_custom_func(&format!("{OP}_{sfx}"), "distillery_epilogue", EPILOGUE_PTX)?;
        let names = ["input", "scale", "shift", "first operand", "second operand", "third operand"];
        let mut v = Vec::with_capacity(6);
        for ((s, l), what) in ins.iter().zip(names) {
            v.push(view::<T>(s, l, OP, what)?);
        }
        let (total, c, hw, flags, adds) = ints;
        // SAFETY: the kernel writes each of the `total` outputs.
        let y = unsafe { dev.alloc::<T>(total as usize)? };
        let mut b = func.builder();
        for t in &v {
            b.arg(t);
        }
        b.arg(&y).arg(&total).arg(&c).arg(&hw).arg(&flags).arg(&adds);
        // SAFETY: arguments match kernels/epilogue.cu; the caller checked that scale and shift hold
        // `c` values and the operands `total`; the kernel reads neither what `flags` and `adds`
        // leave out.
        unsafe { b.launch(grid(total as usize)) }.map_err(|e| launch_error(OP, e))?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let dims = x.dims();
    if dims.len() < 2 || adds.len() > 3 {
        bail!(
            "{OP}: needs an input of rank 2 or more and at most three operands, got {dims:?} and {}",
            adds.len()
        );
    }
    let (c, total) = (dims[1], x.elem_count());
    let hw = total / (dims[0] * c).max(1);
    let c_i =
        i32::try_from(c).map_err(|_| candle_core::Error::Msg(format!("{OP}: {c} channels too many")))?;
    let flags = i32::from(scale.is_some()) | (i32::from(shift.is_some()) << 1) | (i32::from(relu) << 2);
    let ints = (total as i64, c_i, hw as i64, flags, adds.len() as i32);
    // Absent operands are passed as `x`, which the kernel does not read in their place.
    let tensors = [x, scale.unwrap_or(x), shift.unwrap_or(x)]
        .into_iter()
        .chain((0..3).map(|i| adds.get(i).copied().unwrap_or(x)));
    let held: Vec<_> = tensors.map(|t| t.storage_and_layout()).collect();
    let mut ins = Vec::with_capacity(6);
    for (s, l) in &held {
        match &**s {
            candle_core::Storage::Cuda(cs) => ins.push((cs, *l)),
            _ => bail!("{OP}: every operand must be on the CUDA device"),
        }
    }
    let ins: [In; 6] = ins.try_into().map_err(|_| candle_core::Error::Msg(format!("{OP}: six operands")))?;
    let out = match x.dtype() {
        DType::F64 => go::<f64>(&ins, ints)?,
        _ => go::<f32>(&ins, ints)?,
    };
    drop(held);
    Ok(Tensor::from_storage(
        candle_core::Storage::Cuda(out),
        x.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// candle's convolution through cuDNN (`groups` 1), with the forward algorithm chosen once per
/// shape. candle asks cuDNN's heuristic (`cudnnGetConvolutionForwardAlgorithm_v7`) on every call,
/// which costs more host time than the convolution's launch (up to about a millisecond for some
/// shapes); the answer is kept here per device, dtype, input and weight shape, padding, stride and
/// dilation, as PyTorch keeps its own. `None` where candle would not take cuDNN's path with an
/// algorithm (dtypes other than f32 and f64, a strided weight): the caller convolves as before.
#[cfg(feature = "cudnn")]
pub(crate) fn conv2d_cudnn(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
    dilation: usize,
) -> Result<Option<Tensor>> {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use candle_core::conv::CudnnFwdAlgo;
    use candle_core::cuda_backend::DeviceId;
    use candle_core::cuda_backend::cudarc::cudnn::{ConvForward, Cudnn, CudnnDataType, sys};

    type Key = (DeviceId, DType, [usize; 4], [usize; 4], [usize; 3]);
    static ALGOS: OnceLock<Mutex<HashMap<Key, CudnnFwdAlgo>>> = OnceLock::new();
    thread_local! {
        // cuDNN handles are neither Send nor Sync: one per thread and device, as candle keeps its.
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    }

    fn pick<T: CudnnDataType>(cudnn: &Arc<Cudnn>, key: &Key) -> Result<CudnnFwdAlgo> {
        use sys::cudnnConvolutionFwdAlgo_t as A;
        let (_, _, [n, c, h, w], [co, ci, kh, kw], [pad, stride, dil]) = *key;
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("cudnn conv2d: size {v} too large")))
        };
        let (oh, ow) = (
            (h + 2 * pad - dil * (kh - 1) - 1) / stride + 1,
            (w + 2 * pad - dil * (kw - 1) - 1) / stride + 1,
        );
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let conv = cudnn.create_conv2d::<T>(
            [int(pad)?; 2],
            [int(stride)?; 2],
            [int(dil)?; 2],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        let xd = cudnn.create_4d_tensor::<T>(nchw, [int(n)?, int(c)?, int(h)?, int(w)?])?;
        let wd = cudnn.create_4d_filter::<T>(nchw, [int(co)?, int(ci)?, int(kh)?, int(kw)?])?;
        let yd = cudnn.create_4d_tensor::<T>(nchw, [int(n)?, int(co)?, int(oh)?, int(ow)?])?;
        let algo = ConvForward { conv: &conv, x: &xd, w: &wd, y: &yd }.pick_algorithm()?;
        Ok(match algo {
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM => CudnnFwdAlgo::ImplicitGemm,
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM => CudnnFwdAlgo::ImplicitPrecompGemm,
            A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM => CudnnFwdAlgo::Gemm,
            A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT => CudnnFwdAlgo::Direct,
            A::CUDNN_CONVOLUTION_FWD_ALGO_FFT => CudnnFwdAlgo::Fft,
            A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING => CudnnFwdAlgo::FftTiling,
            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD => CudnnFwdAlgo::Winograd,
            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED => CudnnFwdAlgo::WinogradNonFused,
            A::CUDNN_CONVOLUTION_FWD_ALGO_COUNT => bail!("cudnn conv2d: the heuristic returned no algorithm"),
        })
    }

    let candle_core::Device::Cuda(dev) = x.device() else { return Ok(None) };
    if !matches!(x.dtype(), DType::F32 | DType::F64) || w.dtype() != x.dtype() || !w.is_contiguous() {
        return Ok(None);
    }
    let ((n, c, h, wd), (co, ci, kh, kw)) = (x.dims4()?, w.dims4()?);
    let reach = |k: usize| dilation * k.saturating_sub(1) + 1;
    if stride == 0 || h + 2 * pad < reach(kh) || wd + 2 * pad < reach(kw) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let key: Key = (dev.id(), x.dtype(), [n, c, h, wd], [co, ci, kh, kw], [pad, stride, dilation]);
    let algos = || {
        ALGOS
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| candle_core::Error::Msg("cudnn algorithm cache poisoned".into()))
    };
    let known = algos()?.get(&key).copied();
    let algo = match known {
        Some(a) => a,
        None => {
            let cudnn = HANDLES.with(|handles| -> Result<Arc<Cudnn>> {
                if let Some(c) = handles.borrow().get(&dev.id()) {
                    return Ok(c.clone());
                }
                let c = Cudnn::new(dev.cuda_stream())?;
                handles.borrow_mut().insert(dev.id(), c.clone());
                Ok(c)
            })?;
            let a = match x.dtype() {
                DType::F64 => pick::<f64>(&cudnn, &key)?,
                _ => pick::<f32>(&cudnn, &key)?,
            };
            algos()?.insert(key, a);
            a
        }
    };
    x.conv2d_with_algo(w, pad, stride, dilation, 1, Some(algo)).map(Some)
}
