//! Convolution and pooling with ONNX semantics on top of candle.
//!
//! candle's `conv2d` takes one symmetric padding, stride and dilation for both axes, and its pools
//! take no padding at all. ONNX allows per-side pads, `auto_pad`, `ceil_mode` and
//! `count_include_pad`, so asymmetric pads are applied explicitly to the input (zeros for
//! convolution and average pooling, −∞ for max pooling) and average pools are corrected by the
//! fraction of each window that counts.
//!
//! Depthwise convolution (`group == C_in`, one input channel per group) is run by a direct CPU
//! kernel: candle implements grouped convolution as one convolution per group, which for
//! depthwise layers means C tiny convolutions and dominates the run time of mobile networks.

use std::mem::MaybeUninit;

use candle_core::{DType, Result, Tensor, bail};
use rayon::prelude::*;

use super::ops::BinOp;
use super::proto::Attrs;
use crate::cost;
use crate::nn::fastconv::{self, ConvGeom, DepthwiseStage, Epilogue, FusedConv};
use crate::nn::{self, simd};

/// ONNX `auto_pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

impl AutoPad {
    fn parse(a: &Attrs<'_>) -> std::result::Result<Self, String> {
        match a.string("auto_pad").as_deref() {
            None | Some("NOTSET") | Some("") => Ok(AutoPad::NotSet),
            Some("SAME_UPPER") => Ok(AutoPad::SameUpper),
            Some("SAME_LOWER") => Ok(AutoPad::SameLower),
            Some("VALID") => Ok(AutoPad::Valid),
            Some(o) => Err(format!("unknown auto_pad `{o}`")),
        }
    }
}

fn positive(name: &str, v: Option<Vec<i64>>, min: i64) -> std::result::Result<Option<Vec<usize>>, String> {
    match v {
        None => Ok(None),
        Some(v) => {
            if v.iter().any(|&x| x < min) {
                return Err(format!("`{name}` {v:?} has values below {min}"));
            }
            Ok(Some(v.into_iter().map(|x| x as usize).collect()))
        }
    }
}

/// Attributes of a `Conv` node.
#[derive(Clone, Debug)]
pub(crate) struct ConvAttrs {
    kernel_shape: Option<Vec<usize>>,
    strides: Option<Vec<usize>>,
    dilations: Option<Vec<usize>>,
    pads: Option<Vec<usize>>,
    group: usize,
    auto_pad: AutoPad,
}

impl ConvAttrs {
    pub(crate) fn parse(a: &Attrs<'_>) -> std::result::Result<Self, String> {
        let group = a.int("group", 1);
        if group < 1 {
            return Err(format!("group {group} must be ≥ 1"));
        }
        Ok(Self {
            kernel_shape: positive("kernel_shape", a.ints("kernel_shape"), 1)?,
            strides: positive("strides", a.ints("strides"), 1)?,
            dilations: positive("dilations", a.ints("dilations"), 1)?,
            pads: positive("pads", a.ints("pads"), 0)?,
            group: group as usize,
            auto_pad: AutoPad::parse(a)?,
        })
    }
}

/// What a `Conv` node carries beyond its attributes once the graph is planned: its constant
/// weights and bias flattened on the host (read per batch by the CPU kernels instead of being
/// copied out of their tensors every time), the elementwise ops folded into its input, a ReLU
/// fused from the node that followed it (after any fused sum), and whether a fused sum goes to a
/// second output.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConvExtras {
    pub(crate) host: Option<HostConv>,
    pub(crate) input: Option<InputOps>,
    pub(crate) relu: bool,
    /// The node's outputs are the convolution's own output and then the ReLU of its sum with
    /// the operands planning fused into it (inputs 3..), instead of that ReLU alone.
    pub(crate) keep_own: bool,
}

/// Elementwise ops with a constant per input channel (or one for all), such as an input
/// normalisation `(x − mean)·scale`, that planning folded into the convolution reading their
/// result: they run in order on the convolution's input before its zero padding. On the CPU the
/// ops and the padding are one pass over the input (instead of one pass per op, and asymmetric
/// pads as two copies more); elsewhere they run as the graph's own broadcast ops. Same operations
/// in the same order as the unfused nodes, so the same values.
#[derive(Clone, Debug)]
pub(crate) struct InputOps {
    steps: Vec<InputStep>,
}

#[derive(Clone, Debug)]
struct InputStep {
    op: BinOp,
    /// The constant as the graph holds it (broadcasting over `[n, c, h, w]`).
    k: Tensor,
    /// Its values on the host, one or one per channel; `None` off the CPU or for other dtypes.
    host: Option<Vec<f32>>,
}

impl InputOps {
    /// The ops `steps` (in the order they run, each `x ∘ k`) for the input of a 2-D convolution
    /// with `attrs` and weights `w`, when every constant holds one value or one per input channel
    /// (so the result keeps the input's shape).
    pub(crate) fn try_new(steps: &[(BinOp, Tensor)], attrs: &ConvAttrs, w: &Tensor) -> Option<Self> {
        let (_, c_in_g, _, _) = w.dims4().ok()?;
        let c = c_in_g * attrs.group;
        // Of rank 4 at most, so that broadcasting keeps the input's rank too.
        let per_channel = |k: &Tensor| {
            let d = k.dims();
            d.len() <= 4
                && (k.elem_count() == 1 || (d.len() >= 3 && d[d.len() - 3] == c && k.elem_count() == c))
        };
        if steps.is_empty() || steps.iter().any(|(_, k)| !per_channel(k)) {
            return None;
        }
        let host = |k: &Tensor| {
            (k.device().is_cpu() && k.dtype() == DType::F32)
                .then(|| k.flatten_all()?.to_vec1::<f32>())
                .transpose()
        };
        let steps = steps
            .iter()
            .map(|(op, k)| Ok(InputStep { op: *op, k: k.clone(), host: host(k)? }))
            .collect::<Result<Vec<_>>>()
            .ok()?;
        Some(Self { steps })
    }

