//! Inference convolution on the CPU: one fused pass per output tile instead of a chain of candle
//! ops.
//!
//! `y = W · unfold(act(x))` is computed tile by tile: each task unfolds the input columns of a
//! tile of output positions into a thread-local buffer (applying an optional per-channel
//! `relu(x·scale + shift)` on the way, the pre-activation of EmoNet's blocks, so the activated
//! tensor is never stored), multiplies it by the weights with one single-threaded `gemm` call
//! writing straight into the output, then adds the bias and applies an optional ReLU in place.
//! Tiles are sized so the unfolded buffer stays in cache, and enough of them exist to keep every
//! thread busy; `accumulate` adds into the output instead of overwriting it, and [`Sum`] adds
//! other tensors to each tile while it is in cache (residual connections and sums of branches
//! as free epilogues). A 1×1 convolution without pre-activation reads the
//! input directly, with no copy.
//!
//! Inputs and outputs are channel ranges of NCHW buffers: image `i`, channel `c` of a view starts
//! at `i·img_stride + c·h·w`, so a block can read and write slices of one concatenation buffer.
//!
//! No backward: training uses [`super::im2col::conv2d_unfolded`]. Groups and dilation are 1.

use std::cell::RefCell;

use super::simd::{self, Vf32, WithLanes};
use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor, bail};

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
    /// Its shape; `pad_h` and `pad_w` pad the top and left.
    pub geom: ConvGeom,
    /// Padding of the bottom and right when it differs from the top and left (ONNX allows
    /// asymmetric pads); `None` pads all sides alike.
    pub pad_end: Option<(usize, usize)>,
    /// `[c, kh·kw]`.
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    /// ReLU after the bias.
    pub relu: bool,
}

impl DepthwiseStage<'_> {
    /// Output height and width for an `h×w` input.
    pub fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let g = &self.geom;
        let Some((pb, pr)) = self.pad_end else { return g.out_hw(h, w) };
        // The symmetric formula checks the kernel and strides; then the true extent.
        g.out_hw(h + pb.saturating_sub(g.pad_h), w + pr.saturating_sub(g.pad_w))?;
        let (ph, pw) = (h + g.pad_h + pb, w + g.pad_w + pr);
        if ph < g.kh || pw < g.kw {
            bail!("depthwise conv: padded input {ph}×{pw} is smaller than the kernel {}×{}", g.kh, g.kw);
        }
        Ok(((ph - g.kh) / g.stride_h + 1, (pw - g.kw) / g.stride_w + 1))
    }
}

/// `n` images of `c` channels of `h×w`, image `i` channel `c` at `ptr + i·img_stride + c·h·w`.
#[derive(Clone, Copy)]
struct Planes<P> {
    ptr: P,
    img_stride: usize,
}

/// Operands added to a convolution's output in its epilogue (each a contiguous
/// `[n, c_out, ho, wo]` buffer), and where that sum goes: `out` (contiguous, of the same shape)
/// when the convolution's own output is kept apart in `dst`, else `dst` itself.
#[derive(Clone, Copy)]
struct SumPlanes<'a> {
    adds: &'a [&'a [f32]],
    out: Option<SendMut>,
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
/// 256 KiB (measured best on EmoNet's shapes, between 64 KiB and 1 MiB) but hold at least 128
/// columns (up to 1.2 MiB for EmoNet's deepest convolutions, still inside L2): narrower tiles make
/// gemm fall back to its smaller, slower microkernels (EmoNet at batch 1: 3.7 images/s with tiles
/// of 24 columns and more, 4.5 with 128), there should be at least
/// one tile per thread, and when there are few tiles their count is a multiple of the threads and
/// their sizes equal (four tiles of 784 columns rather than three of 1024 and one of 64, which
/// would leave one of two threads idle for a quarter of the time).
fn tile_cols(k: usize, hw_out: usize, n: usize, threads: usize) -> usize {
    let hw_out = hw_out.max(1);
    let mut cols = ((1usize << 16) / k.max(1)).clamp(128, 1024).min(hw_out);
    let per_img = threads.div_ceil(n.max(1));
    if hw_out.div_ceil(cols) < per_img {
        cols = hw_out.div_ceil(per_img).max(16).min(hw_out);
    }
    let mut tiles = hw_out.div_ceil(cols);
    let total = n.max(1) * tiles;
    if total < 8 * threads && !total.is_multiple_of(threads) {
        let want = total.next_multiple_of(threads);
        tiles = want.div_ceil(n.max(1)).min(hw_out.div_ceil(16)).max(tiles);
    }
    hw_out.div_ceil(tiles).max(1)
}

/// How a convolution is split into tasks: output columns per tile ([`tile_cols`]) and output
/// channels per block. Where one tile per thread would be narrower than 128 columns (small
/// planes at small batches: face-api's 14×14 and 7×7 layers at batch 1), the tiles stay as wide
/// as for one thread and the output channels are split instead, in multiples of 16 rows: each
/// task then unfolds the whole tile again (cheap next to its product) but gemm works on wide
/// tiles.
fn tiling(k: usize, hw_out: usize, n: usize, c_out: usize, threads: usize) -> (usize, usize) {
    let cols = tile_cols(k, hw_out, n, threads);
    if cols >= 128.min(hw_out) || c_out < 32 {
        return (cols, c_out);
    }
    let cols = tile_cols(k, hw_out, n, 1);
    let tiles = n * hw_out.div_ceil(cols);
    let blocks = threads.div_ceil(tiles).min(c_out / 16).max(1);
    (cols, c_out.div_ceil(blocks).next_multiple_of(16).min(c_out))
}

