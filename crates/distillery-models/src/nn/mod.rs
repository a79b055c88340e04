//! Trainable layers for the students, chosen for fast CPU training with candle.
//!
//! - [`DepthwiseConv3x3`]: a hand-written op (see [`depthwise`]); candle's grouped convolution is
//!   an order of magnitude slower in backward.
//! - [`Pointwise`]: 1×1 convolution as gemms over the `[n, c, h·w]` view, forward and both
//!   gradients (see [`pointwise`]); on other devices a batched matmul, whose backward is ~4×
//!   faster than candle's conv backward.
//! - [`Conv2d`]: the remaining (stem, ResNet, tiny) convolutions, computed as `W · im2col(x)`
//!   (see [`im2col`]; on other devices the unfolding is a composition of candle ops): candle's
//!   direct convolution backward is tens of times slower than its forward on the CPU, fails for
//!   stride 2 when height and width differ in parity, and on CUDA faults at large batches.
//! - [`BatchNorm2d`]: train/eval batch norm whose running statistics are [`Var`]s registered in
//!   the `VarMap`, so they are saved with the weights (the optimiser skips them: they get no
//!   gradient).
//! - [`conv_bn_chain_t`]: convolutions each followed by its batch norm (and ReLU6), with an
//!   optional shortcut, as one op when training on the CPU (see [`chain`]): no gradient tensor
//!   materialised between the stages.
//! - [`relu6`] (a fused op), [`global_avg_pool`], [`max_pool2x2`] (exact, via reshape and max;
//!   candle's `max_pool2d` backward is mis-scaled), [`Linear`], [`Dropout`].
//!
//! Every convolution and linear layer records its MACs with [`crate::cost::record`].

pub mod adamw;
pub mod batchnorm;
mod chain;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod depthwise;
pub mod fastconv;
#[cfg(test)]
pub(crate) mod gradcheck;
pub mod im2col;
pub mod pointwise;
pub mod simd;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, Var, WithDType,
    backend::BackendStorage, bail,
};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

pub use depthwise::depthwise_conv3x3;

use crate::cost;

thread_local! {
    static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread's training layers take their portable paths (inside
/// [`with_portable_layers`]).
pub fn portable_layers() -> bool {
    PORTABLE.with(|p| p.get())
}

/// Runs `f` with this thread's training layers on their portable paths (compositions of candle
/// ops, what GPUs run) even on the CPU, so those paths can be checked against the CPU kernels on
/// machines without a GPU.
pub fn with_portable_layers<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            PORTABLE.with(|p| p.set(self.0));
        }
    }
    let _reset = Reset(PORTABLE.with(|p| p.replace(true)));
    f()
}

/// Runs `f` on one of rayon's worker threads, so that the parallel loops of the kernels it calls
/// run there directly: called from any other thread, every loop is handed to the pool and the
/// caller sleeps until it is done, two context switches per kernel (a third of a face-api batch
/// of one image on two cores). This thread's [`with_portable_layers`] setting and MAC counting
/// ([`cost::count`]) carry over. Already on a worker, `f` simply runs.
///
/// While `f` runs, the pool's other workers are kept awake: between two of a model's kernels a
/// rayon worker goes to sleep, and waking it takes 10–30 µs, as long as a whole kernel of a small
/// model at batch 1. They are let go when `f` returns or unwinds ([`workers_kept_awake`] counts
/// them). A panic in `f` reaches the caller, and the worker's own settings are put back first.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let portable = PORTABLE.with(|p| p.get());
    let counting = cost::counting();
    let done = AtomicBool::new(false);
    // The worker may be waiting inside other work (another caller's, which it runs while it
    // waits): the settings are swapped in for `f` alone and the worker's own put back after.
    let (r, macs) = rayon::scope(|s| {
        for _ in 1..rayon::current_num_threads() {
            s.spawn(|_| keep_awake(&done));
        }
        let _running = RunningF::enter();
        let _finish = Finish { done: &done, portable: PORTABLE.with(|p| p.replace(portable)) };
        cost::isolated(counting, f)
    });
    cost::record(macs);
    r
}

/// Ends an [`on_pool`] closure when dropped, also when it unwinds: puts the worker's own
/// portable-layers setting back and lets the workers kept awake for it go.
struct Finish<'a> {
    done: &'a AtomicBool,
    portable: bool,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        PORTABLE.with(|p| p.set(self.portable));
        self.done.store(true, Ordering::Release);
    }
}

/// How long a worker kept awake by [`on_pool`] goes on looking for work that does not come before
/// it returns to rayon's own waiting (and sleeping).
const KEEP_AWAKE_IDLE: Duration = Duration::from_millis(1);

/// Workers currently kept awake by [`on_pool`], see [`workers_kept_awake`].
static KEPT_AWAKE: AtomicUsize = AtomicUsize::new(0);

/// Keep-awake jobs that have run so far (entered their loop), see [`keep_awake_runs`].
static KEEP_AWAKE_RUNS: AtomicUsize = AtomicUsize::new(0);

/// How many rayon workers [`on_pool`] calls (all of this process's) are keeping awake now.
pub fn workers_kept_awake() -> usize {
    KEPT_AWAKE.load(Ordering::Relaxed)
}

/// How many times, in this process, a worker has been kept awake for an [`on_pool`] call (one per
/// other worker and call, unless the worker was itself inside such a call). Unlike
/// [`workers_kept_awake`] it does not depend on the workers being awake at the same moment, which
/// on a loaded machine they may not be: one preempted for longer than the idle limit leaves.
pub fn keep_awake_runs() -> usize {
    KEEP_AWAKE_RUNS.load(Ordering::Relaxed)
}