    /// The ops applied to `x` through candle (broadcasting), for inputs the CPU pass does not take.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for st in &self.steps {
            y = match st.op {
                BinOp::Add => y.broadcast_add(&st.k)?,
                BinOp::Sub => y.broadcast_sub(&st.k)?,
                BinOp::Mul => y.broadcast_mul(&st.k)?,
                BinOp::Div => y.broadcast_div(&st.k)?,
            };
        }
        Ok(y)
    }

    /// The ops applied to a contiguous CPU f32 `[n, c, h, w]` input, which is then padded with
    /// zeros by `pads` (top, left, bottom, right), in one pass; `None` for other inputs.
    fn apply_padded_cpu(&self, x: &Tensor, pads: [usize; 4]) -> Option<Result<Tensor>> {
        let (n, c, h, w) = x.dims4().ok()?;
        let ks: Vec<(BinOp, &[f32])> =
            self.steps.iter().map(|st| Some((st.op, st.host.as_deref()?))).collect::<Option<_>>()?;
        if ks.iter().any(|(_, k)| k.len() != 1 && k.len() != c) {
            return None;
        }
        let [top, left, bottom, right] = pads;
        let (hp, wp) = (h + top + bottom, w + left + right);
        let v = fastconv::cpu_f32(x, |src| {
            let plane = |(p, (o, s)): (usize, (&mut [MaybeUninit<f32>], &[f32]))| {
                let ch = p % c;
                let zero = |o: &mut [MaybeUninit<f32>]| o.iter_mut().for_each(|v| _ = v.write(0.0));
                zero(&mut o[..top * wp]);
                zero(&mut o[(top + h) * wp..]);
                for (row, s) in o[top * wp..(top + h) * wp].chunks_exact_mut(wp).zip(s.chunks_exact(w)) {
                    zero(&mut row[..left]);
                    zero(&mut row[left + w..]);
                    let mid = &mut row[left..left + w];
                    mid.iter_mut().zip(s).for_each(|(o, &v)| _ = o.write(v));
                    // SAFETY: every element of `mid` was just written.
                    let mid = unsafe { &mut *(std::ptr::from_mut(mid) as *mut [f32]) };
                    for &(op, k) in &ks {
                        channel_op(op, k[if k.len() == 1 { 0 } else { ch }], mid);
                    }
                }
            };
            // SAFETY: each plane of the output is written whole (pad rows, pad columns, interior).
            unsafe {
                nn::written(n * c * hp * wp, |o| {
                    if o.len() < PAR_MIN {
                        o.chunks_mut(hp * wp).zip(src.chunks(h * w)).enumerate().for_each(plane);
                    } else {
                        o.par_chunks_mut(hp * wp).zip(src.par_chunks(h * w)).enumerate().for_each(plane);
                    }
                })
            }
        })?;
        Some(Tensor::from_vec(v, (n, c, hp, wp), x.device()))
    }
}

/// `v ∘ k` in place for every value `v` of `xs`, one monomorphic loop per op (each vectorises).
fn channel_op(op: BinOp, k: f32, xs: &mut [f32]) {
    simd::vectorized(
        #[inline(always)]
        || match op {
            BinOp::Add => xs.iter_mut().for_each(|v| *v += k),
            BinOp::Sub => xs.iter_mut().for_each(|v| *v -= k),
            BinOp::Mul => xs.iter_mut().for_each(|v| *v *= k),
            BinOp::Div => xs.iter_mut().for_each(|v| *v /= k),
        },
    )
}

/// A convolution's weights `[c_out, c_in/group, kh, kw]` and bias, flattened f32 on the host.
#[derive(Clone, Debug)]
pub(crate) struct HostConv {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl HostConv {
    /// `None` for tensors that do not live on the CPU.
    pub(crate) fn new(w: &Tensor, b: Option<&Tensor>) -> Result<Option<Self>> {
        if !w.device().is_cpu() || b.is_some_and(|b| !b.device().is_cpu()) {
            return Ok(None);
        }
        let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        Ok(Some(Self { weight: flat(w)?, bias: b.map(flat).transpose()? }))
    }
}

/// Per-axis geometry of a sliding window.
#[derive(Clone, Copy, Debug)]
struct Axis {
    input: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    pad_begin: usize,
    pad_end: usize,
}

impl Axis {
    fn span(&self) -> usize {
        (self.kernel - 1) * self.dilation + 1
    }

