//! 1×1 convolution as a hand-written candle op whose forward and both gradients are single
//! gemm calls per tile (f32 and f64 on CPU).
//!
//! Written as candle ops, `W · x[n]` over the `[n, c_in, h·w]` view is a batched matmul against
//! the weight broadcast over the batch. Its backward then materialises the weight's gradient per
//! image (`[n, c_out, c_in]`) before summing it over the batch, and copies the broadcast,
//! transposed weight into a contiguous `[n, c_in, c_out]` tensor for the input's gradient. Here:
//!
//! - forward: `y[b] = W · x[b]`, tiles of output columns in parallel;
//! - input gradient: `gx[b] = Wᵀ · gy[b]`, the transpose read through strides;
//! - weight gradient: `gW = Σ_b gy[b] · x[b]ᵀ`, each task owning a block of output channels and
//!   accumulating over the batch in place, so no per-image copy and no reduction.

use candle_core::{
    CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, backend::BackendStorage, bail,
};
use rayon::prelude::*;

/// Forward: `(x [n,c_in,h,w], w [c_out,c_in,1,1]) → y [n,c_out,h,w]`.
pub(super) struct PwFwd;

/// Input gradient: `(grad_y [n,c_out,h,w], w [c_out,c_in,1,1]) → grad_x [n,c_in,h,w]`.
struct PwBwdInput;

/// Weight gradient: `(x [n,c_in,h,w], grad_y [n,c_out,h,w]) → grad_w [c_out,c_in,1,1]`.
struct PwBwdWeight;

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

fn dims4(l: &Layout, op: &str, what: &str) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        [a, b, c, d] => Ok((*a, *b, *c, *d)),
        d => bail!("{op}: {what} must be 4-D, got {d:?}"),
    }
}

/// `[c_out, c_in]` of a `[c_out, c_in, 1, 1]` weight.
fn weight_dims(l: &Layout, op: &str) -> Result<(usize, usize)> {
    match l.dims() {
        [o, i, 1, 1] => Ok((*o, *i)),
        d => bail!("{op}: weight must be [c_out, c_in, 1, 1], got {d:?}"),
    }
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: tasks write disjoint parts of the buffer behind the pointer (see each use).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// One operand of a gemm: a base pointer with row and column strides.
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
}

/// `dst (m×n, row stride dst_rs) [+]= lhs (m×k) · rhs (k×n)`.
///
/// # Safety
/// Every operand must be valid for its extent and `dst` must not overlap the others.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    par: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// Columns per task for `n` images of `hw` columns: whole images when there are enough of them,
/// else equal tiles so every thread has work.
fn column_tiles(n: usize, hw: usize, threads: usize) -> usize {
    if n >= 2 * threads {
        return hw.max(1);
    }
    let per_img = (2 * threads).div_ceil(n.max(1));
    hw.div_ceil(per_img).max(64).min(hw.max(1))
}