thread_local! {
    /// How many [`on_pool`] closures are running on this thread (nested, when a worker waiting
    /// inside one runs another caller's).
    static RUNNING_F: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks an [`on_pool`] closure as running on this thread until dropped.
struct RunningF;

impl RunningF {
    fn enter() -> Self {
        RUNNING_F.with(|r| r.set(r.get() + 1));
        Self
    }
}

impl Drop for RunningF {
    fn drop(&mut self) {
        RUNNING_F.with(|r| r.set(r.get() - 1));
    }
}

/// Runs the pool's pending work (its own queue, the other workers', then work injected from
/// outside) until `done`, spinning where there is none, instead of going to sleep between the
/// kernels of one [`on_pool`] call.
///
/// A worker waiting inside a closure of [`on_pool`] (for one of its loops) runs whatever work it
/// finds, this job included; the job then returns at once, because waiting here for `done` would
/// bury that closure, perhaps the very one that sets `done`, beneath a wait for it. It returns
/// too after [`KEEP_AWAKE_IDLE`] without work, so a caller that nests in some other way costs a
/// millisecond, not a hang.
fn keep_awake(done: &AtomicBool) {
    if RUNNING_F.with(|r| r.get()) > 0 {
        return;
    }
    KEEP_AWAKE_RUNS.fetch_add(1, Ordering::Relaxed);
    KEPT_AWAKE.fetch_add(1, Ordering::Relaxed);
    let mut idle_since: Option<Instant> = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
        } else if idle_since.get_or_insert_with(Instant::now).elapsed() > KEEP_AWAKE_IDLE {
            break;
        } else {
            std::hint::spin_loop();
        }
    }
    KEPT_AWAKE.fetch_sub(1, Ordering::Relaxed);
}

/// How long [`for_each_task`]'s caller spins for the other threads' last tasks before it waits
/// the way rayon does (which sleeps after a few dozen rounds).
const TASK_SPIN_LIMIT: Duration = Duration::from_millis(2);

/// Runs `f(t)` for every `t` in `0..tasks` on up to all of the pool's threads, each taking the
/// next task as it finishes one (so uneven tasks balance themselves). The caller takes tasks
/// too, then spins until the other threads have finished theirs: a thread that waits for a
/// rayon `join` goes to sleep within some 30 µs, and waking it takes 10–30 µs more, as long as a
/// whole task of a small convolution at batch 1. Each `t` runs exactly once; a panic in `f`
/// reaches the caller.
pub(crate) fn for_each_task(tasks: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads().min(tasks);
    if threads <= 1 {
        (0..tasks).for_each(f);
        return;
    }
    // Tasks are taken in runs of neighbours (a quarter of an even share), which keeps the tiles
    // of one image on one thread, as rayon's halving does.
    let run = (tasks / (4 * threads)).max(1);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let work = || {
        loop {
            let t0 = next.fetch_add(run, Ordering::Relaxed);
            if t0 >= tasks {
                break;
            }
            let t1 = (t0 + run).min(tasks);
            (t0..t1).for_each(&f);
            done.fetch_add(t1 - t0, Ordering::Release);
        }
    };
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| work());
        }
        work();
        // Every task is taken; wait for those still running elsewhere without sleeping. A
        // thread that took one and was then descheduled (or panicked) is waited for by the
        // scope after the limit.
        let start = Instant::now();
        let mut spins = 0u32;
        while done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > TASK_SPIN_LIMIT {
                break;
            }
        }
    });
}

/// Whether a layer takes its hand-written CPU kernel for `t`: a CPU tensor, outside
/// [`with_portable_layers`].
pub(crate) fn cpu_kernels(t: &Tensor) -> bool {
    t.device().is_cpu() && !PORTABLE.with(|p| p.get())
}

/// The families of CUDA kernels (`nn::cuda`, the `cuda` feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernels {
    Depthwise,
    BatchNorm,
    AdamW,
    Epilogue,
    /// cuDNN's convolution algorithm chosen once per shape (`cudnn` feature; not a kernel).
    ConvAlgo,
}

/// Whether `t` is on a CUDA device whose layers take our CUDA kernels of `family` rather than
/// compositions of candle ops.
pub(crate) fn cuda_kernels(t: &Tensor, family: Kernels) -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::serves(t, family) && !PORTABLE.with(|p| p.get())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (t, family);
        false
    }
}

/// candle's convolution of `x` with `w` (inference), with cuDNN's forward algorithm chosen once
/// per shape where the `cudnn` feature serves a dense convolution on a GPU (candle asks cuDNN's
/// heuristic on every call: see `nn::cuda::conv2d_cudnn`).
pub(crate) fn candle_conv2d(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    if groups == 1 && cuda_kernels(x, Kernels::ConvAlgo) {
        #[cfg(feature = "cudnn")]
        if let Some(y) = cuda::conv2d_cudnn(x, w, pad, stride, dilation)? {
            return Ok(y);
        }
    }
    x.conv2d(w, pad, stride, dilation, groups)
}