    /// Output length without ceil mode.
    fn out_floor(&self) -> Result<usize> {
        let padded = self.input + self.pad_begin + self.pad_end;
        if padded < self.span() {
            bail!("window {} is larger than the padded input {padded}", self.span());
        }
        Ok((padded - self.span()) / self.stride + 1)
    }
}

/// Resolves explicit pads or `auto_pad` into per-axis geometry.
fn axes(
    input: &[usize],
    kernel: &[usize],
    strides: &Option<Vec<usize>>,
    dilations: &Option<Vec<usize>>,
    pads: &Option<Vec<usize>>,
    auto_pad: AutoPad,
) -> Result<Vec<Axis>> {
    let n = input.len();
    let pick = |v: &Option<Vec<usize>>, name: &str, default: usize| -> Result<Vec<usize>> {
        match v {
            None => Ok(vec![default; n]),
            Some(v) if v.len() == n => Ok(v.clone()),
            Some(v) => bail!("`{name}` {v:?} does not have {n} spatial entries"),
        }
    };
    let strides = pick(strides, "strides", 1)?;
    let dilations = pick(dilations, "dilations", 1)?;
    let pads = match pads {
        Some(p) if p.len() == 2 * n => p.clone(),
        Some(p) => bail!("`pads` {p:?} does not have {} entries", 2 * n),
        None => vec![0; 2 * n],
    };
    if kernel.len() != n {
        bail!("kernel {kernel:?} does not match the {n} spatial axes of the input");
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut ax = Axis {
            input: input[i],
            kernel: kernel[i],
            stride: strides[i],
            dilation: dilations[i],
            pad_begin: pads[i],
            pad_end: pads[i + n],
        };
        match auto_pad {
            AutoPad::NotSet => {}
            AutoPad::Valid => {
                ax.pad_begin = 0;
                ax.pad_end = 0;
            }
            AutoPad::SameUpper | AutoPad::SameLower => {
                let out_len = ax.input.div_ceil(ax.stride);
                let total = ((out_len - 1) * ax.stride + ax.span()).saturating_sub(ax.input);
                let small = total / 2;
                (ax.pad_begin, ax.pad_end) = if auto_pad == AutoPad::SameUpper {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
            }
        }
        out.push(ax);
    }
    Ok(out)
}

/// Pads (or, for negative amounts, crops) `x` along `axis` with `value`, or by repeating the edge.
pub(crate) fn pad_axis(
    x: &Tensor,
    axis: usize,
    before: i64,
    after: i64,
    value: f32,
    edge: bool,
) -> Result<Tensor> {
    let mut y = x.clone();
    if before < 0 || after < 0 {
        let len = y.dim(axis)? as i64;
        let start = (-before).max(0);
        let stop = len - (-after).max(0);
        if stop < start {
            bail!("negative pads ({before}, {after}) remove more than the {len} elements of axis {axis}");
        }
        y = y.narrow(axis, start as usize, (stop - start) as usize)?;
    }
    let (b, a) = (before.max(0) as usize, after.max(0) as usize);
    if b == 0 && a == 0 {
        return Ok(y);
    }
    if edge {
        return y.pad_with_same(axis, b, a);
    }
    if value == 0.0 {
        return y.pad_with_zeros(axis, b, a);
    }
    let block = |n: usize| -> Result<Tensor> {
        let mut dims = y.dims().to_vec();
        dims[axis] = n;
        Tensor::full(value, dims, y.device())?.to_dtype(y.dtype())
    };
    let mut parts = Vec::with_capacity(3);
    if b > 0 {
        parts.push(block(b)?);
    }
    parts.push(y.clone());
    if a > 0 {
        parts.push(block(a)?);
    }
    Tensor::cat(&parts, axis)
}

/// ONNX `Conv` for 1-D and 2-D inputs (`[N, C, L]` or `[N, C, H, W]`), plus the sum with `adds`
/// (operands planning fused into it), followed by a ReLU when `extras.relu`: one output, or the
/// convolution's own and then the sum with `extras.keep_own`.
pub(crate) fn conv(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    adds: &[&Tensor],
    c: &ConvAttrs,
    extras: &ConvExtras,
) -> Result<Vec<Tensor>> {
    match x.rank() {
        3 if adds.iter().any(|a| a.rank() > 3) => {
            // An operand that broadcasts the output to a higher rank: added afterwards.
            let y = conv(x, w, b, &[], c, &ConvExtras { relu: false, keep_own: false, ..extras.clone() })?;
            finish_sum(one(y)?, adds, extras)
        }
        3 => {
            // A 1-D convolution is a 2-D one over a height-1 image.
            let lift =
                |v: &Option<Vec<usize>>, pad: usize| v.as_ref().map(|v| [vec![pad], v.clone()].concat());
            let c2 = ConvAttrs {
                kernel_shape: c.kernel_shape.as_ref().map(|k| [vec![1], k.clone()].concat()),
                strides: lift(&c.strides, 1),
                dilations: lift(&c.dilations, 1),
                pads: c.pads.as_ref().map(|p| vec![0, p[0], 0, *p.get(1).unwrap_or(&0)]),
                ..c.clone()
            };
            // The flattened host weights keep their order with the added axis.
            // The operands get the same height-1 axis (their trailing axes align with the output's).
            let adds = adds
                .iter()
                .map(|r| if r.rank() == 0 { Ok((*r).clone()) } else { r.unsqueeze(r.rank() - 1) })
                .collect::<Result<Vec<_>>>()?;
            let adds: Vec<&Tensor> = adds.iter().collect();
            conv(&x.unsqueeze(2)?, &w.unsqueeze(2)?, b, &adds, &c2, extras)?
                .into_iter()
                .map(|y| y.squeeze(2))
                .collect()
        }
        4 => conv2d(x, w, b, adds, c, extras),
        r => bail!("only 1-D and 2-D convolutions are supported, input has rank {r}"),
    }
}

/// The only output of a convolution without a fused sum.
fn one(mut ys: Vec<Tensor>) -> Result<Tensor> {
    match ys.len() {
        1 => Ok(ys.swap_remove(0)),
        n => bail!("a convolution without a fused sum returned {n} outputs"),
    }
}

fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    adds: &[&Tensor],
    c: &ConvAttrs,
    extras: &ConvExtras,
) -> Result<Vec<Tensor>> {
    let (_, c_in, h, wd) = x.dims4()?;
    let (c_out, c_in_g, kh, kw) = w.dims4()?;
    if let Some(k) = &c.kernel_shape
        && k.as_slice() != [kh, kw]
    {
        bail!("kernel_shape {k:?} does not match the weight shape {:?}", w.dims());
    }
    if c_in_g * c.group != c_in || !c_out.is_multiple_of(c.group) {
        bail!("input channels {c_in} / weight {:?} do not fit group {}", w.dims(), c.group);
    }
    let [ay, ax]: [Axis; 2] = axes(&[h, wd], &[kh, kw], &c.strides, &c.dilations, &c.pads, c.auto_pad)?
        .try_into()
        .expect("two axes");
    let Some(ops) = &extras.input else { return conv2d_planned(x, w, b, adds, c, extras, [ay, ax]) };
    let pads = [ay.pad_begin, ax.pad_begin, ay.pad_end, ax.pad_end];
    match ops.apply_padded_cpu(x, pads) {
        Some(xp) => {
            // The padding is done: the convolution runs over the padded input with none.
            let xp = xp?;
            let (_, _, hp, wp) = xp.dims4()?;
            let unpadded = |a: Axis, input: usize| Axis { input, pad_begin: 0, pad_end: 0, ..a };
            conv2d_planned(&xp, w, b, adds, c, extras, [unpadded(ay, hp), unpadded(ax, wp)])
        }
        None => conv2d_planned(&ops.apply(x)?, w, b, adds, c, extras, [ay, ax]),
    }
}

/// [`conv2d`] once its input is ready (the folded input ops applied) and its axes resolved.
fn conv2d_planned(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    adds: &[&Tensor],
    c: &ConvAttrs,
    extras: &ConvExtras,
    [ay, ax]: [Axis; 2],
) -> Result<Vec<Tensor>> {
    let (n, c_in, h, wd) = x.dims4()?;
    let (c_out, c_in_g, kh, kw) = w.dims4()?;
    let (oh, ow) = (ay.out_floor()?, ax.out_floor()?);
    let depthwise = c.group == c_in && c_in_g == 1;
    let dense_fast = c.group == 1 && ay.dilation == 1 && ax.dilation == 1;
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
    let relu = extras.relu;
    // The host weights: prepared with the graph, or flattened now.
    let made;
    let host = match (&extras.host, cpu_f32 && (depthwise || dense_fast)) {
        (_, false) => None,
        (Some(h), true) => Some(h),
        (None, true) => {
            made = HostConv::new(w, b)?;
            made.as_ref()
        }
    };
    // The sum comes before the ReLU: a kernel that cannot take it leaves both to the end.
    let relu_now = relu && adds.is_empty();
    let fast = match host {
        Some(hc) if depthwise => {
            let x = x.contiguous()?;
            let dw = Depthwise { host: hc, c_out, y: ay, x: ax, out: (oh, ow), relu: relu_now };
            fastconv::cpu_f32(&x, |src| dw.run(src, n, c_in, h, wd))
                .map(|v| Tensor::from_vec(v, (n, c_out, oh, ow), x.device()))
                .transpose()?
        }
        Some(hc) => {
            let sum = fastconv::Sum { adds, keep_own: extras.keep_own };
            if let Some(ys) = fast_conv2d(x, hc, (c_out, c_in, kh, kw), ay, ax, relu, sum)? {
                cost::record(cost::conv2d_macs(ys[0].dims(), c_in_g, kh, kw));
                return Ok(ys);
            }
            match adds {
                [] => None,
                _ => fast_conv2d(x, hc, (c_out, c_in, kh, kw), ay, ax, relu_now, fastconv::Sum::default())?
                    .map(one)
                    .transpose()?,
            }
        }
        None => None,
    };
    let y = match fast {
        Some(y) => y,
        None => {
            if ay.stride != ax.stride || ay.dilation != ax.dilation {
                bail!("strides/dilations that differ between H and W are not supported");
            }
            let symmetric =
                ay.pad_begin == ay.pad_end && ax.pad_begin == ax.pad_end && ay.pad_begin == ax.pad_begin;
            // A 3×3 depthwise convolution off the CPU: nine shifted multiply-adds, not candle's
            // one convolution per channel.
            let composed = depthwise
                && c_out == c_in
                && (kh, kw, ay.dilation) == (3, 3, 1)
                && (ay.stride == 1 || ay.stride == 2)
                && !x.device().is_cpu();
            let (xp, pad) = if symmetric {
                (x.clone(), ay.pad_begin)
            } else {
                let xp = pad_axis(x, 2, ay.pad_begin as i64, ay.pad_end as i64, 0.0, false)?;
                (pad_axis(&xp, 3, ax.pad_begin as i64, ax.pad_end as i64, 0.0, false)?, 0)
            };
            let y = if composed {
                let xp =
                    if pad > 0 { xp.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)? } else { xp };
                crate::nn::depthwise::depthwise3x3_padded(&xp, w, ay.stride, (oh, ow))?
            } else {
                nn::candle_conv2d(&xp, w, pad, ay.stride, ay.dilation, c.group)?
            };
            let bias = b.map(|b| b.reshape((1, c_out, 1, 1))).transpose()?;
            // On a GPU: the bias, the sum and the ReLU in one pass.
            if !adds.is_empty()
                && !extras.keep_own
                && let Some(total) = nn::channel_epilogue(&y, None, bias.as_ref(), adds, relu)?
            {
                cost::record(cost::conv2d_macs(total.dims(), c_in_g, kh, kw));
                return Ok(vec![total]);
            }
            match nn::channel_epilogue(&y, None, bias.as_ref(), &[], relu_now)? {
                Some(y) => y,
                None => {
                    let y = match &bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    };
                    if relu_now { y.relu()? } else { y }
                }
            }
        }
    };
    cost::record(cost::conv2d_macs(y.dims(), c_in_g, kh, kw));
    finish_sum(y, adds, extras)
}