/// `out[b] = lhs · src[b]` for each image `b`: `lhs` is `m×k`, `src[b]` is `k×hw` (contiguous
/// rows), `out[b]` is `m×hw`. Parallel over images and column tiles.
fn per_image_product<T: WithDType>(
    lhs: Mat<T>,
    src: &[T],
    (n, m, k, hw): (usize, usize, usize, usize),
) -> Vec<T> {
    let threads = rayon::current_num_threads();
    let cols = column_tiles(n, hw, threads);
    let per_img = hw.div_ceil(cols).max(1);
    let tasks = n * per_img;
    let inner = if tasks >= threads { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(threads) };
    let (lhs_ptr, lhs_rs, lhs_cs) = (SendPtr(lhs.ptr.cast_mut()), lhs.rs, lhs.cs);
    let fill = |out: &mut [std::mem::MaybeUninit<T>]| {
        let dst = SendPtr(out.as_mut_ptr().cast::<T>());
        let run = |t: usize| {
            let (b, j0) = (t / per_img, (t % per_img) * cols);
            let nc = cols.min(hw - j0);
            let lhs = Mat { ptr: lhs_ptr.get().cast_const(), rs: lhs_rs, cs: lhs_cs };
            // SAFETY: image `b` of `src` is `k×hw` and of `out` `m×hw`; this task owns columns
            // j0..j0+nc of image `b` of `out`.
            unsafe {
                let rhs = Mat { ptr: src.as_ptr().add(b * k * hw + j0), rs: hw, cs: 1 };
                gemm((m, nc, k), dst.get().add(b * m * hw + j0), hw, false, lhs, rhs, inner);
            }
        };
        if tasks >= threads {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    };
    // SAFETY: the tasks cover every column of every image, and each gemm writes (never reads)
    // its m×nc block.
    unsafe { super::written(n * m * hw, fill) }
}

impl PwFwd {
    fn run<T: WithDType>(x: &[T], xl: &Layout, w: &[T], wl: &Layout) -> Result<(Vec<T>, Shape)> {
        let op = "pointwise-conv";
        let (n, c_in, h, wd) = dims4(xl, op, "input")?;
        let (c_out, wc_in) = weight_dims(wl, op)?;
        if wc_in != c_in {
            bail!("{op}: weight {:?} does not fit an input with {c_in} channels", wl.dims());
        }
        let lhs = Mat { ptr: w.as_ptr(), rs: c_in, cs: 1 };
        Ok((per_image_product(lhs, x, (n, c_out, c_in, h * wd)), Shape::from((n, c_out, h, wd))))
    }
}

impl PwBwdInput {
    fn run<T: WithDType>(g: &[T], gl: &Layout, w: &[T], wl: &Layout) -> Result<(Vec<T>, Shape)> {
        let op = "pointwise-conv-grad-input";
        let (n, c_out, h, wd) = dims4(gl, op, "grad")?;
        let (wc_out, c_in) = weight_dims(wl, op)?;
        if wc_out != c_out {
            bail!("{op}: weight {:?} does not fit a gradient with {c_out} channels", wl.dims());
        }
        // Wᵀ: row ci, column co at co·c_in + ci.
        let lhs = Mat { ptr: w.as_ptr(), rs: 1, cs: c_in };
        Ok((per_image_product(lhs, g, (n, c_in, c_out, h * wd)), Shape::from((n, c_in, h, wd))))
    }
}

impl PwBwdWeight {
    fn run<T: WithDType>(x: &[T], xl: &Layout, g: &[T], gl: &Layout) -> Result<(Vec<T>, Shape)> {
        let op = "pointwise-conv-grad-weight";
        let (n, c_in, h, wd) = dims4(xl, op, "input")?;
        let (gn, c_out, gh, gw) = dims4(gl, op, "grad")?;
        if (gn, gh, gw) != (n, h, wd) {
            bail!("{op}: grad {:?} does not match the input {:?}", gl.dims(), xl.dims());
        }
        let hw = h * wd;
        let mut gk = vec![T::zero(); c_out * c_in];
        let threads = rayon::current_num_threads();
        // Blocks of output channels (rows of gW), each accumulating over the whole batch.
        let rows = c_out.div_ceil(2 * threads).max(8).min(c_out.max(1));
        let blocks = c_out.div_ceil(rows);
        let inner =
            if blocks >= threads { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(threads) };
        let run = |(blk, dst): (usize, &mut [T])| {
            let r = dst.len() / c_in.max(1);
            for b in 0..n {
                // SAFETY: gy[b] rows blk·rows.. (r of them, hw long); x[b]ᵀ read through strides
                // (row j, column ci at ci·hw + j); `dst` is this block's r×c_in rows.
                unsafe {
                    let lhs = Mat { ptr: g.as_ptr().add((b * c_out + blk * rows) * hw), rs: hw, cs: 1 };
                    let rhs = Mat { ptr: x.as_ptr().add(b * c_in * hw), rs: 1, cs: hw };
                    gemm((r, c_in, hw), dst.as_mut_ptr(), c_in, b > 0, lhs, rhs, inner);
                }
            }
        };
        if blocks >= threads {
            gk.par_chunks_mut(rows * c_in).enumerate().for_each(run);
        } else {
            gk.chunks_mut(rows * c_in).enumerate().for_each(run);
        }
        Ok((gk, Shape::from((c_out, c_in, 1, 1))))
    }
}

/// Runs `$run::<T>` on the two inputs' f32 or f64 slices.
macro_rules! dispatch {
    ($name:expr, $run:path, $s1:expr, $l1:expr, $what1:expr, $s2:expr, $l2:expr, $what2:expr) => {
        match $s1.dtype() {
            DType::F32 => {
                let (v, s) = $run(
                    slice::<f32>($s1, $l1, $name, $what1)?,
                    $l1,
                    slice::<f32>($s2, $l2, $name, $what2)?,
                    $l2,
                )?;
                Ok((CpuStorage::F32(v), s))
            }
            DType::F64 => {
                let (v, s) = $run(
                    slice::<f64>($s1, $l1, $name, $what1)?,
                    $l1,
                    slice::<f64>($s2, $l2, $name, $what2)?,
                    $l2,
                )?;
                Ok((CpuStorage::F64(v), s))
            }
            d => bail!("{}: unsupported dtype {d:?} (f32 or f64)", $name),
        }
    };
}

impl CustomOp2 for PwFwd {
    fn name(&self) -> &'static str {
        "pointwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), PwFwd::run, s1, l1, "input", s2, l2, "weight")
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = grad.apply_op2_no_bwd(w, &PwBwdInput)?;
        let gw = x.apply_op2_no_bwd(&grad, &PwBwdWeight)?;
        Ok((Some(gx), Some(gw)))
    }
}

impl CustomOp2 for PwBwdInput {
    fn name(&self) -> &'static str {
        "pointwise-conv-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), PwBwdInput::run, s1, l1, "grad", s2, l2, "weight")
    }
}

impl CustomOp2 for PwBwdWeight {
    fn name(&self) -> &'static str {
        "pointwise-conv-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), PwBwdWeight::run, s1, l1, "input", s2, l2, "grad")
    }
}