/// `relu?(x·scale[ch] + shift[ch] + Σ adds)` over `x [n, c, …]` (channels on axis 1) in one pass,
/// where our CUDA kernel serves `x` (the `cuda` feature; inference: no operand tracks a gradient).
/// `None` elsewhere, and where the operands do not fit the kernel (a scale or shift not of `c`
/// values, an operand of another shape, dtype or device, more than three operands): the caller
/// composes candle ops instead.
pub(crate) fn channel_epilogue(
    x: &Tensor,
    scale: Option<&Tensor>,
    shift: Option<&Tensor>,
    adds: &[&Tensor],
    relu: bool,
) -> Result<Option<Tensor>> {
    if !cuda_kernels(x, Kernels::Epilogue) || x.rank() < 2 || adds.len() > 3 {
        return Ok(None);
    }
    if scale.is_none() && shift.is_none() && adds.is_empty() && !relu {
        return Ok(Some(x.clone()));
    }
    let c = x.dim(1)?;
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device()) && !t.track_op();
    let per_channel = [scale, shift].into_iter().flatten().all(|t| same(t) && t.elem_count() == c);
    if x.track_op() || !per_channel || !adds.iter().all(|a| same(a) && a.dims() == x.dims()) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let x = x.contiguous()?;
        let scale = scale.map(Tensor::contiguous).transpose()?;
        let shift = shift.map(Tensor::contiguous).transpose()?;
        let adds = adds.iter().map(|a| a.contiguous()).collect::<Result<Vec<_>>>()?;
        let adds: Vec<&Tensor> = adds.iter().collect();
        cuda::channel_epilogue(&x, scale.as_ref(), shift.as_ref(), &adds, relu).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = relu;
        Ok(None)
    }
}

/// Kaiming-normal initialisation with fan-out (He et al. 2015), as used for MobileNetV2 and ResNet.
fn kaiming_fan_out(c_out: usize, k: usize, groups: usize) -> Init {
    let fan_out = (c_out * k * k / groups.max(1)).max(1) as f64;
    Init::Randn { mean: 0.0, stdev: (2.0 / fan_out).sqrt() }
}

/// A regular 2-D convolution, optionally with bias.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// `weight` is `[c_out, c_in, k, k]`, `bias` `[c_out]` when `bias` is true.
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", kaiming_fan_out(c_out, k, 1))?;
        let bias = if bias { Some(vb.get_with_hints(c_out, "bias", Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias, stride, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (c_out, c_in, kh, kw) = self.weight.dims4()?;
        let y = im2col::conv2d_unfolded(x, &self.weight, self.stride, self.padding)?;
        let (_, _, ho, wo) = y.dims4()?;
        cost::record(cost::conv2d_macs(&[n, c_out, ho, wo], c_in, kh, kw));
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, c_out, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// 1×1 convolution without bias computed as `W · x[n]` over the `[n, c_in, h·w]` view.
#[derive(Clone, Debug)]
pub struct Pointwise {
    /// Stored `[c_out, c_in, 1, 1]` (the usual convolution layout).
    weight: Tensor,
}

impl Pointwise {
    pub fn new(c_in: usize, c_out: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get_with_hints((c_out, c_in, 1, 1), "weight", kaiming_fan_out(c_out, 1, 1))?;
        Ok(Self { weight })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        pointwise_conv(x, &self.weight)
    }
}

/// 1×1 convolution `x [n,c_in,h,w]`, `weight [c_out,c_in,1,1]` as a batched matmul.
pub fn pointwise_conv(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (n, c_in, h, w) = x.dims4()?;
    let (c_out, wc_in, kh, kw) = weight.dims4()?;
    if wc_in != c_in || kh != 1 || kw != 1 {
        bail!("pointwise-conv: weight {:?} does not fit input with {c_in} channels", weight.dims());
    }
    cost::record(cost::conv2d_macs(&[n, c_out, h, w], c_in, 1, 1));
    if cpu_kernels(x) && matches!(x.dtype(), DType::F32 | DType::F64) && weight.dtype() == x.dtype() {
        return x.contiguous()?.apply_op2(&weight.contiguous()?, pointwise::PwFwd);
    }
    // Elsewhere: the weight is broadcast with a zero batch stride, which candle's CPU matmul takes as is
    // (no copy); its gradient is summed over the batch by the broadcast's backward.
    let w2 = weight.reshape((c_out, c_in))?.broadcast_as((n, c_out, c_in))?;
    let x3 = x.reshape((n, c_in, h * w))?;
    w2.matmul(&x3)?.reshape((n, c_out, h, w))
}

/// Depthwise 3×3 convolution (padding 1) without bias; see [`depthwise`].
#[derive(Clone, Debug)]
pub struct DepthwiseConv3x3 {
    /// `[c, 1, 3, 3]`.
    weight: Tensor,
    stride: usize,
}

impl DepthwiseConv3x3 {
    pub fn new(c: usize, stride: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get_with_hints((c, 1, 3, 3), "weight", kaiming_fan_out(c, 3, c))?;
        Ok(Self { weight, stride })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        depthwise_conv3x3(x, &self.weight, self.stride)
    }
}

/// Batch normalisation over `[n, c, h, w]` (per channel), with running statistics for eval.
///
/// Train mode normalises with the batch's mean and biased variance and updates the running
/// statistics (momentum 0.1, unbiased variance, as in PyTorch). Eval mode uses the running
/// statistics. Names under the builder: `weight`, `bias`, `running_mean`, `running_var`.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    pub fn new(c: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        // With a VarMap-backed builder these tensors are the VarMap's variables, so `Var::set`
        // below writes through to what `VarMap::save` persists.
        let running_mean = Var::from_tensor(&vb.get_with_hints(c, "running_mean", Init::Const(0.0))?)?;
        let running_var = Var::from_tensor(&vb.get_with_hints(c, "running_var", Init::Const(1.0))?)?;
        Ok(Self { weight, bias, running_mean, running_var, eps: 1e-5, momentum: 0.1 })
    }

    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Training batch norm composed from tensor ops: slower than the fused CPU op, but runs on
    /// any device. Returns the output and the (detached) batch mean and biased variance.
    fn train_composed(&self, x3: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, c, hw) = x3.dims3()?;
        let m = (n * hw) as f64;
        let mean = (x3.sum_keepdim(2)?.sum_keepdim(0)? / m)?;
        let xc = x3.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(2)?.sum_keepdim(0)? / m)?;
        let inv_std = (&var + self.eps)?.sqrt()?.recip()?;
        let scale = inv_std.broadcast_mul(&self.weight.reshape((1, c, 1))?)?;
        let y = xc.broadcast_mul(&scale)?.broadcast_add(&self.bias.reshape((1, c, 1))?)?;
        Ok((y, mean.detach().flatten_all()?, var.detach().flatten_all()?))
    }

    /// Training batch norm of `x [n, c, h, w]`, then ReLU6 when `relu6`.
    fn forward_train(&self, x: &Tensor, relu6: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let m = (n * h * w) as f64;
        if m < 2.0 {
            bail!("batch-norm: training needs more than one value per channel, got {n}×{}", h * w);
        }
        let (y, mean, var) = if cpu_kernels(x) {
            // The fused op takes the 4-D tensor as is (and the ReLU6 with it): no reshape or
            // activation nodes whose gradients autograd would have to materialise and add up.
            let (y, st) = batchnorm::batch_norm_train_cpu(x, &self.weight, &self.bias, self.eps, relu6)?;
            let dev = x.device();
            (y, Tensor::new(st.mean, dev)?, Tensor::new(st.var, dev)?)
        } else if cuda_kernels(x, Kernels::BatchNorm) {
            #[cfg(feature = "cuda")]
            {
                let (y, stats) =
                    batchnorm::batch_norm_train_cuda(x, &self.weight, &self.bias, self.eps, relu6)?;
                (y, stats.get(0)?, stats.get(1)?)
            }
            #[cfg(not(feature = "cuda"))]
            unreachable!("cuda_kernels is false without the cuda feature")
        } else {
            // Reductions over the last dim are candle's fast path: work on [n, c, h·w].
            let (y, mean, var) = self.train_composed(&x.reshape((n, c, h * w))?)?;
            let y = y.reshape((n, c, h, w))?;
            (if relu6 { self::relu6(&y)? } else { y }, mean, var)
        };
        self.update_running(&mean, &var, m)?;
        Ok(y)
    }

    /// Moves the running statistics towards a training batch's `mean` and biased `var` over `m`
    /// values per channel.
    fn update_running(&self, mean: &Tensor, var: &Tensor, m: f64) -> Result<()> {
        let dtype = self.running_mean.dtype();
        let mom = self.momentum;
        let rm = ((self.running_mean.as_detached_tensor() * (1.0 - mom))? + (mean.to_dtype(dtype)? * mom)?)?;
        let rv = ((self.running_var.as_detached_tensor() * (1.0 - mom))?
            + (var.to_dtype(dtype)? * (mom * m / (m - 1.0)))?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)
    }

    /// `relu6(self.forward_t(x, train))`, fused into one op when training on the CPU.
    pub fn forward_relu6_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dim(1)?;
        if train && self.weight.dims() == [c] {
            return self.forward_train(x, true);
        }
        relu6(&self.forward_t(x, train)?)
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if self.weight.dims() != [c] {
            bail!("batch-norm: input has {c} channels, layer expects {}", self.weight.dim(0)?);
        }
        if train {
            return self.forward_train(x, false);
        }
        let x3 = x.reshape((n, c, h * w))?;
        let shift = self.running_mean.as_detached_tensor().reshape((1, c, 1))?;
        let inv_std =
            (self.running_var.as_detached_tensor().reshape((1, c, 1))? + self.eps)?.sqrt()?.recip()?;
        // Eval folds into one affine map per channel: y = x·a + b.
        let a = inv_std.broadcast_mul(&self.weight.reshape((1, c, 1))?)?;
        let b = (self.bias.reshape((1, c, 1))? - shift.mul(&a)?)?;
        x3.broadcast_mul(&a)?.broadcast_add(&b)?.reshape((n, c, h, w))
    }
}