/// The outputs of a convolution `y` (its ReLU applied when there are no `adds`) for paths that
/// could not fuse the sum: `relu?(y + Σ adds)` (broadcasting), after `y` with `extras.keep_own`.
fn finish_sum(y: Tensor, adds: &[&Tensor], extras: &ConvExtras) -> Result<Vec<Tensor>> {
    if adds.is_empty() {
        return Ok(vec![y]);
    }
    let operands: Vec<&Tensor> = std::iter::once(&y).chain(adds.iter().copied()).collect();
    let total = sum(&operands, extras.relu)?;
    Ok(if extras.keep_own { vec![y, total] } else { vec![total] })
}

/// A dense (one group, no dilation) convolution of a CPU f32 input through [`fastconv`], with
/// the bias, the `sum` and the ReLU fused; `None` where the input (or an operand of the sum) is not
/// a contiguous CPU f32 tensor (of the output's shape).
fn fast_conv2d(
    x: &Tensor,
    host: &HostConv,
    (c_out, c_in, kh, kw): (usize, usize, usize, usize),
    ay: Axis,
    ax: Axis,
    relu: bool,
    sum: fastconv::Sum<'_>,
) -> Result<Option<Vec<Tensor>>> {
    // Symmetric padding per axis is part of the geometry; otherwise pad explicitly first.
    let (xp, pad_h, pad_w) = if ay.pad_begin == ay.pad_end && ax.pad_begin == ax.pad_end {
        (x.clone(), ay.pad_begin, ax.pad_begin)
    } else {
        let xp = pad_axis(x, 2, ay.pad_begin as i64, ay.pad_end as i64, 0.0, false)?;
        (pad_axis(&xp, 3, ax.pad_begin as i64, ax.pad_end as i64, 0.0, false)?, 0, 0)
    };
    let geom = ConvGeom { c_in, c_out, kh, kw, stride_h: ay.stride, stride_w: ax.stride, pad_h, pad_w };
    let epi = Epilogue { bias: host.bias.as_deref(), relu, accumulate: false };
    fastconv::conv2d_tensor_sum(&FusedConv { geom, weight: &host.weight, pre: None, epi }, &xp, sum)
}

