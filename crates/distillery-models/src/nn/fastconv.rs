//! Inference convolution on the CPU: one fused pass per output tile instead of a chain of candle
//! ops.
//!
//! `y = W · unfold(act(x))` is computed tile by tile: each task unfolds the input columns of a
//! tile of output positions into a thread-local buffer (applying an optional per-channel
//! `relu(x·scale + shift)` on the way, the pre-activation of EmoNet's blocks, so the activated
//! tensor is never stored), multiplies it by the weights with one single-threaded `gemm` call
//! writing straight into the output, then adds the bias and applies an optional ReLU in place.
//! Tiles are sized so the unfolded buffer stays in cache, and enough of them exist to keep every
//! thread busy; `accumulate` adds into the output instead of overwriting it, which turns a
//! residual connection into a free epilogue. A 1×1 convolution without pre-activation reads the
//! input directly, with no copy.
//!
//! Inputs and outputs are channel ranges of NCHW buffers: image `i`, channel `c` of a view starts
//! at `i·img_stride + c·h·w`, so a block can read and write slices of one concatenation buffer.
//!
//! No backward: training uses [`super::im2col::conv2d_unfolded`]. Groups and dilation are 1.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor, bail};
use rayon::prelude::*;

/// Shape of a convolution: channels, kernel, stride and zero padding per axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub c_in: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub pad_h: usize,
    pub pad_w: usize,
}

impl ConvGeom {
    /// A square kernel with the same stride and padding on both axes.
    pub fn square(c_in: usize, c_out: usize, k: usize, stride: usize, pad: usize) -> Self {
        Self { c_in, c_out, kh: k, kw: k, stride_h: stride, stride_w: stride, pad_h: pad, pad_w: pad }
    }

    /// Rows of the unfolded input, `c_in·kh·kw`: the inner dimension of the product.
    pub fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Output height and width for an `h×w` input.
    pub fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        if self.stride_h == 0 || self.stride_w == 0 || self.kh == 0 || self.kw == 0 {
            bail!("conv: kernel {}×{} and strides must be positive", self.kh, self.kw);
        }
        let (ph, pw) = (h + 2 * self.pad_h, w + 2 * self.pad_w);
        if ph < self.kh || pw < self.kw {
            bail!(
                "conv: input {h}×{w} (padding {}, {}) is smaller than the kernel {}×{}",
                self.pad_h,
                self.pad_w,
                self.kh,
                self.kw
            );
        }
        Ok(((ph - self.kh) / self.stride_h + 1, (pw - self.kw) / self.stride_w + 1))
    }

    fn reads_input_directly(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.stride_h == 1
            && self.stride_w == 1
            && self.pad_h == 0
            && self.pad_w == 0
    }

    /// For kernel offset `k` along an axis of input length `n`, output length `no`, stride `s` and
    /// padding `p`: the outputs `lo..hi` whose input index `o·s + k − p` lies inside `0..n`.
    fn valid(k: usize, n: usize, no: usize, s: usize, p: usize) -> (usize, usize) {
        let lo = if k >= p { 0 } else { (p - k).div_ceil(s) }.min(no);
        let hi = if n + p > k { ((n - 1 + p - k) / s + 1).min(no) } else { 0 };
        (lo, hi.max(lo))
    }
}

/// `relu(x·scale[c] + shift[c])` applied to input channel `c` as it is read (an eval-mode batch
/// norm followed by ReLU).
#[derive(Clone, Copy, Debug)]
pub struct PreAct<'a> {
    pub scale: &'a [f32],
    pub shift: &'a [f32],
}

/// What happens to the product before it lands in the output.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// Added per output channel.
    pub bias: Option<&'a [f32]>,
    /// ReLU after the bias (and after accumulation).
    pub relu: bool,
    /// Add into the existing output instead of overwriting it.
    pub accumulate: bool,
}

/// One convolution to run: its shape, its weights and what is fused around it.
#[derive(Clone, Copy, Debug)]
pub struct FusedConv<'a> {
    pub geom: ConvGeom,
    /// `[c_out, c_in·kh·kw]`, row-major.
    pub weight: &'a [f32],
    /// Applied to each input channel as it is read.
    pub pre: Option<PreAct<'a>>,
    pub epi: Epilogue<'a>,
}

/// Batch size and spatial size of a convolution's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub n: usize,
    pub h: usize,
    pub w: usize,
}

/// A depthwise convolution (one filter per channel, `geom.c_in == geom.c_out`) computed tile by
/// tile straight into the input buffer of the 1×1 convolution that reads it, so its output is
/// never stored: a depthwise-separable convolution in one pass ([`separable_tensor`]).
#[derive(Clone, Copy, Debug)]
pub struct DepthwiseStage<'a> {
    pub geom: ConvGeom,
    /// `[c, kh·kw]`.
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    /// ReLU after the bias.
    pub relu: bool,
}