/// The convolution of a [`ConvBn`] stage.
#[derive(Clone, Copy, Debug)]
pub enum StageConv<'a> {
    Pointwise(&'a Pointwise),
    Depthwise(&'a DepthwiseConv3x3),
}

impl StageConv<'_> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            StageConv::Pointwise(c) => c.forward(x),
            StageConv::Depthwise(c) => c.forward(x),
        }
    }
}

/// One stage of [`conv_bn_chain_t`]: a convolution, the batch norm after it, and a ReLU6 after
/// that when `relu6`.
#[derive(Clone, Copy, Debug)]
pub struct ConvBn<'a> {
    pub conv: StageConv<'a>,
    pub bn: &'a BatchNorm2d,
    pub relu6: bool,
}

/// `relu6?(bn(conv(·)))` for each stage in turn, plus `x` when `residual` (an identity
/// shortcut). Training on the CPU runs the chain as one op ([`chain`]) with the same outputs,
/// gradients and running statistics as the stages one by one, and no gradient tensor between
/// them; other devices, eval mode and chains that op does not fit run stage by stage.
pub fn conv_bn_chain_t(x: &Tensor, stages: &[ConvBn<'_>], residual: bool, train: bool) -> Result<Tensor> {
    if train
        && cpu_kernels(x)
        && let Some(y) = conv_bn_chain_train_cpu(x, stages, residual)?
    {
        return Ok(y);
    }
    conv_bn_chain_stepwise(x, stages, residual, train)
}

/// [`conv_bn_chain_t`] one layer at a time.
fn conv_bn_chain_stepwise(x: &Tensor, stages: &[ConvBn<'_>], residual: bool, train: bool) -> Result<Tensor> {
    let mut h = x.clone();
    for st in stages {
        let y = st.conv.forward(&h)?;
        h = if st.relu6 { st.bn.forward_relu6_t(&y, train)? } else { st.bn.forward_t(&y, train)? };
    }
    if residual { h + x } else { Ok(h) }
}

/// [`conv_bn_chain_t`] in training as one CPU op, or `None` where [`chain::train_cpu`] does not
/// apply.
fn conv_bn_chain_train_cpu(x: &Tensor, stages: &[ConvBn<'_>], residual: bool) -> Result<Option<Tensor>> {
    let (n, _, h, w) = x.dims4()?;
    let mut spec = Vec::with_capacity(stages.len());
    let mut weights = Vec::with_capacity(stages.len());
    let mut params = Vec::with_capacity(2 * stages.len());
    let mut macs = Vec::with_capacity(stages.len());
    let (mut ho, mut wo) = (h, w);
    for st in stages {
        let (conv, weight) = match st.conv {
            StageConv::Pointwise(c) => (chain::ChainConv::Pointwise, &c.weight),
            StageConv::Depthwise(c) => (chain::ChainConv::Depthwise { stride: c.stride }, &c.weight),
        };
        let (c_out, c_in, k, _) = weight.dims4()?;
        if [&st.bn.weight, &st.bn.bias].iter().any(|t| t.dims() != [c_out]) {
            return Ok(None);
        }
        if let chain::ChainConv::Depthwise { stride } = conv {
            if !matches!(stride, 1 | 2) {
                return Ok(None);
            }
            (ho, wo) = (depthwise::out_side(ho, stride), depthwise::out_side(wo, stride));
        }
        // A depthwise weight is [c, 1, 3, 3]: one input channel per output.
        macs.push(cost::conv2d_macs(&[n, c_out, ho, wo], c_in, k, k));
        spec.push(chain::Stage { conv, weight: weight.shape().clone(), eps: st.bn.eps, relu6: st.relu6 });
        weights.push(weight.clone());
        params.extend([st.bn.weight.clone(), st.bn.bias.clone()]);
    }
    // Nothing to fuse, or parameters the concatenations below could not join.
    if stages.is_empty() || weights.iter().chain(&params).any(|t| t.dtype() != x.dtype()) {
        return Ok(None);
    }
    let weights = match weights.as_slice() {
        [w] => w.clone(),
        ws => Tensor::cat(&ws.iter().map(Tensor::flatten_all).collect::<Result<Vec<_>>>()?, 0)?,
    };
    let Some((y, stats)) = chain::train_cpu(x, spec, residual, &weights, &Tensor::cat(&params, 0)?)? else {
        return Ok(None);
    };
    for m in macs {
        cost::record(m);
    }
    let dev = x.device();
    for (st, s) in stages.iter().zip(stats) {
        let m = s.count as f64;
        st.bn.update_running(&Tensor::new(s.mean, dev)?, &Tensor::new(s.var, dev)?, m)?;
    }
    Ok(Some(y))
}

/// A fully connected layer `y = x Wᵀ + b`, `weight [out, in]`, `bias [out]`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Initialised N(0, 0.01²) with zero bias (torchvision's classifier initialisation).
    pub fn new(d_in: usize, d_out: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get_with_hints((d_out, d_in), "weight", Init::Randn { mean: 0.0, stdev: 0.01 })?;
        let bias = vb.get_with_hints(d_out, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, d_in) = x.dims2()?;
        let (d_out, w_in) = self.weight.dims2()?;
        if d_in != w_in {
            bail!("linear: input has {d_in} features, layer expects {w_in}");
        }
        cost::record(cost::linear_macs(rows, d_in, d_out));
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Inverted dropout with drop probability `p`, active only in training.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    p: f32,
}

impl Dropout {
    pub fn new(p: f32) -> Self {
        Self { p }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && self.p > 0.0 { candle_nn::ops::dropout(x, self.p) } else { Ok(x.clone()) }
    }
}

/// Mean over height and width: `[n, c, h, w] → [n, c]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(2)?.mean(2)
}

/// Exact 2×2, stride-2 max pooling; height and width must be even.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        bail!("max-pool-2x2: height and width must be even, got {h}×{w}");
    }
    x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
}