/// A depthwise convolution fused with the 1×1 convolution that was its only reader (planned by
/// the graph): on the CPU the depthwise output is computed tile by tile into the pointwise gemm's
/// input and never stored ([`fastconv::separable_tensor`]).
#[derive(Clone, Debug)]
pub(crate) struct Separable {
    dw: ConvAttrs,
    dw_w: Tensor,
    dw_b: Option<Tensor>,
    dw_extras: ConvExtras,
    pw: ConvAttrs,
    pw_extras: ConvExtras,
}

impl Separable {
    /// Whether a ReLU follows the pointwise convolution.
    pub(crate) fn relu(&self) -> bool {
        self.pw_extras.relu
    }

    /// Fuses a sum after the pointwise convolution (its operands become the node's inputs 3..),
    /// then a ReLU when `relu`; with `keep_own` the pointwise output stays the first output and
    /// the sum becomes the second.
    pub(crate) fn fuse_sum(&mut self, relu: bool, keep_own: bool) {
        self.pw_extras.relu = relu;
        self.pw_extras.keep_own = keep_own;
    }

    /// The pair when the first is a depthwise convolution (one input channel per group, one
    /// output per channel) and the second a single-group 1×1 convolution, both with host weights.
    pub(crate) fn try_new(
        (dw, dw_w, dw_b, dw_extras): (&ConvAttrs, &Tensor, Option<&Tensor>, &ConvExtras),
        (pw, pw_w, pw_extras): (&ConvAttrs, &Tensor, &ConvExtras),
    ) -> Option<Self> {
        let (dc, dcg, _, _) = dw_w.dims4().ok()?;
        let (_, pc, pkh, pkw) = pw_w.dims4().ok()?;
        let fits = dcg == 1 && dw.group == dc && pc == dc && (pkh, pkw) == (1, 1) && pw.group == 1;
        // The one-pass path reads the depthwise input as it is.
        let fits = fits && dw_extras.input.is_none() && pw_extras.input.is_none();
        (fits && dw_extras.host.is_some() && pw_extras.host.is_some()).then(|| Self {
            dw: dw.clone(),
            dw_w: dw_w.clone(),
            dw_b: dw_b.cloned(),
            dw_extras: dw_extras.clone(),
            pw: pw.clone(),
            pw_extras: pw_extras.clone(),
        })
    }
}

/// The fused pair on input `x`, with the pointwise weights `w` and bias `b` (the node's inputs),
/// plus the sum with `adds` (a fused sum) before the pointwise ReLU; outputs as [`conv`]'s.
pub(crate) fn separable(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    adds: &[&Tensor],
    s: &Separable,
) -> Result<Vec<Tensor>> {
    if let Some(ys) = separable_fast(x, w, adds, s)? {
        return Ok(ys);
    }
    let mid = one(conv(x, &s.dw_w, s.dw_b.as_ref(), &[], &s.dw, &s.dw_extras)?)?;
    conv(&mid, w, b, adds, &s.pw, &s.pw_extras)
}