/// Unfolds output positions `cols` (row-major over the `ho×wo` output) of one `h×w` image into
/// `buf` (`[k, cols.len()]`), activating on the way.
///
/// # Safety
/// `src` must point at `g.c_in` planes of `h·w` readable floats, and `g.out_hw(h, w)` must be `Ok`.
#[inline(always)]
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
    // The input rows this tile reads (in every channel): with a pre-activation, each channel's
    // are activated once into `activated` rather than once per tap.
    let row_lo = ((j0 / wo) * g.stride_h).saturating_sub(g.pad_h);
    let row_end = ((j1 - 1) / wo * g.stride_h + g.kh).saturating_sub(g.pad_h).min(h);
    let mut activated = vec![0f32; if pre.is_some() { row_end.saturating_sub(row_lo) * w } else { 0 }];
    for ci in 0..g.c_in {
        // SAFETY: the caller guarantees `c_in` planes of `h·w` floats.
        let plane = unsafe { std::slice::from_raw_parts(src.add(ci * h * w), h * w) };
        // Input row `iy` is `rows[(iy − first)·w..][..w]`.
        let (rows, first) = match pre {
            Some(p) => {
                let (s, t) = (p.scale[ci], p.shift[ci]);
                let from = &plane[row_lo * w..row_end.max(row_lo) * w];
                for (o, &v) in activated.iter_mut().zip(from) {
                    *o = (v * s + t).max(0.0);
                }
                (&activated[..], row_lo)
            }
            None => (plane, 0),
        };
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
                    let iy = oy * g.stride_h + ky - g.pad_h - first;
                    let src_row = &rows[iy * w..(iy + 1) * w];
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
                    match g.stride_w {
                        1 => out.copy_from_slice(&src_row[ix0..ix0 + (b - a)]),
                        2 => {
                            // Every other input: pairs, so the loop vectorises (the last output's
                            // pair may run past the row, so it goes on its own).
                            let n = out.len();
                            let pairs = src_row[ix0..ix0 + 2 * (n - 1)].chunks_exact(2);
                            for (o, pair) in out[..n - 1].iter_mut().zip(pairs) {
                                *o = pair[0];
                            }
                            out[n - 1] = src_row[ix0 + 2 * (n - 1)];
                        }
                        sw => {
                            for (i, o) in out.iter_mut().enumerate() {
                                *o = src_row[ix0 + i * sw];
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
#[inline(always)]
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
/// 3×3 kernels (every depthwise layer of the networks we run) take a one-pass path: each output
/// is `bias + Σ_ky (k₀·a + k₁·b + k₂·c)` over its three input rows, computed 16 at a time over
/// the columns whose taps all lie inside the image (the edges one by one) and written once,
/// with the ReLU applied on the way. Other kernels accumulate tap by tap.
///
/// # Safety
/// `src` must point at `dw.geom.c_in` planes of `h·w` readable floats, and `dw.out_hw(h, w)` must
/// be `Ok`.
#[inline(always)]
unsafe fn depthwise_tile<V: Vf32>(
    src: *const f32,
    (h, w): (usize, usize),
    dw: &DepthwiseStage<'_>,
    cols: std::ops::Range<usize>,
    buf: &mut [f32],
) {
    let g = &dw.geom;
    let Ok((ho, wo)) = dw.out_hw(h, w) else { unreachable!("checked by the caller") };
    let same =
        (g.kh, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w) == (3, 3, 1, 1, 1, 1) && (ho, wo) == (h, w);
    // SAFETY (both): passed on from the caller.
    if same {
        unsafe { depthwise3x3_same_tile::<V>(src, (h, w), dw, cols, buf) }
    } else {
        unsafe { depthwise_rows_tile::<V>(src, (h, w), dw, cols, buf) }
    }
}

/// [`depthwise_tile`] row by row: any kernel, stride and padding.
///
/// # Safety
/// As [`depthwise_tile`].
#[inline(always)]
unsafe fn depthwise_rows_tile<V: Vf32>(
    src: *const f32,
    (h, w): (usize, usize),
    dw: &DepthwiseStage<'_>,
    cols: std::ops::Range<usize>,
    buf: &mut [f32],
) {
    let g = &dw.geom;
    let (j0, j1) = (cols.start, cols.end);
    let nc = j1 - j0;
    let Ok((ho, wo)) = dw.out_hw(h, w) else { unreachable!("checked by the caller") };
    let taps = g.kh * g.kw;
    // Stand-in for rows above or below the image: zeros, as wide as a row.
    let zeros = if g.kh == 3 && g.kw == 3 { vec![0f32; w] } else { Vec::new() };
    for c in 0..g.c_in {
        // SAFETY: the caller guarantees `c_in` planes of `h·w` floats.
        let plane = unsafe { std::slice::from_raw_parts(src.add(c * h * w), h * w) };
        let wk = &dw.weight[c * taps..][..taps];
        let bias = dw.bias.map_or(0.0, |b| b[c]);
        let row = &mut buf[c * nc..][..nc];
        if let Ok(k) = <&[f32; 9]>::try_from(wk)
            && g.kw == 3
            && g.stride_w <= 2
        {
            let axes = ((g.stride_h, g.pad_h), (g.stride_w, g.pad_w));
            for (off, oy, (ox0, ox1)) in row_segments(j0..j1, wo) {
                let out = &mut row[off..off + (ox1 - ox0)];
                depthwise3x3_output_row::<V>(
                    out,
                    (oy, ox0),
                    (plane, (h, w), &zeros),
                    k,
                    axes,
                    (bias, dw.relu),
                );
            }
            continue;
        }
        row.fill(bias);
        for (off, oy, (ox0, ox1)) in row_segments(j0..j1, wo) {
            let dst = &mut row[off..off + (ox1 - ox0)];
            for ky in 0..g.kh {
                let (oy_lo, oy_hi) = ConvGeom::valid(ky, h, ho, g.stride_h, g.pad_h);
                if oy < oy_lo || oy >= oy_hi {
                    continue;
                }
                let src_row = &plane[(oy * g.stride_h + ky - g.pad_h) * w..][..w];
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

/// [`depthwise_tile`] for a 3×3 kernel with stride 1 and padding 1 (output the size of the
/// input): output `j` of a plane reads inputs `j + (ky − 1)·w + kx − 1`, so the tile's outputs
/// are computed as one flat run, whatever the row width (a 7-wide row would otherwise be two
/// scalar edges and an interior narrower than a register). Each plane's part of the input the
/// tile reads is copied between zeros (the rows above and below the image), and the left and
/// right taps are multiplied by 0/1 masks where a column's neighbour is in another row. Same
/// operations in the same order as [`depthwise3x3_row`]: `bias + Σ_ky ((k₀a + k₁b) + k₂c)`.
///
/// # Safety
/// As [`depthwise_tile`].
#[inline(always)]
unsafe fn depthwise3x3_same_tile<V: Vf32>(
    src: *const f32,
    (h, w): (usize, usize),
    dw: &DepthwiseStage<'_>,
    cols: std::ops::Range<usize>,
    buf: &mut [f32],
) {
    let nc = cols.len();
    let mut part = SamePart::new((h, w), cols);
    for c in 0..dw.geom.c_in {
        // SAFETY: the caller guarantees `c_in` planes of `h·w` floats.
        let plane = unsafe { std::slice::from_raw_parts(src.add(c * h * w), h * w) };
        let k: &[f32; 9] = dw.weight[c * 9..][..9].try_into().expect("nine taps");
        let bias = dw.bias.map_or(0.0, |b| b[c]);
        part.run::<V>(plane, k, (bias, dw.relu), &mut buf[c * nc..][..nc]);
    }
}

/// Outputs `cols` of a stride-1, padding-1 3×3 depthwise convolution of `h×w` planes (see
/// [`depthwise3x3_same_tile`]): the masks for those outputs and a buffer for the inputs they read,
/// set up once for any number of planes. The training depthwise weight gradient reads planes
/// through it too ([`super::depthwise`]).
pub(crate) struct SamePart {
    w: usize,
    /// 0 where an output's left (right) neighbour is in another row, else 1.
    left: Vec<f32>,
    right: Vec<f32>,
    /// The plane's inputs `cols.start − w − 1 .. cols.end + w + 1`, zeros outside the plane.
    xp: Vec<f32>,
    /// The plane's inputs `from..to` go to `xp[at..]`.
    from: usize,
    to: usize,
    at: usize,
}

impl SamePart {
    pub(crate) fn new((h, w): (usize, usize), cols: std::ops::Range<usize>) -> Self {
        let (j0, j1) = (cols.start, cols.end);
        // Column of each output, counted along (no division per output).
        let mask = |edge: usize| -> Vec<f32> {
            let mut col = j0 % w;
            let mut m = Vec::with_capacity(j1 - j0);
            for _ in cols.clone() {
                m.push(if col == edge { 0.0 } else { 1.0 });
                col = if col + 1 == w { 0 } else { col + 1 };
            }
            m
        };
        let first = j0 as isize - (w + 1) as isize;
        let (from, to) = (first.max(0) as usize, (j1 + w + 1).min(h * w));
        let at = (from as isize - first) as usize;
        Self { w, left: mask(0), right: mask(w - 1), xp: vec![0f32; j1 - j0 + 2 * w + 2], from, to, at }
    }

    /// The planes' row width.
    pub(crate) fn width(&self) -> usize {
        self.w
    }

    /// Copies this part's inputs of one plane (`h·w` values) into the buffer. Returns the buffer
    /// (output `j` of the part reads `xp[j + ky·w + kx]` for tap `(ky, kx)`) and the left and
    /// right masks (one value per output).
    #[inline(always)]
    pub(crate) fn load(&mut self, plane: &[f32]) -> (&[f32], &[f32], &[f32]) {
        let n = self.to - self.from;
        self.xp[self.at..self.at + n].copy_from_slice(&plane[self.from..self.to]);
        (&self.xp, &self.left, &self.right)
    }

    /// This part of one plane (`h·w` values) into `out` (one value per output).
    #[inline(always)]
    fn run<V: Vf32>(&mut self, plane: &[f32], k: &[f32; 9], (bias, relu): (f32, bool), out: &mut [f32]) {
        let w = self.w;
        let (xp, left, right) = self.load(plane);
        // SAFETY: `xp` holds `out.len() + 2w + 2` values and the masks `out.len()`.
        unsafe {
            match relu {
                false => same_groups::<V, false>(out, xp, w, (left, right), k, bias),
                true => same_groups::<V, true>(out, xp, w, (left, right), k, bias),
            }
        }
    }
}

/// [`depthwise3x3_same_tile`]'s runs in registers of `V` while the tile is at least that wide,
/// else of its halves.
///
/// # Safety
/// `xp` holds `out.len() + 2·w + 2` values, each mask `out.len()`.
#[inline(always)]
unsafe fn same_groups<V: Vf32, const RELU: bool>(
    out: &mut [f32],
    xp: &[f32],
    w: usize,
    masks: (&[f32], &[f32]),
    k: &[f32; 9],
    bias: f32,
) {
    type H<V> = <V as Vf32>::Half;
    let m = out.len();
    unsafe {
        if m >= V::LANES {
            same_lanes::<V, RELU>(out, xp, w, masks, k, bias)
        } else if m >= H::<V>::LANES {
            same_lanes::<H<V>, RELU>(out, xp, w, masks, k, bias)
        } else if m >= H::<H<V>>::LANES {
            same_lanes::<H<H<V>>, RELU>(out, xp, w, masks, k, bias)
        } else {
            same_lanes::<f32, RELU>(out, xp, w, masks, k, bias)
        }
    }
}

/// `V::LANES` outputs at a time, the last group overlapping the one before it.
///
/// # Safety
/// As [`same_groups`], and `out.len() ≥ V::LANES`.
#[inline(always)]
unsafe fn same_lanes<V: Vf32, const RELU: bool>(
    out: &mut [f32],
    xp: &[f32],
    w: usize,
    (left, right): (&[f32], &[f32]),
    k: &[f32; 9],
    bias: f32,
) {
    let (m, lanes) = (out.len(), V::LANES);
    debug_assert!(m >= lanes && xp.len() >= m + 2 * w + 2 && left.len() >= m && right.len() >= m);
    unsafe {
        let mut kv = [V::splat(0.0); 9];
        for (v, &x) in kv.iter_mut().zip(k) {
            *v = V::splat(x);
        }
        let (b, zero) = (V::splat(bias), V::splat(0.0));
        let mut x = 0;
        while x < m {
            let x0 = x.min(m - lanes);
            let (ml, mr) = (V::load(left.as_ptr().add(x0)), V::load(right.as_ptr().add(x0)));
            let mut acc = b;
            for ky in 0..3 {
                // Output x0's taps in row ky − 1 start at xp[x0 + ky·w] (xp[0] is input j0 − w − 1).
                let p = xp.as_ptr().add(x0 + ky * w);
                let (a, c) = (V::load(p).mul(ml), V::load(p.add(2)).mul(mr));
                let t = kv[3 * ky].mul(a).add(kv[3 * ky + 1].mul(V::load(p.add(1))));
                acc = acc.add(t.add(kv[3 * ky + 2].mul(c)));
            }
            if RELU {
                acc = acc.max(zero);
            }
            acc.store(out.as_mut_ptr().add(x0));
            x += lanes;
        }
    }
}

/// Output row `oy` (columns `ox0..ox0 + out.len()`) of a 3×3 depthwise convolution of one `h×w`
/// plane, with `(stride, top/left pad)` per axis (horizontal stride 1 or 2); rows outside the
/// image read as `zeros` (at least a row long).
#[inline(always)]
fn depthwise3x3_output_row<V: Vf32>(
    out: &mut [f32],
    (oy, ox0): (usize, usize),
    (plane, (h, w), zeros): (&[f32], (usize, usize), &[f32]),
    k: &[f32; 9],
    ((stride_h, pad_h), (stride_w, pad_w)): ((usize, usize), (usize, usize)),
    (bias, relu): (f32, bool),
) {
    let rows: [&[f32]; 3] = std::array::from_fn(|ky| {
        let iy = (oy * stride_h + ky).wrapping_sub(pad_h);
        if iy < h { &plane[iy * w..][..w] } else { &zeros[..w] }
    });
    match stride_w {
        1 => depthwise3x3_row::<V, 1>(out, ox0, rows, k, pad_w, bias, relu),
        _ => depthwise3x3_row::<V, 2>(out, ox0, rows, k, pad_w, bias, relu),
    }
}

#[inline(always)]
fn finish(v: f32, relu: bool) -> f32 {
    if relu { v.max(0.0) } else { v }
}

/// Output columns `ox0..ox0 + out.len()` of one row of a 3×3 depthwise convolution with
/// horizontal stride `S` and `pad`, from its three input rows (zeros for rows outside the image).
///
/// Columns whose taps all lie inside the rows go in groups of 16 (one AVX-512 register of f32;
/// 8 or 4 on narrow rows), the last group overlapping the one before it rather than running a
/// scalar tail (outputs are written, not accumulated, so computing one twice is harmless). The
/// image's edge columns are computed one by one.
#[inline(always)]
fn depthwise3x3_row<V: Vf32, const S: usize>(
    out: &mut [f32],
    ox0: usize,
    rows: [&[f32]; 3],
    k: &[f32; 9],
    pad: usize,
    bias: f32,
    relu: bool,
) {
    let w = rows[0].len();
    let ox1 = ox0 + out.len();
    // Columns with all three taps inside the row: ox·S ≥ pad and ox·S + 2 − pad < w.
    let lo = pad.div_ceil(S).clamp(ox0, ox1);
    let hi = if w + pad >= 3 { ((w + pad - 3) / S + 1).clamp(lo, ox1) } else { lo };
    for ox in (ox0..lo).chain(hi..ox1) {
        let mut v = bias;
        for (ky, r) in rows.iter().enumerate() {
            let mut t = 0.0;
            for kx in 0..3 {
                let ix = (ox * S + kx).wrapping_sub(pad);
                if ix < w {
                    t += k[ky * 3 + kx] * r[ix];
                }
            }
            v += t;
        }
        out[ox - ox0] = finish(v, relu);
    }
    if lo == hi {
        return;
    }
    let interior = &mut out[lo - ox0..hi - ox0];
    // The rows from the first tap of column `lo` on.
    let rows = rows.map(|r| &r[lo * S - pad..]);
    // SAFETY: each row holds (interior.len() − 1)·S + 3 columns from its start (all taps of the
    // interior lie inside it), and `with_lanes` runs this with a register type the CPU has.
    unsafe {
        match relu {
            false => depthwise3x3_groups::<V, S, false>(interior, rows, k, bias),
            true => depthwise3x3_groups::<V, S, true>(interior, rows, k, bias),
        }
    }
}

/// [`depthwise3x3_row`]'s interior in groups of lanes: registers of `V` while the interior is at
/// least that wide, else of its halves.
///
/// # Safety
/// Each row holds `(out.len() − 1)·S + 3` columns from its start, the taps of `out[0]` first.
#[inline(always)]
unsafe fn depthwise3x3_groups<V: Vf32, const S: usize, const RELU: bool>(
    out: &mut [f32],
    rows: [&[f32]; 3],
    k: &[f32; 9],
    bias: f32,
) {
    type H<V> = <V as Vf32>::Half;
    let m = out.len();
    unsafe {
        if m >= V::LANES {
            depthwise3x3_lanes::<V, S, RELU>(out, rows, k, bias)
        } else if m >= H::<V>::LANES {
            depthwise3x3_lanes::<H<V>, S, RELU>(out, rows, k, bias)
        } else if m >= H::<H<V>>::LANES {
            depthwise3x3_lanes::<H<H<V>>, S, RELU>(out, rows, k, bias)
        } else {
            depthwise3x3_lanes::<f32, S, RELU>(out, rows, k, bias)
        }
    }
}

/// Lanes of `p[S·l]`.
///
/// # Safety
/// As [`Vf32::load`] (`S` = 1) or [`Vf32::load_even`].
#[inline(always)]
unsafe fn load<V: Vf32, const S: usize>(p: *const f32) -> V {
    unsafe { if S == 1 { V::load(p) } else { V::load_even(p) } }
}

/// `V::LANES` columns at a time, the last group overlapping the one before it.
///
/// # Safety
/// As [`depthwise3x3_groups`], and `out.len() ≥ V::LANES`.
#[inline(always)]
unsafe fn depthwise3x3_lanes<V: Vf32, const S: usize, const RELU: bool>(
    out: &mut [f32],
    rows: [&[f32]; 3],
    k: &[f32; 9],
    bias: f32,
) {
    let (m, lanes) = (out.len(), V::LANES);
    debug_assert!(m >= lanes && rows.iter().all(|r| r.len() >= (m - 1) * S + 3));
    unsafe {
        let mut kv = [V::splat(0.0); 9];
        for (v, &w) in kv.iter_mut().zip(k) {
            *v = V::splat(w);
        }
        let (b, zero) = (V::splat(bias), V::splat(0.0));
        let mut x = 0;
        while x < m {
            let x0 = x.min(m - lanes);
            let mut acc = b;
            for (ky, r) in rows.iter().enumerate() {
                // Columns x0·S + kx + S·l for lane l: inside the row by the caller's bound.
                let p = r.as_ptr().add(x0 * S);
                let (a, b, c) = (load::<V, S>(p), load::<V, S>(p.add(1)), load::<V, S>(p.add(2)));
                let t = kv[3 * ky].mul(a).add(kv[3 * ky + 1].mul(b));
                acc = acc.add(t.add(kv[3 * ky + 2].mul(c)));
            }
            if RELU {
                acc = acc.max(zero);
            }
            acc.store(out.as_mut_ptr().add(x0));
            x += lanes;
        }
    }
}

/// `h×w` planes of a 3×3 depthwise convolution with padding 1 and stride 1 or 2 (the training
/// layers' shape), with the CPU's widest registers. What depends only on the shape (the masks and
/// input buffer of a stride-1 run, a row of zeros for stride 2) is set up once and reused for
/// every plane given to [`Self::run`].
pub(crate) struct Depthwise3x3Planes {
    hw: (usize, usize),
    stride: usize,
    /// Stride 1: the whole plane as one flat run.
    same: Option<SamePart>,
    /// Stride 2: the padding row.
    zeros: Vec<f32>,
}

impl Depthwise3x3Planes {
    pub(crate) fn new((h, w): (usize, usize), stride: usize) -> Self {
        let same = (stride == 1).then(|| SamePart::new((h, w), 0..h * w));
        let zeros = if stride == 1 { Vec::new() } else { vec![0f32; w] };
        Self { hw: (h, w), stride, same, zeros }
    }

    /// One plane `x` (`h×w`) convolved with `k` into `y` (`ho×wo`).
    pub(crate) fn run(&mut self, x: &[f32], k: &[f32; 9], y: &mut [f32]) {
        simd::with_lanes(Plane { planes: self, x, k, y })
    }
}

struct Plane<'a> {
    planes: &'a mut Depthwise3x3Planes,
    x: &'a [f32],
    k: &'a [f32; 9],
    y: &'a mut [f32],
}

impl WithLanes for Plane<'_> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vf32>(self) {
        let Plane { planes, x, k, y } = self;
        let ((h, w), stride) = (planes.hw, planes.stride);
        if let Some(same) = &mut planes.same {
            // Padding 1, stride 1: the output is the input's size, one flat run.
            same.run::<V>(x, k, (0.0, false), &mut y[..h * w]);
            return;
        }
        let (ho, wo) = (super::depthwise::out_side(h, stride), super::depthwise::out_side(w, stride));
        for (oy, out) in y.chunks_exact_mut(wo).take(ho).enumerate() {
            let axes = ((stride, 1), (stride, 1));
            depthwise3x3_output_row::<V>(out, (oy, 0), (x, (h, w), &planes.zeros), k, axes, (0.0, false));
        }
    }
}

/// [`depthwise_tile`]'s arguments, to run it with the CPU's widest registers.
struct DepthwiseTile<'a, 'b> {
    src: *const f32,
    hw: (usize, usize),
    dw: &'a DepthwiseStage<'b>,
    cols: std::ops::Range<usize>,
    buf: &'a mut [f32],
}

impl WithLanes for DepthwiseTile<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vf32>(self) {
        // SAFETY: built by `conv_raw` from planes the caller of `conv_raw` vouched for.
        unsafe { depthwise_tile::<V>(self.src, self.hw, self.dw, self.cols, self.buf) }
    }
}

/// `row ← relu?(row + bias + Σ adds[at..])`: one pass per operand (the row is in L1), the bias
/// with the first and the ReLU with the last.
#[inline(always)]
fn finish_row(row: &mut [f32], bias: f32, adds: &[&[f32]], at: usize, relu: bool) {
    let nc = row.len();
    let relu_at = |last: bool| relu && last;
    match adds.split_first() {
        None if relu => row.iter_mut().for_each(|v| *v = (*v + bias).max(0.0)),
        None => row.iter_mut().for_each(|v| *v += bias),
        Some((a0, rest)) => {
            let r = relu_at(rest.is_empty());
            row.iter_mut().zip(&a0[at..at + nc]).for_each(|(v, &a)| {
                let s = *v + bias + a;
                *v = if r { s.max(0.0) } else { s };
            });
            for (i, a) in rest.iter().enumerate() {
                let r = relu_at(i + 1 == rest.len());
                row.iter_mut().zip(&a[at..at + nc]).for_each(|(v, &a)| {
                    let s = *v + a;
                    *v = if r { s.max(0.0) } else { s };
                });
            }
        }
    }
}

/// The convolution over raw planes.
///
/// # Safety
/// `src` holds `x.n` images of `c_in` planes of `h·w` floats at `src.img_stride` apart; `dst`
/// holds `x.n` images of `c_out` planes of `ho·wo` floats at `dst.img_stride` apart; no output
/// plane overlaps an input plane. With a depthwise `stage`, `x` is the extent of the stage's
/// output and `src` holds the stage's input planes of `stage_hw`. With a `sum`, `dst` is
/// contiguous (`img_stride` = `c_out·ho·wo`), every operand holds `x.n·c_out·ho·wo` floats, and
/// its `out`, if any, has room for as many and overlaps nothing else.
unsafe fn conv_raw(
    op: &FusedConv<'_>,
    x: Extent,
    src: Planes<SendConst>,
    dst: Planes<SendMut>,
    stage: Option<(&DepthwiseStage<'_>, (usize, usize))>,
    sum: Option<SumPlanes<'_>>,
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
    let adds = sum.map_or(&[][..], |s| s.adds);
    let sum_out = sum.and_then(|s| s.out);
    let plane_stride = g.c_out * hw_out;
    if sum.is_some()
        && (dst.img_stride != plane_stride
            || epi.accumulate
            || adds.is_empty()
            || adds.iter().any(|a| a.len() != n * plane_stride))
    {
        bail!("conv: the operands of a fused sum must be [{n}, {}, {ho}, {wo}], as the output", g.c_out);
    }
    let threads = rayon::current_num_threads();
    let (cols, co_block) = tiling(k, hw_out, n, g.c_out, threads);
    let per_img = hw_out.div_ceil(cols);
    let blocks = g.c_out.div_ceil(co_block);
    let tasks = n * per_img * blocks;
    let direct = g.reads_input_directly() && pre.is_none() && stage.is_none();
    // With fewer tasks than threads, they run one after another and gemm splits each.
    let tiles_in_parallel = tasks >= threads;
    let inner = if tiles_in_parallel { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(threads) };
    let run = |t: usize| {
        let (tile, block) = (t / blocks, t % blocks);
        let (img, j0) = (tile / per_img, (tile % per_img) * cols);
        let j1 = (j0 + cols).min(hw_out);
        let nc = j1 - j0;
        let (co0, co1) = (block * co_block, ((block + 1) * co_block).min(g.c_out));
        // SAFETY: offsets stay inside the image planes the caller vouched for.
        let s = unsafe { src.ptr.get().add(img * src.img_stride) };
        let d = unsafe { dst.ptr.get().add(img * dst.img_stride + j0) };
        let product = |rhs: *const f32, rhs_rs: usize| {
            // SAFETY: dst rows are `hw_out` apart and this task owns columns j0..j1 of rows
            // co0..co1; lhs is `[c_out, k]`, rhs `[k, nc]` with row stride `rhs_rs`.
            unsafe {
                gemm::gemm(
                    co1 - co0,
                    nc,
                    k,
                    d.add(co0 * hw_out),
                    1,
                    hw_out as isize,
                    epi.accumulate,
                    weight.as_ptr().add(co0 * k),
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
                let b = &mut b[..k * nc];
                match stage {
                    Some((dw, hw)) => {
                        simd::with_lanes(DepthwiseTile { src: s, hw, dw, cols: j0..j1, buf: b })
                    }
                    None => simd::vectorized(
                        #[inline(always)]
                        || unsafe { unfold_tile(s, (h, w), g, pre, j0..j1, b) },
                    ),
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
        if epi.bias.is_some() || epi.relu || !adds.is_empty() {
            simd::vectorized(
                #[inline(always)]
                || {
                    for co in co0..co1 {
                        // SAFETY: row `co` of this task's tile, owned by this task.
                        let row = unsafe { std::slice::from_raw_parts_mut(d.add(co * hw_out), nc) };
                        let b = epi.bias.map_or(0.0, |b| b[co]);
                        // The same columns of the sum's operands (and of its own output).
                        let at = img * plane_stride + co * hw_out + j0;
                        match sum_out {
                            None => finish_row(row, b, adds, at, epi.relu),
                            Some(out) => {
                                // SAFETY: `out` is contiguous like `dst`; this task owns the tile.
                                let out = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), nc) };
                                // Its own output plus the bias, then the sum from there.
                                let (a0, rest) = adds.split_first().expect("a sum has operands");
                                let r = epi.relu && rest.is_empty();
                                for ((v, o), &a) in row.iter_mut().zip(out.iter_mut()).zip(&a0[at..at + nc]) {
                                    *v += b;
                                    let s = *v + a;
                                    *o = if r { s.max(0.0) } else { s };
                                }
                                if !rest.is_empty() {
                                    finish_row(out, 0.0, rest, at, epi.relu);
                                }
                            }
                        }
                    }
                },
            );
        }
    };
    if tiles_in_parallel {
        super::for_each_task(tasks, run);
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
    unsafe { conv_raw(op, x, s, d, None, None) }
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
    unsafe { conv_raw(op, x, s, d, None, None) }
}

/// The contiguous f32 values behind a CPU tensor's storage, or `None` for other storage.
fn contiguous_f32<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(v)) = storage else { return None };
    let (a, b) = layout.contiguous_offsets()?;
    Some(&v[a..b])
}

/// The contiguous f32 contents of a CPU tensor, or `None` for other devices and dtypes.
pub fn cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    Some(f(contiguous_f32(&storage, layout)?))
}

/// [`cpu_f32`] for several tensors at once: `f` gets all their values, in order.
pub fn cpu_f32_all<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    if ts.iter().any(|t| !t.device().is_cpu() || t.dtype() != DType::F32) {
        return None;
    }
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards.iter().map(|(s, l)| contiguous_f32(s, l)).collect::<Option<Vec<_>>>()?;
    Some(f(&slices))
}

/// A convolution's weights flattened to `[c_out, c_in·kh·kw]` on the host, when `weight` lives
/// on the CPU as f32 (the fast path's precondition).
pub fn host_weights(weight: &Tensor) -> Option<Vec<f32>> {
    if !weight.device().is_cpu() {
        return None;
    }
    weight.to_dtype(DType::F32).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok()
}

/// Operands a convolution adds to its output before its ReLU (a residual connection, a sum of
/// branches), each a tensor of the output's shape; with `keep_own` the convolution's own output
/// (bias included, no ReLU) is returned too, ahead of the sum.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sum<'a> {
    pub adds: &'a [&'a Tensor],
    pub keep_own: bool,
}

/// [`conv2d`] on a tensor `[n, c_in, h, w]`, returning `[n, c_out, ho, wo]` (`op.epi.accumulate`
/// is ignored); `None` when `x` is not a CPU f32 tensor (callers fall back to candle's
/// convolution).
pub fn conv2d_tensor(op: &FusedConv<'_>, x: &Tensor) -> Result<Option<Tensor>> {
    Ok(conv2d_tensor_sum(op, x, Sum::default())?.map(|mut ys| ys.swap_remove(0)))
}

/// [`conv2d_tensor`] plus the operands of `sum`, added in the epilogue of each output tile while
/// it is in cache: `[relu?(conv + bias + Σ adds)]`, or `[conv + bias, relu?(conv + bias + Σ
/// adds)]` with `keep_own`. `None` also when an operand is not a contiguous CPU f32 tensor of
/// the output's shape.
pub fn conv2d_tensor_sum(op: &FusedConv<'_>, x: &Tensor, sum: Sum<'_>) -> Result<Option<Vec<Tensor>>> {
    let g = &op.geom;
    let (n, c, h, w) = x.dims4()?;
    if c != g.c_in {
        bail!("conv: input has {c} channels, the weights expect {}", g.c_in);
    }
    let (ho, wo) = g.out_hw(h, w)?;
    let op = FusedConv { epi: Epilogue { accumulate: false, ..op.epi }, ..*op };
    // SAFETY: `run_onto` hands over `[n, c, h, w]` and distinct outputs of `[n, c_out, ho, wo]`.
    run_onto(x, (g.c_out, ho, wo), sum, |src, d, sp| unsafe {
        conv_raw(&op, Extent { n, h, w }, src, d, None, sp)
    })
}

/// Runs `kernel` on the values of `x` (`[n, c, h, w]`), fresh outputs of `[n, c_out, ho, wo]`
/// that it must write whole, and the operands of `sum`; returns the outputs (see
/// [`conv2d_tensor_sum`]), or `None` when a tensor is not a contiguous CPU f32 tensor (of the
/// output's shape, for the operands).
fn run_onto(
    x: &Tensor,
    (c_out, ho, wo): (usize, usize, usize),
    sum: Sum<'_>,
    kernel: impl FnOnce(Planes<SendConst>, Planes<SendMut>, Option<SumPlanes<'_>>) -> Result<()>,
) -> Result<Option<Vec<Tensor>>> {
    let (n, c, h, w) = x.dims4()?;
    if sum.keep_own && sum.adds.is_empty() {
        bail!("conv: its own output kept apart from a sum of no operands");
    }
    let dims = (n, c_out, ho, wo);
    if sum.adds.iter().any(|a| a.dims() != [n, c_out, ho, wo]) {
        return Ok(None);
    }
    let total = n * c_out * ho * wo;
    let x = x.contiguous()?;
    let mut own = Vec::<f32>::with_capacity(total);
    let mut summed = Vec::<f32>::with_capacity(if sum.keep_own { total } else { 0 });
    let tensors: Vec<&Tensor> = std::iter::once(&x).chain(sum.adds.iter().copied()).collect();
    let ran = cpu_f32_all(&tensors, |v| {
        let (src, adds) = v.split_first().expect("the input comes first");
        if src.len() != n * c * h * w {
            bail!("conv: input of {} values is not [{n}, {c}, {h}, {w}]", src.len());
        }
        let s = Planes { ptr: SendConst(src.as_ptr()), img_stride: c * h * w };
        let d = Planes { ptr: SendMut(own.as_mut_ptr()), img_stride: c_out * ho * wo };
        let sp = (!adds.is_empty())
            .then(|| SumPlanes { adds, out: sum.keep_own.then_some(SendMut(summed.as_mut_ptr())) });
        kernel(s, d, sp)
    });
    let Some(ran) = ran else { return Ok(None) };
    ran?;
    // SAFETY: the kernel succeeded and wrote every element of its outputs.
    unsafe { own.set_len(total) };
    let mut ys = vec![Tensor::from_vec(own, dims, &Device::Cpu)?];
    if sum.keep_own {
        // SAFETY: as above.
        unsafe { summed.set_len(total) };
        ys.push(Tensor::from_vec(summed, dims, &Device::Cpu)?);
    }
    Ok(Some(ys))
}

/// A depthwise `stage` followed by the 1×1, stride-1 convolution `pw` on a tensor `[n, c, h, w]`,
/// without storing the depthwise output, with the operands of `sum` added as in
/// [`conv2d_tensor_sum`] (its outputs are `[n, pw.c_out, ho, wo]`); `None` when `x` or an
/// operand is not a contiguous CPU f32 tensor (of the output's shape).
pub fn separable_tensor(
    stage: &DepthwiseStage<'_>,
    pw: &FusedConv<'_>,
    x: &Tensor,
    sum: Sum<'_>,
) -> Result<Option<Vec<Tensor>>> {
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
    let (ho, wo) = stage.out_hw(h, w)?;
    let op = FusedConv { epi: Epilogue { accumulate: false, ..pw.epi }, ..*pw };
    // SAFETY: `run_onto` hands over `[n, c, h, w]` and distinct outputs of `[n, c_out, ho, wo]`.
    run_onto(x, (g.c_out, ho, wo), sum, |src, d, sp| unsafe {
        conv_raw(&op, Extent { n, h: ho, w: wo }, src, d, Some((stage, (h, w))), sp)
    })
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
            // Sums in the epilogue: two operands, its own output kept apart, the ReLU after the sum.
            let own = reference(&x, &wt, &g, None, Some(&bias), false);
            let (a, b) = (randn(own.dims(), 500 + case as u64), randn(own.dims(), 600 + case as u64));
            let epi = Epilogue { bias: Some(&bv), relu: true, accumulate: false };
            let op = FusedConv { geom: g, weight: &wv, pre: None, epi };
            let ys = conv2d_tensor_sum(&op, &x, Sum { adds: &[&a, &b], keep_own: true }).unwrap().unwrap();
            assert!(max_diff(&ys[0], &own) < 1e-4, "case {case}: own output beside the sum");
            let want = ((&own + &a).unwrap() + &b).unwrap().relu().unwrap();
            assert!(max_diff(&ys[1], &want) < 1e-4, "case {case}: the sum");
        }
    }

    #[test]
    fn small_planes_split_output_channels_with_the_same_results() {
        // One 7×7 image on three threads: tiles of 49 columns, 48 output channels in blocks of 16.
        assert_eq!(tiling(27, 49, 1, 48, 3), (49, 16));
        assert_eq!(tiling(256, 196, 1, 128, 2), (196, 64));
        // Wide enough tiles, or too few channels: columns only.
        assert_eq!(tiling(256, 784, 1, 64, 2), (196, 64));
        assert_eq!(tiling(27, 49, 1, 24, 3).1, 24);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let (ci, co) = (3, 48);
        let g = ConvGeom::square(ci, co, 3, 1, 1);
        let x = randn(&[1, ci, 7, 7], 7);
        let wt = randn(&[co, ci, 3, 3], 8);
        let bias = randn(&[co], 9);
        let (wv, bv) = (host_weights(&wt).unwrap(), bias.to_vec1::<f32>().unwrap());
        let own = reference(&x, &wt, &g, None, Some(&bias), false);
        let a = randn(own.dims(), 10);
        let op = FusedConv {
            geom: g,
            weight: &wv,
            pre: None,
            epi: Epilogue { bias: Some(&bv), relu: true, accumulate: false },
        };
        let ys = pool
            .install(|| conv2d_tensor_sum(&op, &x, Sum { adds: &[&a], keep_own: true }))
            .unwrap()
            .unwrap();
        assert!(max_diff(&ys[0], &own) < 1e-4, "own output");
        assert!(max_diff(&ys[1], &(&own + &a).unwrap().relu().unwrap()) < 1e-4, "sum");
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

    /// One output row of a 3×3 depthwise convolution, all columns or a part of them.
    #[derive(Clone)]
    struct Row<'a> {
        rows: [&'a [f32]; 3],
        k: [f32; 9],
        stride: usize,
        pad: usize,
        cols: std::ops::Range<usize>,
        relu: bool,
    }

    impl WithLanes for Row<'_> {
        type Output = Vec<f32>;
        fn run<V: Vf32>(self) -> Vec<f32> {
            let mut out = vec![f32::NAN; self.cols.len()];
            let (o, r, k, p, b, relu) = (&mut out[..], self.rows, &self.k, self.pad, 0.25, self.relu);
            match self.stride {
                1 => depthwise3x3_row::<V, 1>(o, self.cols.start, r, k, p, b, relu),
                _ => depthwise3x3_row::<V, 2>(o, self.cols.start, r, k, p, b, relu),
            }
            out
        }
    }

    /// One tile of a stride-1, padding-1 depthwise stage, by the flat path or row by row.
    #[derive(Clone)]
    struct SameTile<'a> {
        x: &'a [f32],
        hw: (usize, usize),
        stage: DepthwiseStage<'a>,
        cols: std::ops::Range<usize>,
        flat: bool,
    }

    impl WithLanes for SameTile<'_> {
        type Output = Vec<f32>;
        fn run<V: Vf32>(self) -> Vec<f32> {
            let mut out = vec![f32::NAN; self.stage.geom.c_in * self.cols.len()];
            // SAFETY: `x` holds `c_in` planes of `h·w` values; the stage fits them.
            unsafe {
                if self.flat {
                    depthwise3x3_same_tile::<V>(self.x.as_ptr(), self.hw, &self.stage, self.cols, &mut out)
                } else {
                    depthwise_rows_tile::<V>(self.x.as_ptr(), self.hw, &self.stage, self.cols, &mut out)
                }
            }
            out
        }
    }

    /// The flat stride-1 path computes what the row-by-row path does (same operations, so equal
    /// values), with the same bits at every register width, for tiles that start and end inside
    /// rows, single rows and columns, and whole planes.
    #[test]
    fn flat_same_padding_tiles_match_the_row_path() {
        let c = 3;
        for (h, w) in [(1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (7, 7), (14, 14), (5, 33), (56, 56)] {
            let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 37.0).collect();
            let weight: Vec<f32> = (0..c * 9).map(|i| (i as f32 - 13.0) / 7.0).collect();
            let bias = [0.25f32, -0.5, 0.0];
            let hw = h * w;
            for cols in
                [0..hw, 0..hw / 2 + 1, hw / 3..hw, (w / 2).min(hw - 1)..(hw - w / 2).max(w / 2 + 1).min(hw)]
            {
                for relu in [false, true] {
                    let stage = DepthwiseStage {
                        geom: ConvGeom::square(c, c, 3, 1, 1),
                        pad_end: None,
                        weight: &weight,
                        bias: Some(&bias),
                        relu,
                    };
                    let tile = |flat| SameTile { x: &x, hw: (h, w), stage, cols: cols.clone(), flat };
                    let rows = simd::with_lanes(tile(false));
                    let flats = simd::each_level(tile(true));
                    for flat in &flats {
                        assert_eq!(flat, &rows, "{h}x{w} cols {cols:?} relu {relu}");
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(flat),
                            bits(&flats[0]),
                            "{h}x{w} cols {cols:?}: bits differ across widths"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn depthwise_rows_agree_for_every_register_width() {
        let vals = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i + seed) * 7919 % 211) as f32 - 105.0) / 37.0).collect()
        };
        let k: [f32; 9] = std::array::from_fn(|i| (i as f32 - 4.0) / 3.0);
        for w in [1, 2, 3, 4, 5, 7, 9, 14, 17, 18, 31, 33, 56, 70] {
            let data = [vals(w, 1), vals(w, 2), vec![0.0; w]];
            for (stride, pad) in [(1, 1), (1, 0), (1, 2), (2, 0), (2, 1)] {
                let Some(wo) = (w + 2 * pad + 1).checked_sub(3).map(|d| d / stride + 1) else { continue };
                for cols in [0..wo, 0..wo / 2, wo / 3..wo] {
                    let row = Row {
                        rows: [&data[0], &data[1], &data[2]],
                        k,
                        stride,
                        pad,
                        cols: cols.clone(),
                        relu: w % 2 == 0,
                    };
                    let want: Vec<f32> = cols
                        .clone()
                        .map(|ox| {
                            let mut v = 0.25f64;
                            for (ky, r) in data.iter().enumerate() {
                                for kx in 0..3 {
                                    let ix = (ox * stride + kx) as isize - pad as isize;
                                    if (0..w as isize).contains(&ix) {
                                        v += f64::from(k[ky * 3 + kx]) * f64::from(r[ix as usize]);
                                    }
                                }
                            }
                            if row.relu { v.max(0.0) as f32 } else { v as f32 }
                        })
                        .collect();
                    let outs = simd::each_level(row);
                    for got in &outs {
                        let close =
                            got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-4 * w.abs().max(1.0));
                        assert!(close, "w {w} stride {stride} pad {pad} cols {cols:?}: {got:?} vs {want:?}");
                        // Same operations in the same order whatever the register width.
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(got),
                            bits(&outs[0]),
                            "w {w} stride {stride} pad {pad} cols {cols:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn separable_matches_depthwise_then_pointwise() {
        // n, c, c_out, h, w, k, stride, pad (top, left), pad (bottom, right). Widths cover the
        // 3×3 kernel's groups of 16, 8, 4 and 1 columns, the image edges and tiles that split rows.
        for (case, &[n, c, co, h, w, k, s, p, pe]) in [
            [2, 5, 7, 9, 8, 3, 1, 1, 1],
            [1, 6, 4, 11, 7, 3, 2, 1, 1],
            [3, 16, 24, 40, 40, 3, 1, 1, 1],
            [1, 3, 2, 6, 6, 5, 2, 0, 0],
            [2, 4, 3, 8, 37, 3, 2, 0, 1],
            [1, 3, 5, 5, 20, 3, 1, 1, 1],
            [1, 2, 3, 4, 11, 3, 1, 1, 1],
            [1, 2, 2, 3, 6, 3, 1, 1, 1],
            [1, 2, 2, 3, 3, 3, 1, 1, 1],
            [1, 2, 2, 9, 70, 3, 2, 1, 0],
            [1, 2, 2, 7, 7, 3, 1, 0, 2],
            [2, 32, 8, 56, 56, 3, 2, 0, 1],
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
                    pad_end: (pe != p).then_some((pe, pe)),
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
                let ours = separable_tensor(&stage, &pw, &x, Sum::default()).unwrap().unwrap().remove(0);
                let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let xp = x.pad_with_zeros(2, p, pe).unwrap().pad_with_zeros(3, p, pe).unwrap();
                let mut mid = f64(&xp)
                    .conv2d(&f64(&wd), 0, s, 1, c)
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
                    // Sums onto one, two and three operands, with the ReLU after the sum, and
                    // with the convolution's own output kept apart.
                    let ops: Vec<Tensor> = (0..3).map(|i| randn(want.dims(), seed + 6 + i)).collect();
                    for (count, keep_own, relu) in
                        [(1, false, true), (2, true, true), (3, true, false), (3, false, true)]
                    {
                        let adds: Vec<&Tensor> = ops[..count].iter().collect();
                        let op = FusedConv { epi: Epilogue { relu, ..pw.epi }, ..pw };
                        let ys = separable_tensor(&stage, &op, &x, Sum { adds: &adds, keep_own })
                            .unwrap()
                            .unwrap();
                        let mut total = want.clone();
                        for a in &adds {
                            total = (&total + *a).unwrap();
                        }
                        let total = if relu { total.relu().unwrap() } else { total };
                        assert_eq!(ys.len(), 1 + usize::from(keep_own), "case {case}: outputs");
                        let d = max_diff(ys.last().unwrap(), &total);
                        assert!(d < 1e-4, "case {case} sum of {count} (relu {relu}): max diff {d}");
                        if keep_own {
                            let d = max_diff(&ys[0], &want);
                            assert!(d < 1e-4, "case {case} own output beside a sum of {count}: max diff {d}");
                        }
                    }
                    let other = randn(&[n, co + 1, 2, 2], seed);
                    let sum = Sum { adds: &[&other], keep_own: false };
                    assert!(
                        separable_tensor(&stage, &pw, &x, sum).unwrap().is_none(),
                        "an operand of another shape"
                    );
                    let none = Sum { adds: &[], keep_own: true };
                    assert!(separable_tensor(&stage, &pw, &x, none).is_err(), "its own output beside no sum");
                }
            }
        }
        let g = ConvGeom::square(4, 4, 3, 1, 1);
        let stage = DepthwiseStage { geom: g, pad_end: None, weight: &[0.0; 36], bias: None, relu: false };
        let pw = FusedConv {
            geom: ConvGeom::square(3, 2, 1, 1, 0),
            weight: &[0.0; 6],
            pre: None,
            epi: Epilogue::default(),
        };
        let e =
            separable_tensor(&stage, &pw, &randn(&[1, 4, 5, 5], 1), Sum::default()).unwrap_err().to_string();
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