/// 3×3, stride-2, padding-1 max pooling (ResNet's stem pool) for inputs that are ≥ 0.
///
/// Zero padding stands in for −∞ padding, which is exact for non-negative inputs (it follows a
/// ReLU). Built from reshapes and maxima so its backward is candle's exact one; the pool is
/// separable, so it runs along width then height. Output side: `(n − 1) / 2 + 1`.
pub fn max_pool3x3_s2_nonneg(x: &Tensor) -> Result<Tensor> {
    let x = pool3s2_along(x, 3)?;
    pool3s2_along(&x, 2)
}

/// One 1-D 3-wide stride-2 max pool along `dim` (2 or 3) of a 4-D tensor.
fn pool3s2_along(x: &Tensor, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let o = (n - 1) / 2 + 1;
    // Padded length 2o + 2: one zero before, the rest after. Output o covers padded 2o..=2o+2,
    // i.e. pair o (2o, 2o+1) and the first element of pair o + 1.
    let padded = x.pad_with_zeros(dim, 1, 2 * o + 1 - n)?;
    let mut shape = padded.dims().to_vec();
    shape[dim] = o + 1;
    shape.insert(dim + 1, 2);
    let pairs = padded.reshape(shape)?;
    let pair_max = pairs.max(dim + 1)?.narrow(dim, 0, o)?;
    let next_first = pairs.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?.narrow(dim, 1, o)?;
    pair_max.maximum(&next_first)
}

/// Elementwise `min(max(x, 0), 6)`, fused forward and backward.
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    if !cpu_kernels(x) {
        return x.clamp(0f32, 6f32);
    }
    x.contiguous()?.apply_op1(Relu6)
}

const PAR_CHUNK: usize = 1 << 15;

struct Relu6;