/// The one-pass path; `None` where it does not apply (other devices or dtypes, dilation,
/// asymmetric padding, a strided or padded pointwise convolution): the caller runs the two
/// convolutions one after the other.
fn separable_fast(x: &Tensor, w: &Tensor, adds: &[&Tensor], s: &Separable) -> Result<Option<Vec<Tensor>>> {
    let (Some(dh), Some(ph)) = (&s.dw_extras.host, &s.pw_extras.host) else { return Ok(None) };
    if x.rank() != 4 || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, c, h, wd) = x.dims4()?;
    let (dc, _, kh, kw) = s.dw_w.dims4()?;
    let (co, _, _, _) = w.dims4()?;
    let shape_ok = |a: &ConvAttrs, k: [usize; 2]| a.kernel_shape.as_ref().is_none_or(|ks| ks.as_slice() == k);
    if dc != c || !shape_ok(&s.dw, [kh, kw]) || !shape_ok(&s.pw, [1, 1]) {
        return Ok(None);
    }
    let [ay, ax]: [Axis; 2] =
        axes(&[h, wd], &[kh, kw], &s.dw.strides, &s.dw.dilations, &s.dw.pads, s.dw.auto_pad)?
            .try_into()
            .expect("two axes");
    if ay.dilation != 1 || ax.dilation != 1 {
        return Ok(None);
    }
    let (oh, ow) = (ay.out_floor()?, ax.out_floor()?);
    let [py, px]: [Axis; 2] =
        axes(&[oh, ow], &[1, 1], &s.pw.strides, &s.pw.dilations, &s.pw.pads, s.pw.auto_pad)?
            .try_into()
            .expect("two axes");
    if py.stride != 1 || px.stride != 1 || py.pad_begin + py.pad_end + px.pad_begin + px.pad_end != 0 {
        return Ok(None);
    }
    let stage = DepthwiseStage {
        geom: ConvGeom {
            c_in: c,
            c_out: c,
            kh,
            kw,
            stride_h: ay.stride,
            stride_w: ax.stride,
            pad_h: ay.pad_begin,
            pad_w: ax.pad_begin,
        },
        pad_end: (ay.pad_begin != ay.pad_end || ax.pad_begin != ax.pad_end)
            .then_some((ay.pad_end, ax.pad_end)),
        weight: &dh.weight,
        bias: dh.bias.as_deref(),
        relu: s.dw_extras.relu,
    };
    let pw = FusedConv {
        geom: ConvGeom::square(c, co, 1, 1, 0),
        weight: &ph.weight,
        pre: None,
        epi: Epilogue { bias: ph.bias.as_deref(), relu: s.pw_extras.relu, accumulate: false },
    };
    let ys =
        fastconv::separable_tensor(&stage, &pw, x, fastconv::Sum { adds, keep_own: s.pw_extras.keep_own })?;
    if let Some(ys) = &ys {
        cost::record(cost::conv2d_macs(&[n, c, oh, ow], 1, kh, kw));
        cost::record(cost::conv2d_macs(ys[0].dims(), c, 1, 1));
    }
    Ok(ys)
}

/// Elements below which an elementwise op runs on one thread: splitting smaller maps costs more
/// than it saves.
const PAR_MIN: usize = 1 << 14;