/// `n` images of `c` channels of `h×w`, image `i` channel `c` at `ptr + i·img_stride + c·h·w`.
#[derive(Clone, Copy)]
struct Planes<P> {
    ptr: P,
    img_stride: usize,
}

#[derive(Clone, Copy)]
struct SendConst(*const f32);
#[derive(Clone, Copy)]
struct SendMut(*mut f32);
// SAFETY: tasks only read through `SendConst` and write disjoint output tiles through `SendMut`
// (see `conv_raw`); the buffers outlive the parallel loop, which joins before returning.
impl SendConst {
    /// A method, so closures capture the wrapper (which is `Sync`) rather than its field.
    fn get(self) -> *const f32 {
        self.0
    }
}
impl SendMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}
unsafe impl Send for SendConst {}
unsafe impl Sync for SendConst {}
unsafe impl Send for SendMut {}
unsafe impl Sync for SendMut {}

thread_local! {
    /// Each thread's unfolding buffer, reused across calls.
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Output columns per tile: the unfolded tile (`k × cols` floats) should stay within about
/// 256 KiB (measured best on EmoNet's shapes, between 64 KiB and 1 MiB), and there should be at
/// least one tile per thread.
fn tile_cols(k: usize, hw_out: usize, n: usize, threads: usize) -> usize {
    let mut cols = ((1usize << 16) / k.max(1)).clamp(24, 1024).min(hw_out);
    let per_img = threads.div_ceil(n.max(1));
    if hw_out.div_ceil(cols) < per_img {
        cols = hw_out.div_ceil(per_img).max(16).min(hw_out);
    }
    cols.max(1)
}

/// Unfolds output positions `cols` (row-major over the `ho×wo` output) of one `h×w` image into
/// `buf` (`[k, cols.len()]`), activating on the way.
///
/// # Safety
/// `src` must point at `g.c_in` planes of `h·w` readable floats, and `g.out_hw(h, w)` must be `Ok`.
unsafe fn unfold_tile(
    src: *const f32,
    (h, w): (usize, usize),
    g: &ConvGeom,
    pre: Option<PreAct<'_>>,
    cols: std::ops::Range<usize>,
    buf: &mut [f32],
) {
    let (j0, j1) = (cols.start, cols.end);
    let nc = j1 - j0;
    let ho = (h + 2 * g.pad_h - g.kh) / g.stride_h + 1;
    let wo = (w + 2 * g.pad_w - g.kw) / g.stride_w + 1;
    for ci in 0..g.c_in {
        // SAFETY: the caller guarantees `c_in` planes of `h·w` floats.
        let plane = unsafe { std::slice::from_raw_parts(src.add(ci * h * w), h * w) };
        let act = pre.map(|p| (p.scale[ci], p.shift[ci]));
        for ky in 0..g.kh {
            let (oy_lo, oy_hi) = ConvGeom::valid(ky, h, ho, g.stride_h, g.pad_h);
            for kx in 0..g.kw {
                let (ox_lo, ox_hi) = ConvGeom::valid(kx, w, wo, g.stride_w, g.pad_w);
                let row = &mut buf[((ci * g.kh + ky) * g.kw + kx) * nc..][..nc];
                for (off, oy, (ox0, ox1)) in row_segments(j0..j1, wo) {
                    let dst = &mut row[off..off + (ox1 - ox0)];
                    if oy < oy_lo || oy >= oy_hi {
                        dst.fill(0.0);
                        continue;
                    }
                    let iy = oy * g.stride_h + ky - g.pad_h;
                    let src_row = &plane[iy * w..(iy + 1) * w];
                    // Valid outputs of this segment: a..b (relative to ox0).
                    let a = ox_lo.clamp(ox0, ox1) - ox0;
                    let b = ox_hi.clamp(ox0, ox1) - ox0;
                    dst[..a].fill(0.0);
                    dst[b.max(a)..].fill(0.0);
                    if a >= b {
                        continue;
                    }
                    let ix0 = (ox0 + a) * g.stride_w + kx - g.pad_w;
                    let out = &mut dst[a..b];
                    match (g.stride_w, act) {
                        (1, None) => out.copy_from_slice(&src_row[ix0..ix0 + (b - a)]),
                        (1, Some((s, t))) => {
                            for (o, &v) in out.iter_mut().zip(&src_row[ix0..ix0 + (b - a)]) {
                                *o = (v * s + t).max(0.0);
                            }
                        }
                        (sw, act) => {
                            for (i, o) in out.iter_mut().enumerate() {
                                let v = src_row[ix0 + i * sw];
                                *o = match act {
                                    Some((s, t)) => (v * s + t).max(0.0),
                                    None => v,
                                };
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The pieces of output positions `cols` (row-major over rows `wo` wide) that lie in one output
/// row: for each, its offset within `cols`, its row and its columns `ox0..ox1`.
fn row_segments(
    cols: std::ops::Range<usize>,
    wo: usize,
) -> impl Iterator<Item = (usize, usize, (usize, usize))> {
    let mut j = cols.start;
    std::iter::from_fn(move || {
        if j >= cols.end {
            return None;
        }
        let (oy, ox0) = (j / wo, j % wo);
        let ox1 = wo.min(ox0 + (cols.end - j));
        let off = j - cols.start;
        j += ox1 - ox0;
        Some((off, oy, (ox0, ox1)))
    })
}

/// Computes output positions `cols` (row-major over the `ho×wo` output) of a depthwise
/// convolution of one `h×w` image into `buf` (`[c, cols.len()]`).
///
/// # Safety
/// `src` must point at `dw.geom.c_in` planes of `h·w` readable floats, and `dw.geom.out_hw(h, w)`
/// must be `Ok`.
unsafe fn depthwise_tile(
    src: *const f32,
    (h, w): (usize, usize),
    dw: &DepthwiseStage<'_>,
    cols: std::ops::Range<usize>,
    buf: &mut [f32],
) {
    let g = &dw.geom;
    let (j0, j1) = (cols.start, cols.end);
    let nc = j1 - j0;
    let ho = (h + 2 * g.pad_h - g.kh) / g.stride_h + 1;
    let wo = (w + 2 * g.pad_w - g.kw) / g.stride_w + 1;
    let taps = g.kh * g.kw;
    let three_taps = g.kw == 3 && g.stride_w == 1 && g.pad_w == 1 && w >= 2;
    for c in 0..g.c_in {
        // SAFETY: the caller guarantees `c_in` planes of `h·w` floats.
        let plane = unsafe { std::slice::from_raw_parts(src.add(c * h * w), h * w) };
        let wk = &dw.weight[c * taps..][..taps];
        let row = &mut buf[c * nc..][..nc];
        row.fill(dw.bias.map_or(0.0, |b| b[c]));
        for (off, oy, (ox0, ox1)) in row_segments(j0..j1, wo) {
            let dst = &mut row[off..off + (ox1 - ox0)];
            for ky in 0..g.kh {
                let (oy_lo, oy_hi) = ConvGeom::valid(ky, h, ho, g.stride_h, g.pad_h);
                if oy < oy_lo || oy >= oy_hi {
                    continue;
                }
                let src_row = &plane[(oy * g.stride_h + ky - g.pad_h) * w..][..w];
                if three_taps {
                    // The common 3-wide, stride-1, pad-1 row (output width = input width): all
                    // three taps in one pass over the interior, the two edges by hand.
                    let (w0, w1, w2) = (wk[ky * 3], wk[ky * 3 + 1], wk[ky * 3 + 2]);
                    let (lo, hi) = (ox0.max(1), ox1.min(wo - 1));
                    if lo < hi {
                        let out = &mut dst[lo - ox0..hi - ox0];
                        let taps = src_row[lo - 1..hi - 1]
                            .iter()
                            .zip(&src_row[lo..hi])
                            .zip(&src_row[lo + 1..hi + 1]);
                        for (o, ((&a, &b), &c)) in out.iter_mut().zip(taps) {
                            *o += w0 * a + w1 * b + w2 * c;
                        }
                    }
                    if ox0 == 0 {
                        dst[0] += w1 * src_row[0] + w2 * src_row[1];
                    }
                    if ox1 == wo {
                        dst[wo - 1 - ox0] += w0 * src_row[wo - 2] + w1 * src_row[wo - 1];
                    }
                    continue;
                }
                for kx in 0..g.kw {
                    let (ox_lo, ox_hi) = ConvGeom::valid(kx, w, wo, g.stride_w, g.pad_w);
                    let (a, b) = (ox_lo.clamp(ox0, ox1), ox_hi.clamp(ox0, ox1));
                    if a >= b {
                        continue;
                    }
                    let wv = wk[ky * g.kw + kx];
                    let ix0 = a * g.stride_w + kx - g.pad_w;
                    let out = &mut dst[a - ox0..b - ox0];
                    if g.stride_w == 1 {
                        for (o, &v) in out.iter_mut().zip(&src_row[ix0..ix0 + (b - a)]) {
                            *o += wv * v;
                        }
                    } else {
                        for (i, o) in out.iter_mut().enumerate() {
                            *o += wv * src_row[ix0 + i * g.stride_w];
                        }
                    }
                }
            }
        }
        if dw.relu {
            row.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }
}

/// The convolution over raw planes.
///
/// # Safety
/// `src` holds `x.n` images of `c_in` planes of `h·w` floats at `src.img_stride` apart; `dst`
/// holds `x.n` images of `c_out` planes of `ho·wo` floats at `dst.img_stride` apart; no output
/// plane overlaps an input plane. With a depthwise `stage`, `x` is the extent of the stage's
/// output and `src` holds the stage's input planes of `stage_hw`.
unsafe fn conv_raw(
    op: &FusedConv<'_>,
    x: Extent,
    src: Planes<SendConst>,
    dst: Planes<SendMut>,
    stage: Option<(&DepthwiseStage<'_>, (usize, usize))>,
) -> Result<()> {
    let FusedConv { geom: ref g, weight, pre, epi } = *op;
    let Extent { n, h, w } = x;
    let (ho, wo) = g.out_hw(h, w)?;
    let (hw_out, k) = (ho * wo, g.k());
    if weight.len() != g.c_out * k {
        bail!("conv: weight has {} values, expected {}×{k}", weight.len(), g.c_out);
    }
    if let Some(p) = pre
        && (p.scale.len() != g.c_in || p.shift.len() != g.c_in)
    {
        bail!("conv: pre-activation has {} scales for {} input channels", p.scale.len(), g.c_in);
    }
    if let Some(b) = epi.bias
        && b.len() != g.c_out
    {
        bail!("conv: bias has {} values for {} output channels", b.len(), g.c_out);
    }
    let threads = rayon::current_num_threads();
    let cols = tile_cols(k, hw_out, n, threads);
    let per_img = hw_out.div_ceil(cols);
    let tasks = n * per_img;
    let direct = g.reads_input_directly() && pre.is_none() && stage.is_none();
    // With fewer tiles than threads, the tiles run one after another and gemm splits each.
    let tiles_in_parallel = tasks >= threads;
    let inner = if tiles_in_parallel { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(threads) };
    let run = |t: usize| {
        let (img, j0) = (t / per_img, (t % per_img) * cols);
        let j1 = (j0 + cols).min(hw_out);
        let nc = j1 - j0;
        // SAFETY: offsets stay inside the image planes the caller vouched for.
        let s = unsafe { src.ptr.get().add(img * src.img_stride) };
        let d = unsafe { dst.ptr.get().add(img * dst.img_stride + j0) };
        let product = |rhs: *const f32, rhs_rs: usize| {
            // SAFETY: dst rows are `hw_out` apart and this task owns columns j0..j1 of each;
            // lhs is `[c_out, k]`, rhs `[k, nc]` with row stride `rhs_rs`.
            unsafe {
                gemm::gemm(
                    g.c_out,
                    nc,
                    k,
                    d,
                    1,
                    hw_out as isize,
                    epi.accumulate,
                    weight.as_ptr(),
                    1,
                    k as isize,
                    rhs,
                    1,
                    rhs_rs as isize,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    inner,
                )
            }
        };
        if direct {
            product(unsafe { s.add(j0) }, h * w);
        } else {
            let unfold_and_multiply = |b: &mut Vec<f32>| {
                if b.len() < k * nc {
                    b.resize(k * nc, 0.0);
                }
                // SAFETY: `s` points at this image's c_in input planes (of the stage's input).
                match stage {
                    Some((dw, hw)) => unsafe { depthwise_tile(s, hw, dw, j0..j1, &mut b[..k * nc]) },
                    None => unsafe { unfold_tile(s, (h, w), g, pre, j0..j1, &mut b[..k * nc]) },
                }
                product(b.as_ptr(), nc);
            };
            COLS.with(|b| match b.try_borrow_mut() {
                Ok(mut b) => unfold_and_multiply(&mut b),
                // Re-entered on this thread (a rayon worker stealing work while gemm waits):
                // a fresh buffer for this tile.
                Err(_) => unfold_and_multiply(&mut Vec::new()),
            });
        }
        if epi.bias.is_some() || epi.relu {
            for co in 0..g.c_out {
                // SAFETY: row `co` of this task's tile, owned by this task.
                let row = unsafe { std::slice::from_raw_parts_mut(d.add(co * hw_out), nc) };
                let b = epi.bias.map_or(0.0, |b| b[co]);
                if epi.relu {
                    row.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
                } else {
                    row.iter_mut().for_each(|v| *v += b);
                }
            }
        }
    };
    if tiles_in_parallel {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
    Ok(())
}

/// A run of channels inside an `[n, channels, h, w]` buffer: the view starts at channel `first`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channels {
    pub channels: usize,
    pub first: usize,
}

impl Channels {
    /// Every channel of a `[n, c, h, w]` buffer.
    pub fn all(c: usize) -> Self {
        Self { channels: c, first: 0 }
    }
}

/// Convolves the `c_in` channels of `src` at `src_ch` (`x.n` images of `x.h×x.w`) into the `c_out`
/// channels of `dst` at `dst_ch`, overwriting or accumulating per `op.epi`.
pub fn conv2d(
    op: &FusedConv<'_>,
    x: Extent,
    (src, src_ch): (&[f32], Channels),
    (dst, dst_ch): (&mut [f32], Channels),
) -> Result<()> {
    let (g, Extent { n, h, w }) = (&op.geom, x);
    let (ho, wo) = g.out_hw(h, w)?;
    let fits = |buf: usize, ch: Channels, c: usize, plane: usize| {
        ch.first + c <= ch.channels && buf == n * ch.channels * plane
    };
    if !fits(src.len(), src_ch, g.c_in, h * w) || !fits(dst.len(), dst_ch, g.c_out, ho * wo) {
        bail!(
            "conv: buffers of {} and {} values do not fit [{n}, {}, {h}, {w}] → [{n}, {}, {ho}, {wo}] at channels {} and {}",
            src.len(),
            dst.len(),
            g.c_in,
            g.c_out,
            src_ch.first,
            dst_ch.first
        );
    }
    // SAFETY (offsets): the channel ranges were checked to lie inside their buffers.
    let s = Planes {
        ptr: SendConst(unsafe { src.as_ptr().add(src_ch.first * h * w) }),
        img_stride: src_ch.channels * h * w,
    };
    let d = Planes {
        ptr: SendMut(unsafe { dst.as_mut_ptr().add(dst_ch.first * ho * wo) }),
        img_stride: dst_ch.channels * ho * wo,
    };
    // SAFETY: sizes checked above; `src` and `dst` are distinct borrows.
    unsafe { conv_raw(op, x, s, d, None) }
}

/// Convolves input channels `src_c..src_c + c_in` of `buf` (`[n, c_total, h, w]`) into channels
/// `dst_c..dst_c + c_out` of the same buffer: the ranges must not overlap, and the convolution
/// must keep the spatial size.
pub fn conv2d_within(
    op: &FusedConv<'_>,
    x: Extent,
    buf: &mut [f32],
    c_total: usize,
    (src_c, dst_c): (usize, usize),
) -> Result<()> {
    let (g, Extent { n, h, w }) = (&op.geom, x);
    if g.out_hw(h, w)? != (h, w) {
        bail!("conv within one buffer must keep the spatial size {h}×{w}");
    }
    let overlap = src_c < dst_c + g.c_out && dst_c < src_c + g.c_in;
    if overlap || src_c + g.c_in > c_total || dst_c + g.c_out > c_total || buf.len() != n * c_total * h * w {
        bail!(
            "conv within one buffer: channels {src_c}+{} → {dst_c}+{} of {c_total} overlap or overflow",
            g.c_in,
            g.c_out
        );
    }
    let plane = h * w;
    let base = buf.as_mut_ptr();
    let s = Planes { ptr: SendConst(unsafe { base.add(src_c * plane) }), img_stride: c_total * plane };
    let d = Planes { ptr: SendMut(unsafe { base.add(dst_c * plane) }), img_stride: c_total * plane };
    // SAFETY: channel ranges checked in bounds and disjoint; `buf` is exclusively borrowed.
    unsafe { conv_raw(op, x, s, d, None) }
}

/// The contiguous f32 contents of a CPU tensor, or `None` for other devices and dtypes.
pub fn cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*storage else { return None };
    let (a, b) = layout.contiguous_offsets()?;
    Some(f(&v[a..b]))
}

/// A convolution's weights flattened to `[c_out, c_in·kh·kw]` on the host, when `weight` lives
/// on the CPU as f32 (the fast path's precondition).
pub fn host_weights(weight: &Tensor) -> Option<Vec<f32>> {
    if !weight.device().is_cpu() {
        return None;
    }
    weight.to_dtype(DType::F32).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok()
}

/// [`conv2d`] on a tensor `[n, c_in, h, w]`, returning `[n, c_out, ho, wo]` (`op.epi.accumulate`
/// is ignored); `None` when `x` is not a CPU f32 tensor (callers fall back to candle's
/// convolution).
pub fn conv2d_tensor(op: &FusedConv<'_>, x: &Tensor) -> Result<Option<Tensor>> {
    conv2d_tensor_onto(op, x, None)
}

/// [`conv2d_tensor`] whose output starts as a copy of `base` (a residual connection: the product
/// is added to it before the bias and ReLU of `op.epi`); `None` also when `base` is not a CPU f32
/// tensor of the output's shape.
pub fn conv2d_tensor_onto(op: &FusedConv<'_>, x: &Tensor, base: Option<&Tensor>) -> Result<Option<Tensor>> {
    let g = &op.geom;
    let (n, c, h, w) = x.dims4()?;
    if c != g.c_in {
        bail!("conv: input has {c} channels, the weights expect {}", g.c_in);
    }
    let (ho, wo) = g.out_hw(h, w)?;
    let Some((mut dst, accumulate)) = output_buffer(&[n, g.c_out, ho, wo], base)? else { return Ok(None) };
    let x = x.contiguous()?;
    let out = cpu_f32(&x, |src| -> Result<()> {
        let op = FusedConv { epi: Epilogue { accumulate, ..op.epi }, ..*op };
        conv2d(&op, Extent { n, h, w }, (src, Channels::all(c)), (&mut dst, Channels::all(g.c_out)))
    });
    match out {
        Some(r) => {
            r?;
            Ok(Some(Tensor::from_vec(dst, (n, g.c_out, ho, wo), &Device::Cpu)?))
        }
        None => Ok(None),
    }
}

/// A fresh output of `dims`: zeros, or a copy of `base` to accumulate onto (`true`); `None` when
/// `base` is not a CPU f32 tensor of exactly that shape.
fn output_buffer(dims: &[usize], base: Option<&Tensor>) -> Result<Option<(Vec<f32>, bool)>> {
    match base {
        None => Ok(Some((vec![0f32; dims.iter().product()], false))),
        Some(b) if b.dims() == dims => Ok(cpu_f32(&b.contiguous()?, |v| (v.to_vec(), true))),
        Some(_) => Ok(None),
    }
}

/// A depthwise `stage` followed by the 1×1, stride-1 convolution `pw` on a tensor `[n, c, h, w]`,
/// returning `[n, pw.c_out, ho, wo]` without storing the depthwise output, onto a copy of `base`
/// when given (as [`conv2d_tensor_onto`]); `None` when `x` (or `base`) is not a CPU f32 tensor
/// (of the output's shape).
pub fn separable_tensor(
    stage: &DepthwiseStage<'_>,
    pw: &FusedConv<'_>,
    x: &Tensor,
    base: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (n, c, h, w) = x.dims4()?;
    let (dg, g) = (&stage.geom, &pw.geom);
    if c != dg.c_in
        || dg.c_out != dg.c_in
        || g.c_in != dg.c_out
        || !g.reads_input_directly()
        || pw.pre.is_some()
    {
        bail!(
            "separable conv: a depthwise {}→{} stage and a 1×1 {}→{} convolution do not fit an input of {c} channels",
            dg.c_in,
            dg.c_out,
            g.c_in,
            g.c_out
        );
    }
    if stage.weight.len() != c * dg.kh * dg.kw || stage.bias.is_some_and(|b| b.len() != c) {
        bail!("separable conv: depthwise weights of {} values for {c} channels", stage.weight.len());
    }
    let (ho, wo) = dg.out_hw(h, w)?;
    let Some((mut dst, accumulate)) = output_buffer(&[n, g.c_out, ho, wo], base)? else { return Ok(None) };
    let x = x.contiguous()?;
    let out = cpu_f32(&x, |src| -> Result<()> {
        let op = FusedConv { epi: Epilogue { accumulate, ..pw.epi }, ..*pw };
        let s = Planes { ptr: SendConst(src.as_ptr()), img_stride: c * h * w };
        let d = Planes { ptr: SendMut(dst.as_mut_ptr()), img_stride: g.c_out * ho * wo };
        // SAFETY: `src` is `[n, c, h, w]`, `dst` `[n, c_out, ho, wo]`, distinct buffers.
        unsafe { conv_raw(&op, Extent { n, h: ho, w: wo }, s, d, Some((stage, (h, w)))) }
    });
    match out {
        Some(r) => {
            r?;
            Ok(Some(Tensor::from_vec(dst, (n, g.c_out, ho, wo), &Device::Cpu)?))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic values without a seeded RNG: a hash of the index.
        let len: usize = shape.iter().product();
        let v: Vec<f32> = (0..len)
            .map(|i| {
                let x = (i as u64 + 1)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9));
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// candle's convolution of `relu(x·s + t)` plus bias (+ReLU): the reference semantics.
    fn reference(
        x: &Tensor,
        wt: &Tensor,
        g: &ConvGeom,
        pre: Option<(&Tensor, &Tensor)>,
        bias: Option<&Tensor>,
        relu: bool,
    ) -> Tensor {
        let c = g.c_in;
        let x = match pre {
            Some((s, t)) => x
                .broadcast_mul(&s.reshape((1, c, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&t.reshape((1, c, 1, 1)).unwrap())
                .unwrap()
                .relu()
                .unwrap(),
            None => x.clone(),
        };
        let x = x.pad_with_zeros(2, g.pad_h, g.pad_h).unwrap().pad_with_zeros(3, g.pad_w, g.pad_w).unwrap();
        assert_eq!(g.stride_h, g.stride_w);
        let mut y = x
            .to_dtype(DType::F64)
            .unwrap()
            .conv2d(&wt.to_dtype(DType::F64).unwrap(), 0, g.stride_h, 1, 1)
            .unwrap();
        if let Some(b) = bias {
            y = y
                .broadcast_add(&b.to_dtype(DType::F64).unwrap().reshape((1, g.c_out, 1, 1)).unwrap())
                .unwrap();
        }
        if relu {
            y = y.relu().unwrap();
        }
        y.to_dtype(DType::F32).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn matches_candle_across_shapes_and_fusions() {
        let cases: &[[usize; 8]] = &[
            // n, c_in, c_out, h, w, k, stride, pad
            [1, 3, 8, 9, 9, 3, 1, 1],
            [2, 5, 7, 8, 6, 3, 2, 1],
            [2, 4, 6, 7, 5, 1, 1, 0],
            [1, 3, 4, 11, 13, 7, 2, 3],
            [3, 6, 5, 4, 4, 1, 2, 0],
            [1, 16, 24, 40, 40, 3, 1, 1], // several tiles per image
            [1, 2, 3, 3, 3, 3, 1, 0],
        ];
        for (case, &[n, ci, co, h, w, k, s, p]) in cases.iter().enumerate() {
            let g = ConvGeom::square(ci, co, k, s, p);
            let x = randn(&[n, ci, h, w], 1 + case as u64);
            let wt = randn(&[co, ci, k, k], 100 + case as u64);
            let wv = host_weights(&wt).unwrap();
            let sc = randn(&[ci], 200 + case as u64);
            let sh = randn(&[ci], 300 + case as u64);
            let bias = randn(&[co], 400 + case as u64);
            let (scv, shv, bv) =
                (sc.to_vec1::<f32>().unwrap(), sh.to_vec1::<f32>().unwrap(), bias.to_vec1::<f32>().unwrap());
            for (with_pre, with_bias, relu) in
                [(false, false, false), (true, false, false), (false, true, true), (true, true, false)]
            {
                let pre = with_pre.then_some(PreAct { scale: &scv, shift: &shv });
                let epi = Epilogue { bias: with_bias.then_some(bv.as_slice()), relu, accumulate: false };
                let op = FusedConv { geom: g, weight: &wv, pre, epi };
                let ours = conv2d_tensor(&op, &x).unwrap().unwrap();
                let theirs =
                    reference(&x, &wt, &g, with_pre.then_some((&sc, &sh)), with_bias.then_some(&bias), relu);
                let d = max_diff(&ours, &theirs);
                assert!(d < 1e-4, "case {case} pre={with_pre} bias={with_bias} relu={relu}: max diff {d}");
            }
        }
    }

    #[test]
    fn accumulates_and_works_within_one_buffer() {
        // A block-like use: channels 0..4 → 4..7 of one buffer, then accumulate a 1×1 conv of
        // channels 0..4 into 0..7 of a second buffer holding a residual.
        let (n, h, w) = (2, 6, 5);
        let x = randn(&[n, 7, h, w], 7);
        let mut buf = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wt = randn(&[3, 4, 3, 3], 8);
        let g = ConvGeom::square(4, 3, 3, 1, 1);
        let wv = host_weights(&wt).unwrap();
        let op = FusedConv { geom: g, weight: &wv, pre: None, epi: Epilogue::default() };
        let ext = Extent { n, h, w };
        conv2d_within(&op, ext, &mut buf, 7, (0, 4)).unwrap();
        let got = Tensor::from_vec(buf.clone(), (n, 7, h, w), &Device::Cpu).unwrap();
        let src = x.narrow(1, 0, 4).unwrap();
        let want = reference(&src, &wt, &g, None, None, false);
        assert!(max_diff(&got.narrow(1, 4, 3).unwrap(), &want) < 1e-4);
        assert_eq!(max_diff(&got.narrow(1, 0, 4).unwrap(), &src), 0.0, "input channels untouched");

        let residual = randn(&[n, 7, h, w], 9);
        let mut out = residual.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w1 = randn(&[7, 4, 1, 1], 10);
        let g1 = ConvGeom::square(4, 7, 1, 1, 0);
        let src_v = src.contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let epi = Epilogue { accumulate: true, ..Epilogue::default() };
        let w1v = host_weights(&w1).unwrap();
        let op1 = FusedConv { geom: g1, weight: &w1v, pre: None, epi };
        conv2d(&op1, ext, (&src_v, Channels::all(4)), (&mut out, Channels::all(7))).unwrap();
        let got = Tensor::from_vec(out, (n, 7, h, w), &Device::Cpu).unwrap();
        let want = (reference(&src, &w1, &g1, None, None, false) + residual).unwrap();
        assert!(max_diff(&got, &want) < 1e-4);

        let e = conv2d_within(&op, ext, &mut buf, 7, (0, 2)).unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
    }

    #[test]
    fn separable_matches_depthwise_then_pointwise() {
        // n, c, c_out, h, w, k, stride, pad
        for (case, &[n, c, co, h, w, k, s, p]) in [
            [2, 5, 7, 9, 8, 3, 1, 1],
            [1, 6, 4, 11, 7, 3, 2, 1],
            [3, 16, 24, 40, 40, 3, 1, 1],
            [1, 3, 2, 6, 6, 5, 2, 0],
        ]
        .iter()
        .enumerate()
        {
            let seed = 10 * case as u64;
            let x = randn(&[n, c, h, w], seed + 1);
            let wd = randn(&[c, 1, k, k], seed + 2);
            let bd = randn(&[c], seed + 3);
            let wp = randn(&[co, c, 1, 1], seed + 4);
            let bp = randn(&[co], seed + 5);
            let (wdv, bdv, wpv, bpv) = (
                host_weights(&wd).unwrap(),
                bd.to_vec1::<f32>().unwrap(),
                host_weights(&wp).unwrap(),
                bp.to_vec1::<f32>().unwrap(),
            );
            for (dw_relu, pw_relu) in [(false, false), (true, false), (true, true)] {
                let stage = DepthwiseStage {
                    geom: ConvGeom::square(c, c, k, s, p),
                    weight: &wdv,
                    bias: Some(&bdv),
                    relu: dw_relu,
                };
                let pw = FusedConv {
                    geom: ConvGeom::square(c, co, 1, 1, 0),
                    weight: &wpv,
                    pre: None,
                    epi: Epilogue { bias: Some(&bpv), relu: pw_relu, accumulate: false },
                };
                let ours = separable_tensor(&stage, &pw, &x, None).unwrap().unwrap();
                let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let mut mid = f64(&x)
                    .conv2d(&f64(&wd), p, s, 1, c)
                    .unwrap()
                    .broadcast_add(&f64(&bd).reshape((1, c, 1, 1)).unwrap())
                    .unwrap();
                if dw_relu {
                    mid = mid.relu().unwrap();
                }
                let mut want = mid
                    .conv2d(&f64(&wp), 0, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&f64(&bp).reshape((1, co, 1, 1)).unwrap())
                    .unwrap();
                if pw_relu {
                    want = want.relu().unwrap();
                }
                let want = want.to_dtype(DType::F32).unwrap();
                let d = max_diff(&ours, &want);
                assert!(d < 1e-4, "case {case} relu {dw_relu}/{pw_relu}: max diff {d}");
                if dw_relu && !pw_relu {
                    // Onto a residual, with the ReLU after the sum.
                    let base = randn(want.dims(), seed + 6);
                    let op = FusedConv { epi: Epilogue { relu: true, ..pw.epi }, ..pw };
                    let ours = separable_tensor(&stage, &op, &x, Some(&base)).unwrap().unwrap();
                    let d = max_diff(&ours, &(&want + &base).unwrap().relu().unwrap());
                    assert!(d < 1e-4, "case {case} onto a residual: max diff {d}");
                    assert!(
                        separable_tensor(&stage, &pw, &x, Some(&x)).unwrap().is_none(),
                        "a base of another shape"
                    );
                }
            }
        }
        let g = ConvGeom::square(4, 4, 3, 1, 1);
        let stage = DepthwiseStage { geom: g, weight: &[0.0; 36], bias: None, relu: false };
        let pw = FusedConv {
            geom: ConvGeom::square(3, 2, 1, 1, 0),
            weight: &[0.0; 6],
            pre: None,
            epi: Epilogue::default(),
        };
        let e = separable_tensor(&stage, &pw, &randn(&[1, 4, 5, 5], 1), None).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }

    #[test]
    fn rejects_mismatched_weights_and_inputs() {
        let g = ConvGeom::square(3, 4, 3, 1, 1);
        let x = randn(&[1, 3, 5, 5], 1);
        let op = |geom, weight| FusedConv { geom, weight, pre: None, epi: Epilogue::default() };
        let e = conv2d_tensor(&op(g, &[0.0; 10]), &x).unwrap_err().to_string();
        assert!(e.contains("weight has 10 values"), "{e}");
        let x2 = randn(&[1, 2, 5, 5], 1);
        let e = conv2d_tensor(&op(g, &[0.0; 108]), &x2).unwrap_err().to_string();
        assert!(e.contains("input has 2 channels"), "{e}");
        let big = ConvGeom::square(3, 4, 7, 1, 0);
        let e = conv2d_tensor(&op(big, &[0.0; 588]), &x).unwrap_err().to_string();
        assert!(e.contains("smaller than the kernel"), "{e}");
    }
}