/// `(res, grad) → grad · [0 < res < 6]`: the gradient of [`relu6`] given its output.
struct Relu6Bwd;

/// A vector of `n` values written by `fill` into its fresh buffer, without zeroing it first.
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn written<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote all `n` elements (the caller's contract).
    unsafe { v.set_len(n) };
    v
}

/// `min(max(v, 0), 6)`, 0 for NaN: ReLU6 of one value.
#[inline(always)]
pub(crate) fn clamp6<T: WithDType>(v: T) -> T {
    let six = T::from_f64(6.0);
    if v > six {
        six
    } else if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

/// Whether the gradient passes back through a ReLU6 whose output is `y` (`0 < y < 6`).
#[inline(always)]
pub(crate) fn relu6_passes<T: WithDType>(y: T) -> bool {
    y > T::zero() && y < T::from_f64(6.0)
}

fn relu6_map<T: WithDType>(x: &[T]) -> Vec<T> {
    // SAFETY: the chunks cover the buffer and every element of each is written.
    unsafe {
        written(x.len(), |out| {
            out.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).for_each(|(yc, xc)| {
                simd::vectorized(
                    #[inline(always)]
                    || yc.iter_mut().zip(xc).for_each(|(yv, &xv)| _ = yv.write(clamp6(xv))),
                )
            })
        })
    }
}

fn relu6_bwd_map<T: WithDType>(res: &[T], g: &[T]) -> Vec<T> {
    let chunks = res.par_chunks(PAR_CHUNK).zip(g.par_chunks(PAR_CHUNK));
    // SAFETY: the chunks cover the buffer and every element of each is written.
    unsafe {
        written(g.len(), |out| {
            out.par_chunks_mut(PAR_CHUNK).zip(chunks).for_each(|(oc, (rc, gc))| {
                simd::vectorized(
                    #[inline(always)]
                    || {
                        for ((o, &r), &gv) in oc.iter_mut().zip(rc).zip(gc) {
                            o.write(if relu6_passes(r) { gv } else { T::zero() });
                        }
                    },
                )
            })
        })
    }
}

fn slice_of<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

impl CustomOp1 for Relu6 {
    fn name(&self) -> &'static str {
        "relu6"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(relu6_map(slice_of::<f32>(s, l, self.name())?)),
            DType::F64 => CpuStorage::F64(relu6_map(slice_of::<f64>(s, l, self.name())?)),
            d => bail!("relu6: unsupported dtype {d:?} (f32 or f64)"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &Relu6Bwd)?))
    }
}