/// `f` over every element of a contiguous CPU f32 tensor, in parallel above [`PAR_MIN`]; `None`
/// for other tensors (callers use candle's op). Cheaper than candle's generic elementwise path
/// for the many small maps of a mobile network at batch 1.
pub(crate) fn cpu_map(x: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> Option<Result<Tensor>> {
    let v = fastconv::cpu_f32(x, |a| {
        let run = |(o, a): (&mut [MaybeUninit<f32>], &[f32])| {
            simd::vectorized(
                #[inline(always)]
                || o.iter_mut().zip(a).for_each(|(o, &a)| _ = o.write(f(a))),
            )
        };
        // SAFETY: the chunks cover the buffer and every element of each is written.
        unsafe {
            nn::written(a.len(), |o| {
                if a.len() < PAR_MIN {
                    run((o, a));
                } else {
                    o.par_chunks_mut(PAR_MIN / 2).zip(a.par_chunks(PAR_MIN / 2)).for_each(run);
                }
            })
        }
    })?;
    Some(Tensor::from_vec(v, x.shape(), x.device()))
}

/// Matching chunks of the two operands of [`cpu_zip`].
type Operands<'a> = (&'a [f32], &'a [f32]);

/// `f(x, y)` elementwise for two contiguous CPU f32 tensors of the same shape; `None` otherwise
/// (broadcasting and other dtypes go through candle).
pub(crate) fn cpu_zip(x: &Tensor, y: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Option<Result<Tensor>> {
    if x.dims() != y.dims() {
        return None;
    }
    let v = fastconv::cpu_f32(x, |a| {
        fastconv::cpu_f32(y, |b| {
            let run = |(o, (a, b)): (&mut [MaybeUninit<f32>], Operands<'_>)| {
                simd::vectorized(
                    #[inline(always)]
                    || o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| _ = o.write(f(a, b))),
                )
            };
            // SAFETY: the chunks cover the buffer and every element of each is written.
            unsafe {
                nn::written(a.len(), |o| {
                    if a.len() < PAR_MIN {
                        run((o, (a, b)));
                    } else {
                        let chunks = a.par_chunks(PAR_MIN / 2).zip(b.par_chunks(PAR_MIN / 2));
                        o.par_chunks_mut(PAR_MIN / 2).zip(chunks).for_each(run);
                    }
                })
            }
        })
    })??;
    Some(Tensor::from_vec(v, x.shape(), x.device()))
}

/// `Σ xs` (then a ReLU when `relu`), broadcasting: [`cpu_sum`] where it applies, one pass of
/// [`nn::channel_epilogue`] on a GPU, else candle's additions one after the other. `xs` holds at
/// least one tensor.
pub(crate) fn sum(xs: &[&Tensor], relu: bool) -> Result<Tensor> {
    if let Some(s) = cpu_sum(xs, relu) {
        return s;
    }
    let Some((first, rest)) = xs.split_first() else { bail!("a sum of no tensors") };
    if !rest.is_empty()
        && let Some(s) = nn::channel_epilogue(first, None, None, rest, relu)?
    {
        return Ok(s);
    }
    let mut acc = (*first).clone();
    for x in rest {
        acc = acc.broadcast_add(x)?;
    }
    if relu { acc.relu() } else { Ok(acc) }
}

/// `Σ xs` (then a ReLU when `relu`) for contiguous CPU f32 tensors of one shape, in one pass:
/// each chunk of the output is summed in a buffer that stays in cache while every operand's chunk
/// is added, then written once. `None` for other tensors (broadcasting goes through candle).
fn cpu_sum(xs: &[&Tensor], relu: bool) -> Option<Result<Tensor>> {
    let first = xs.first()?;
    if xs.iter().any(|t| t.dims() != first.dims()) {
        return None;
    }
    let v = fastconv::cpu_f32_all(xs, |srcs| {
        const CHUNK: usize = 1024;
        let len = srcs[0].len();
        let run = |(c, o): (usize, &mut [MaybeUninit<f32>])| {
            simd::vectorized(
                #[inline(always)]
                || {
                    let at = c * CHUNK;
                    let mut acc = [0f32; CHUNK];
                    let acc = &mut acc[..o.len()];
                    acc.copy_from_slice(&srcs[0][at..at + o.len()]);
                    for s in &srcs[1..] {
                        acc.iter_mut().zip(&s[at..at + o.len()]).for_each(|(a, &v)| *a += v);
                    }
                    for (o, &a) in o.iter_mut().zip(acc.iter()) {
                        o.write(if relu { a.max(0.0) } else { a });
                    }
                },
            )
        };
        // SAFETY: the chunks cover the buffer and every element of each is written.
        unsafe {
            nn::written(len, |spare| {
                if len < PAR_MIN {
                    spare.chunks_mut(CHUNK).enumerate().for_each(run);
                } else {
                    spare.par_chunks_mut(CHUNK).enumerate().for_each(run);
                }
            })
        }
    })?;
    Some(Tensor::from_vec(v, first.shape(), first.device()))
}

/// Direct depthwise convolution (one input channel per group, `c_out = m·c_in`) with bias and an
/// optional ReLU.
struct Depthwise<'a> {
    host: &'a HostConv,
    c_out: usize,
    y: Axis,
    x: Axis,
    out: (usize, usize),
    relu: bool,
}

impl Depthwise<'_> {
    fn run(&self, src: &[f32], n: usize, c_in: usize, h: usize, w: usize) -> Vec<f32> {
        let (oh, ow) = self.out;
        let mult = self.c_out / c_in;
        let (kh, kw) = (self.y.kernel, self.x.kernel);
        let (sy, sx, dy, dx) = (self.y.stride, self.x.stride, self.y.dilation, self.x.dilation);
        let (py, px) = (self.y.pad_begin as isize, self.x.pad_begin as isize);
        // Output columns whose input column stays inside the image, for kernel column j.
        let col_range = |j: usize| -> (usize, usize) {
            let off = (j * dx) as isize - px;
            let lo = if off >= 0 { 0 } else { ((-off) as usize).div_ceil(sx) };
            let hi_excl =
                if (w as isize - off) <= 0 { 0 } else { ((w as isize - off - 1) as usize) / sx + 1 };
            (lo.min(ow), hi_excl.min(ow))
        };
        let ranges: Vec<(usize, usize)> = (0..kw).map(col_range).collect();
        let mut dst = vec![0f32; n * self.c_out * oh * ow];
        let plane_out = |(plane, out): (usize, &mut [f32])| {
            let co = plane % self.c_out;
            let img = plane / self.c_out;
            let inp = &src[(img * c_in + co / mult) * h * w..][..h * w];
            let wk = &self.host.weight[co * kh * kw..][..kh * kw];
            out.fill(self.host.bias.as_ref().map_or(0.0, |b| b[co]));
            for oy in 0..oh {
                let row = &mut out[oy * ow..][..ow];
                for i in 0..kh {
                    let iy = (oy * sy + i * dy) as isize - py;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let in_row = &inp[iy as usize * w..][..w];
                    for (j, &(lo, hi)) in ranges.iter().enumerate() {
                        if lo >= hi {
                            continue;
                        }
                        let wv = wk[i * kw + j];
                        let start = (lo * sx + j * dx) as isize - px;
                        if sx == 1 {
                            let src_row = &in_row[start as usize..][..hi - lo];
                            for (o, s) in row[lo..hi].iter_mut().zip(src_row) {
                                *o += wv * s;
                            }
                        } else {
                            for (k, o) in row[lo..hi].iter_mut().enumerate() {
                                *o += wv * in_row[start as usize + k * sx];
                            }
                        }
                    }
                }
            }
            if self.relu {
                out.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        };
        // Small planes are grouped so each task has enough work to pay for its scheduling.
        let plane = oh * ow;
        let per_task = (PAR_MIN / plane.max(1)).max(1);
        dst.par_chunks_mut(plane * per_task).enumerate().for_each(|(t, chunk)| {
            chunk.chunks_mut(plane).enumerate().for_each(|(i, out)| plane_out((t * per_task + i, out)));
        });
        dst
    }
}