impl CustomOp2 for Relu6Bwd {
    fn name(&self) -> &'static str {
        "relu6-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!("relu6-grad: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(relu6_bwd_map(
                slice_of::<f32>(s1, l1, self.name())?,
                slice_of::<f32>(s2, l2, self.name())?,
            )),
            DType::F64 => CpuStorage::F64(relu6_bwd_map(
                slice_of::<f64>(s1, l1, self.name())?,
                slice_of::<f64>(s2, l2, self.name())?,
            )),
            d => bail!("relu6-grad: unsupported dtype {d:?} (f32 or f64)"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::gradcheck::{check_grads, pseudo_random, rand_var};
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn vb64(vm: &VarMap) -> VarBuilder<'static> {
        VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu)
    }

    #[test]
    fn on_pool_runs_on_a_worker_and_keeps_counting_and_portable_layers() {
        let ((on_worker, portable), macs) = cost::count(|| {
            with_portable_layers(|| {
                on_pool(|| {
                    cost::record(7);
                    (rayon::current_thread_index().is_some(), PORTABLE.with(|p| p.get()))
                })
            })
        });
        assert!(on_worker, "ran off the pool");
        assert!(portable, "lost the portable-layers setting");
        assert_eq!(macs, 7, "lost the MACs recorded on the worker");
        assert!(!on_pool(|| PORTABLE.with(|p| p.get())), "portable outside with_portable_layers");
    }

    #[test]
    fn on_pool_keeps_the_counts_of_concurrent_callers_apart() {
        // Workers waiting inside one caller's loops run other callers' work meanwhile.
        std::thread::scope(|s| {
            for k in 1..=4u64 {
                s.spawn(move || {
                    for _ in 0..50 {
                        let ((), macs) = cost::count(|| {
                            on_pool(|| {
                                cost::record(k);
                                (0..256).into_par_iter().for_each(|i| {
                                    std::hint::black_box(i);
                                });
                                cost::record(k);
                            })
                        });
                        assert_eq!(macs, 2 * k);
                    }
                });
            }
        });
    }

    #[test]
    fn for_each_task_runs_every_task_once_on_any_pool() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for tasks in [0, 1, 2, 3, 5, 64, 1001] {
                let runs: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.install(|| {
                    for_each_task(tasks, |t| {
                        // Uneven tasks, so the threads take different numbers of them.
                        std::hint::black_box((0..(t % 7) * 1000).sum::<usize>());
                        runs[t].fetch_add(1, Ordering::Relaxed);
                    })
                });
                let counts: Vec<usize> = runs.iter().map(|r| r.load(Ordering::Relaxed)).collect();
                assert!(counts.iter().all(|&c| c == 1), "{threads} threads, {tasks} tasks: {counts:?}");
            }
        }
        // Called from outside the pool, a task's panic reaches the caller.
        let err = std::panic::catch_unwind(|| {
            for_each_task(16, |t| {
                if t == 5 {
                    panic!("task {t} failed");
                }
            })
        })
        .expect_err("the panic was lost");
        let msg = err.downcast_ref::<String>().map(String::as_str).unwrap_or_default();
        assert_eq!(msg, "task 5 failed");
    }

    #[test]
    fn pointwise_matches_conv_and_gradchecks() -> Result<()> {
        let x = rand_var((2, 3, 3, 4), 3)?;
        let k = rand_var((5, 3, 1, 1), 4)?;
        let ours = pointwise_conv(&x, &k)?;
        let theirs = x.conv2d(&k, 0, 1, 1, 1)?;
        let d = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "max diff {d}");
        check_grads(&[&x, &k], 1e-6, 1e-6, |v| pointwise_conv(&v[0], &v[1]))
    }

    #[test]
    fn pointwise_kernels_match_the_matmul_form_on_tiled_shapes() -> Result<()> {
        // Shapes that split columns into tiles (one image), and output channels into blocks.
        for (n, c_in, c_out, h, w) in [(1, 24, 40, 19, 23), (5, 7, 33, 6, 5), (2, 16, 8, 1, 1)] {
            let x = Var::from_tensor(&rand_var((n, c_in, h, w), 7)?.to_dtype(DType::F32)?)?;
            let k = Var::from_tensor(&rand_var((c_out, c_in, 1, 1), 8)?.to_dtype(DType::F32)?)?;
            let r = Tensor::from_vec(pseudo_random(n * c_out * h * w, 9), (n, c_out, h, w), &Device::Cpu)?
                .to_dtype(DType::F32)?;
            let run = || -> Result<(Tensor, Tensor, Tensor)> {
                let y = pointwise_conv(&x, &k)?;
                let g = (&y * &r)?.sum_all()?.backward()?;
                Ok((y, g.get(&x).expect("x grad").clone(), g.get(&k).expect("k grad").clone()))
            };
            let ours = run()?;
            let theirs = with_portable_layers(run)?;
            for (name, a, b) in
                [("y", &ours.0, &theirs.0), ("dx", &ours.1, &theirs.1), ("dk", &ours.2, &theirs.2)]
            {
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
                assert!(d < 1e-5, "{n}×{c_in}→{c_out} at {h}×{w}: {name} differs by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn conv2d_gradchecks_and_records_macs() -> Result<()> {
        let vm = VarMap::new();
        let conv = Conv2d::new(2, 3, 3, 2, 1, true, vb64(&vm).pp("c"))?;
        let x = rand_var((2, 2, 5, 5), 5)?;
        let (y, macs) = crate::cost::count(|| conv.forward(&x));
        assert_eq!(y?.dims(), [2, 3, 3, 3]);
        assert_eq!(macs, 2 * 3 * 9 * 2 * 9);
        let mut vars: Vec<Var> = vm.all_vars();
        vars.push(x);
        let refs: Vec<&Var> = vars.iter().collect();
        let n = refs.len();
        check_grads(&refs, 1e-6, 1e-6, |v| {
            // The layer reads its own weight vars; the input is the last argument.
            conv.forward(&v[n - 1])
        })
    }

    #[test]
    fn conv2d_stride_2_mixed_parity_gradchecks_on_cpu() -> Result<()> {
        // candle's own conv backward fails here; the unfolded CPU path does not.
        let vm = VarMap::new();
        let conv = Conv2d::new(2, 3, 3, 2, 1, true, vb64(&vm))?;
        let x = rand_var((1, 2, 6, 5), 4)?;
        let y = conv.forward(x.as_tensor())?;
        assert_eq!(y.dims(), [1, 3, 3, 3]);
        check_grads(&[&x], 1e-6, 1e-6, |v| conv.forward(&v[0]))
    }

    #[test]
    fn batchnorm_train_gradchecks() -> Result<()> {
        let vm = VarMap::new();
        let bn = BatchNorm2d::new(3, vb64(&vm))?;
        // Non-trivial affine parameters so their gradients are exercised.
        for (name, seed) in [("weight", 7), ("bias", 8)] {
            let v = vm.data().lock().unwrap()[name].clone();
            v.set(&Tensor::from_vec(pseudo_random(3, seed), 3, &Device::Cpu)?)?;
        }
        let x = rand_var((2, 3, 2, 3), 6)?;
        let mut vars: Vec<Var> =
            ["weight", "bias"].iter().map(|k| vm.data().lock().unwrap()[*k].clone()).collect();
        vars.push(x);
        let refs: Vec<&Var> = vars.iter().collect();
        check_grads(&refs, 1e-6, 1e-6, |v| bn.forward_t(&v[2], true))
    }

    #[test]
    fn batchnorm_composed_path_gradchecks() -> Result<()> {
        let vm = VarMap::new();
        let bn = BatchNorm2d::new(3, vb64(&vm))?;
        let v = vm.data().lock().unwrap()["weight"].clone();
        v.set(&Tensor::from_vec(pseudo_random(3, 13), 3, &Device::Cpu)?)?;
        let x = rand_var((2, 3, 5), 14)?;
        let fused = bn.forward_train(&x.reshape((2, 3, 5, 1))?, false)?.reshape((2, 3, 5))?;
        let composed = bn.train_composed(&x)?.0;
        let d = (fused - composed)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "fused and composed batch norm differ by {d}");
        check_grads(&[&x, &v], 1e-6, 1e-6, |a| Ok(bn.train_composed(&a[0])?.0))
    }

    #[test]
    fn batchnorm_relu6_fused_gradchecks_and_matches_the_composition() -> Result<()> {
        let vm = VarMap::new();
        let bn = BatchNorm2d::new(3, vb64(&vm))?;
        // γ and β wide enough that outputs fall below 0 and above 6, where the ReLU6 cuts.
        for (name, vals) in [("weight", [4.0, -5.0, 3.0]), ("bias", [2.0, 3.0, 1.0])] {
            let v = vm.data().lock().unwrap()[name].clone();
            v.set(&Tensor::new(&vals, &Device::Cpu)?)?;
        }
        let x = rand_var((3, 3, 2, 3), 21)?;
        let fused = bn.forward_relu6_t(&x, true)?;
        let composed = with_portable_layers(|| relu6(&bn.forward_t(&x, true)?))?;
        let d = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "fused and composed batch norm + ReLU6 differ by {d}");
        let cut = fused.flatten_all()?.to_vec1::<f64>()?;
        assert!(cut.contains(&0.0) && cut.contains(&6.0), "{cut:?}");
        let mut vars: Vec<Var> =
            ["weight", "bias"].iter().map(|k| vm.data().lock().unwrap()[*k].clone()).collect();
        vars.push(x);
        let refs: Vec<&Var> = vars.iter().collect();
        check_grads(&refs, 1e-6, 1e-6, |v| bn.forward_relu6_t(&v[2], true))
    }

    #[test]
    fn batchnorm_eval_gradchecks_and_modes_differ() -> Result<()> {
        let vm = VarMap::new();
        let bn = BatchNorm2d::new(2, vb64(&vm))?;
        let x = rand_var((4, 2, 3, 3), 9)?.as_tensor().affine(3.0, 1.0)?;
        let train = bn.forward_t(&x, true)?;
        // Train output is standardised per channel.
        let m = train.transpose(0, 1)?.flatten_from(1)?.mean(1)?.to_vec1::<f64>()?;
        assert!(m.iter().all(|v| v.abs() < 1e-12), "{m:?}");
        // Running stats moved 10% of the way to the batch statistics.
        let rm = bn.running_mean().to_vec1::<f64>()?;
        let bm = x.transpose(0, 1)?.flatten_from(1)?.mean(1)?.to_vec1::<f64>()?;
        for (r, b) in rm.iter().zip(&bm) {
            assert!((r - 0.1 * b).abs() < 1e-12, "{r} vs 0.1·{b}");
        }
        let eval = bn.forward_t(&x, false)?;
        let d = (&train - &eval)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d > 0.1, "train and eval outputs should differ, max diff {d}");
        let xv = Var::from_tensor(&x)?;
        let w = vm.data().lock().unwrap()["weight"].clone();
        check_grads(&[&xv, &w], 1e-6, 1e-6, |v| bn.forward_t(&v[0], false))
    }

    #[test]
    fn linear_gradchecks() -> Result<()> {
        let vm = VarMap::new();
        let lin = Linear::new(4, 3, vb64(&vm))?;
        let x = rand_var((2, 4), 10)?;
        let (y, macs) = crate::cost::count(|| lin.forward(&x));
        assert_eq!(y?.dims(), [2, 3]);
        assert_eq!(macs, 24);
        let mut vars = vm.all_vars();
        vars.push(x);
        let refs: Vec<&Var> = vars.iter().collect();
        check_grads(&refs, 1e-6, 1e-6, |v| lin.forward(&v[2]))
    }

    #[test]
    fn relu6_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[-1.0f64, 0.5, 3.0, 5.9, 6.5, 100.0], &dev)?;
        assert_eq!(relu6(&x)?.to_vec1::<f64>()?, [0.0, 0.5, 3.0, 5.9, 6.0, 6.0]);
        // Spread values over both kinks, keeping away from them by more than the FD step.
        let v: Vec<f64> = pseudo_random(40, 11).iter().map(|r| r * 8.0 - 1.0).collect();
        let x = Var::from_tensor(&Tensor::new(v, &dev)?)?;
        check_grads(&[&x], 1e-6, 1e-6, |v| relu6(&v[0]))
    }

    #[test]
    fn pools_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f64, 16.0, &dev)?.reshape((1, 1, 4, 4))?;
        assert_eq!(max_pool2x2(&x)?.flatten_all()?.to_vec1::<f64>()?, [5.0, 7.0, 13.0, 15.0]);
        assert_eq!(global_avg_pool(&x)?.to_vec2::<f64>()?, [[7.5]]);
        assert!(max_pool2x2(&Tensor::zeros((1, 1, 3, 4), DType::F64, &dev)?).is_err());
        let x = rand_var((2, 2, 4, 6), 12)?;
        check_grads(&[&x], 1e-6, 1e-6, |v| max_pool2x2(&v[0]))?;
        check_grads(&[&x], 1e-6, 1e-6, |v| global_avg_pool(&v[0]))
    }

    #[test]
    fn max_pool3x3_matches_candle_and_gradchecks() -> Result<()> {
        for side in [4, 5, 7, 8] {
            let x = rand_var((2, 2, side, side), side as u64)?.as_tensor().abs()?;
            let ours = max_pool3x3_s2_nonneg(&x)?;
            // Reference: candle's forward on a zero-padded input (its forward is correct).
            let theirs = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.max_pool2d_with_stride(3, 2)?;
            assert_eq!(ours.dims(), theirs.dims(), "side {side}");
            let d = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d == 0.0, "side {side}: max diff {d}");
            let xv = Var::from_tensor(&x)?;
            check_grads(&[&xv], 1e-6, 1e-6, |v| max_pool3x3_s2_nonneg(&v[0]))?;
        }
        Ok(())
    }

    #[test]
    fn dropout_only_in_training() -> Result<()> {
        let x = Tensor::ones((64, 64), DType::F32, &Device::Cpu)?;
        let d = Dropout::new(0.5);
        assert_eq!(d.forward_t(&x, false)?.sum_all()?.to_scalar::<f32>()?, 4096.0);
        let y = d.forward_t(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
        let zeros = y.iter().filter(|v| **v == 0.0).count();
        assert!((1500..2600).contains(&zeros), "{zeros} of 4096 dropped");
        assert!(y.iter().all(|v| *v == 0.0 || *v == 2.0));
        Ok(())
    }
}