/// Max or average pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PoolKind {
    Max,
    Average,
}

/// Attributes of a `MaxPool` / `AveragePool` node.
#[derive(Clone, Debug)]
pub(crate) struct PoolAttrs {
    kind: PoolKind,
    kernel: Vec<usize>,
    strides: Option<Vec<usize>>,
    pads: Option<Vec<usize>>,
    auto_pad: AutoPad,
    ceil_mode: bool,
    count_include_pad: bool,
}

impl PoolAttrs {
    pub(crate) fn parse(a: &Attrs<'_>, kind: PoolKind) -> std::result::Result<Self, String> {
        let kernel = positive("kernel_shape", a.ints("kernel_shape"), 1)?
            .ok_or_else(|| "missing required attribute `kernel_shape`".to_string())?;
        if let Some(d) = a.ints("dilations")
            && d.iter().any(|&v| v != 1)
        {
            return Err(format!("dilations {d:?} are not supported for pooling"));
        }
        if a.int("storage_order", 0) != 0 {
            return Err("storage_order=1 is not supported".into());
        }
        Ok(Self {
            kind,
            kernel,
            strides: positive("strides", a.ints("strides"), 1)?,
            pads: positive("pads", a.ints("pads"), 0)?,
            auto_pad: AutoPad::parse(a)?,
            ceil_mode: a.int("ceil_mode", 0) != 0,
            count_include_pad: a.int("count_include_pad", 0) != 0,
        })
    }
}

/// ONNX pooling over `[N, C, L]` or `[N, C, H, W]`.
///
/// Output length per axis is `⌊(L + pads − k)/s⌋ + 1`, or with `ceil_mode` `⌈…⌉ + 1` minus one
/// when the last window would start inside the end padding (so every window sees input or
/// begin-padding). Average pooling divides by the window's count of input elements, plus the
/// explicit pads when `count_include_pad` (never the extra cells added by `ceil_mode`).
pub(crate) fn pool(x: &Tensor, p: &PoolAttrs) -> Result<Tensor> {
    if x.rank() == 3 {
        let p2 = PoolAttrs {
            kernel: [vec![1], p.kernel.clone()].concat(),
            strides: p.strides.as_ref().map(|s| [vec![1], s.clone()].concat()),
            pads: p.pads.as_ref().map(|v| vec![0, v[0], 0, *v.get(1).unwrap_or(&0)]),
            ..p.clone()
        };
        return pool(&x.unsqueeze(2)?, &p2)?.squeeze(2);
    }
    let (_n, _c, h, w) = x.dims4()?;
    let geo = axes(&[h, w], &p.kernel, &p.strides, &None, &p.pads, p.auto_pad)?;
    let mut padded_len = [0usize; 2];
    let mut masks: Vec<Vec<f32>> = Vec::with_capacity(2);
    let mut needs_correction = false;
    let mut xp = x.clone();
    for (i, ax) in geo.iter().enumerate() {
        let mut out = ax.out_floor()?;
        if p.ceil_mode && p.auto_pad == AutoPad::NotSet {
            let padded = ax.input + ax.pad_begin + ax.pad_end;
            out = (padded - ax.kernel).div_ceil(ax.stride) + 1;
            if (out - 1) * ax.stride >= ax.input + ax.pad_begin {
                out -= 1;
            }
        }
        let need = (out - 1) * ax.stride + ax.kernel;
        let end = need.saturating_sub(ax.input + ax.pad_begin);
        padded_len[i] = ax.input + ax.pad_begin + end;
        let fill = if p.kind == PoolKind::Max { f32::NEG_INFINITY } else { 0.0 };
        xp = pad_axis(&xp, 2 + i, ax.pad_begin as i64, end as i64, fill, false)?;
        // Which padded positions count towards an average's divisor.
        let counted_end =
            if p.count_include_pad { ax.input + ax.pad_begin + ax.pad_end } else { ax.input + ax.pad_begin };
        let counted_start = if p.count_include_pad { 0 } else { ax.pad_begin };
        let m: Vec<f32> = (0..padded_len[i])
            .map(|j| if j >= counted_start && j < counted_end { 1.0 } else { 0.0 })
            .collect();
        needs_correction |= m.contains(&0.0);
        masks.push(m);
    }
    let (kh, kw) = (p.kernel[0], p.kernel[1]);
    let (sh, sw) = (geo[0].stride, geo[1].stride);
    match p.kind {
        PoolKind::Max => xp.max_pool2d_with_stride((kh, kw), (sh, sw)),
        PoolKind::Average => {
            let y = xp.avg_pool2d_with_stride((kh, kw), (sh, sw))?;
            if !needs_correction {
                return Ok(y);
            }
            let (hp, wp) = (padded_len[0], padded_len[1]);
            let mut m2 = Vec::with_capacity(hp * wp);
            for a in &masks[0] {
                for b in &masks[1] {
                    m2.push(a * b);
                }
            }
            let frac = Tensor::from_vec(m2, (1, 1, hp, wp), x.device())?
                .to_dtype(x.dtype())?
                .avg_pool2d_with_stride((kh, kw), (sh, sw))?;
            y.broadcast_div(&frac)
        }
    }
}
