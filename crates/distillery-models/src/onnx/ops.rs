//! The operators: each node is parsed once into an [`Op`] (attributes decoded and checked at load
//! time, so a bad model fails when it is opened) and executed per batch on candle tensors.

use candle_core::{D, DType, Device, Result, Tensor, bail};
use candle_onnx::onnx::NodeProto;

use super::kernels::{self, ConvAttrs, ConvExtras, PoolAttrs, PoolKind, Separable};
use super::proto::{Attrs, cast_dtype, tensor_from_proto};
use crate::cost;

/// Element-wise binary operators with NumPy broadcasting.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// Element-wise unary operators without attributes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum UnaryOp {
    Relu,
    Sigmoid,
    Tanh,
    Exp,
    Log,
    Sqrt,
    Neg,
    Abs,
    Reciprocal,
}

/// One parsed node.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// Identity, and Dropout at inference.
    Identity,
    Constant(Tensor),
    /// The extras are filled in when the graph is planned (see `OnnxGraph::fuse`).
    Conv(ConvAttrs, ConvExtras),
    /// A depthwise `Conv` fused into the 1×1 `Conv` that was its only reader; inputs are the
    /// depthwise input and the pointwise weights and bias.
    Separable(Box<Separable>),
    BatchNorm {
        eps: f64,
    },
    Unary(UnaryOp),
    LeakyRelu {
        alpha: f64,
    },
    HardSigmoid {
        alpha: f64,
        beta: f64,
    },
    HardSwish,
    /// `min`/`max` from attributes (opset < 11); from inputs 1 and 2 otherwise.
    Clip {
        min: Option<f32>,
        max: Option<f32>,
        from_inputs: bool,
    },
    Pool(PoolAttrs),
    GlobalPool {
        max: bool,
    },
    Gemm {
        alpha: f64,
        beta: f64,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
    Flatten {
        axis: i64,
    },
    Reshape {
        allowzero: bool,
    },
    Transpose {
        perm: Option<Vec<usize>>,
    },
    Concat {
        axis: i64,
    },
    Binary(BinOp),
    /// The sum of all inputs (then a ReLU when `relu`), planned from an `Add` whose only use was a
    /// `Relu`, or from a chain of `Add`s whose intermediate sums nothing else reads: one pass over
    /// the operands.
    AddN {
        relu: bool,
    },
    /// `coerce_2d`: opset < 13 semantics (flatten to 2-D at `axis`, normalise the second part).
    Softmax {
        axis: i64,
        coerce_2d: bool,
    },
    /// `pads`/`value` from attributes (opset < 11) or inputs.
    Pad {
        edge: bool,
        pads: Option<Vec<i64>>,
        value: f32,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Gather {
        axis: i64,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Cast {
        to: DType,
    },
}

/// Why a node could not be parsed: unknown op, or a known op with attributes we cannot honour.
pub(crate) enum ParseError {
    Unsupported,
    Bad(String),
}

impl Op {
    /// Parses `node` under `opset` (the model's default-domain opset version).
    pub(crate) fn parse(
        node: &NodeProto,
        opset: i64,
        device: &Device,
    ) -> std::result::Result<Op, ParseError> {
        use ParseError::{Bad, Unsupported};
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(Unsupported);
        }
        let a = Attrs::new(node);
        let op = match node.op_type.as_str() {
            "Identity" => Op::Identity,
            "Dropout" => {
                if node.output.len() > 1 && !node.output[1].is_empty() {
                    return Err(Bad("the Dropout mask output is not supported".into()));
                }
                Op::Identity
            }
            "Constant" => Op::Constant(constant_value(&a, device).map_err(Bad)?),
            "Conv" => Op::Conv(ConvAttrs::parse(&a).map_err(Bad)?, ConvExtras::default()),
            "BatchNormalization" => {
                if a.int("training_mode", 0) != 0 {
                    return Err(Bad("training_mode=1 is not supported (inference only)".into()));
                }
                if node.output.iter().skip(1).any(|o| !o.is_empty()) {
                    return Err(Bad("running mean/var outputs are not supported (inference only)".into()));
                }
                Op::BatchNorm { eps: a.float("epsilon", 1e-5) as f64 }
            }
            "Relu" => Op::Unary(UnaryOp::Relu),
            "Sigmoid" => Op::Unary(UnaryOp::Sigmoid),
            "Tanh" => Op::Unary(UnaryOp::Tanh),
            "Exp" => Op::Unary(UnaryOp::Exp),
            "Log" => Op::Unary(UnaryOp::Log),
            "Sqrt" => Op::Unary(UnaryOp::Sqrt),
            "Neg" => Op::Unary(UnaryOp::Neg),
            "Abs" => Op::Unary(UnaryOp::Abs),
            "Reciprocal" => Op::Unary(UnaryOp::Reciprocal),
            "LeakyRelu" => Op::LeakyRelu { alpha: a.float("alpha", 0.01) as f64 },
            "HardSigmoid" => {
                Op::HardSigmoid { alpha: a.float("alpha", 0.2) as f64, beta: a.float("beta", 0.5) as f64 }
            }
            "HardSwish" => Op::HardSwish,
            "Clip" => {
                if opset < 11 {
                    Op::Clip {
                        min: Some(a.float("min", f32::NEG_INFINITY)),
                        max: Some(a.float("max", f32::INFINITY)),
                        from_inputs: false,
                    }
                } else {
                    Op::Clip { min: None, max: None, from_inputs: true }
                }
            }
            "MaxPool" => {
                if node.output.len() > 1 && !node.output[1].is_empty() {
                    return Err(Bad("the MaxPool indices output is not supported".into()));
                }
                Op::Pool(PoolAttrs::parse(&a, PoolKind::Max).map_err(Bad)?)
            }
            "AveragePool" => Op::Pool(PoolAttrs::parse(&a, PoolKind::Average).map_err(Bad)?),
            "GlobalAveragePool" => Op::GlobalPool { max: false },
            "GlobalMaxPool" => Op::GlobalPool { max: true },
            "Gemm" => Op::Gemm {
                alpha: a.float("alpha", 1.0) as f64,
                beta: a.float("beta", 1.0) as f64,
                trans_a: a.int("transA", 0) != 0,
                trans_b: a.int("transB", 0) != 0,
            },
            "MatMul" => Op::MatMul,
            "Flatten" => Op::Flatten { axis: a.int("axis", 1) },
            "Reshape" => Op::Reshape { allowzero: a.int("allowzero", 0) != 0 },
            "Transpose" => Op::Transpose {
                perm: match a.ints("perm") {
                    None => None,
                    Some(p) => {
                        let mut seen = vec![false; p.len()];
                        for &i in &p {
                            if i < 0 || i as usize >= p.len() || seen[i as usize] {
                                return Err(Bad(format!("perm {p:?} is not a permutation")));
                            }
                            seen[i as usize] = true;
                        }
                        Some(p.iter().map(|&i| i as usize).collect())
                    }
                },
            },
            "Concat" => {
                if !a.has("axis") {
                    return Err(Bad("missing required attribute `axis`".into()));
                }
                Op::Concat { axis: a.int("axis", 0) }
            }
            "Add" => Op::Binary(BinOp::Add),
            "Sub" => Op::Binary(BinOp::Sub),
            "Mul" => Op::Binary(BinOp::Mul),
            "Div" => Op::Binary(BinOp::Div),
            "Softmax" => {
                if opset < 13 {
                    Op::Softmax { axis: a.int("axis", 1), coerce_2d: true }
                } else {
                    Op::Softmax { axis: a.int("axis", -1), coerce_2d: false }
                }
            }
            "Pad" => {
                let mode = a.string("mode").unwrap_or_else(|| "constant".into());
                let edge = match mode.as_str() {
                    "constant" => false,
                    "edge" => true,
                    m => return Err(Bad(format!("Pad mode `{m}` is not supported (constant, edge)"))),
                };
                if opset < 11 {
                    let pads = a.ints("pads").ok_or_else(|| Bad("missing attribute `pads`".into()))?;
                    Op::Pad { edge, pads: Some(pads), value: a.float("value", 0.0) }
                } else {
                    Op::Pad { edge, pads: None, value: 0.0 }
                }
            }
            "Shape" => Op::Shape { start: a.int("start", 0), end: a.has("end").then(|| a.int("end", 0)) },
            "Gather" => Op::Gather { axis: a.int("axis", 0) },
            "Unsqueeze" => {
                let axes = if opset < 13 {
                    Some(a.ints("axes").ok_or_else(|| Bad("missing attribute `axes`".into()))?)
                } else {
                    None
                };
                Op::Unsqueeze { axes }
            }
            "Squeeze" => Op::Squeeze { axes: if opset < 13 { a.ints("axes") } else { None } },
            "Cast" => {
                let to = a.int("to", 0);
                Op::Cast {
                    to: cast_dtype(to).ok_or_else(|| Bad(format!("Cast to type {to} is not supported")))?,
                }
            }
            _ => return Err(Unsupported),
        };
        Ok(op)
    }

    /// Runs the op. `inputs[i]` is `None` for an omitted optional input.
    pub(crate) fn exec(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let req = |i: usize| required(inputs, i);
        let opt = |i: usize| optional(inputs, i);
        let y = match self {
            Op::Identity => req(0)?.clone(),
            Op::Constant(t) => t.clone(),
            // Inputs 3.. exist only when planning fused a sum into the convolution; it may then
            // have two outputs.
            Op::Conv(c, extras) => {
                return kernels::conv(req(0)?, req(1)?, opt(2), &fused(inputs)?, c, extras);
            }
            Op::Separable(s) => return kernels::separable(req(0)?, req(1)?, opt(2), &fused(inputs)?, s),
            Op::BatchNorm { eps } => batch_norm(req(0)?, req(1)?, req(2)?, req(3)?, req(4)?, *eps)?,
            Op::Unary(u) => {
                let x = req(0)?;
                match u {
                    UnaryOp::Relu => match kernels::cpu_map(x, |v| v.max(0.0)) {
                        Some(y) => y?,
                        None => x.relu()?,
                    },
                    UnaryOp::Sigmoid => candle_nn::ops::sigmoid(x)?,
                    UnaryOp::Tanh => x.tanh()?,
                    UnaryOp::Exp => x.exp()?,
                    UnaryOp::Log => x.log()?,
                    UnaryOp::Sqrt => x.sqrt()?,
                    UnaryOp::Neg => x.neg()?,
                    UnaryOp::Abs => x.abs()?,
                    UnaryOp::Reciprocal => x.recip()?,
                }
            }
            Op::LeakyRelu { alpha } => candle_nn::ops::leaky_relu(req(0)?, *alpha)?,
            Op::HardSigmoid { alpha, beta } => req(0)?.affine(*alpha, *beta)?.clamp(0f32, 1f32)?,
            Op::HardSwish => {
                let x = req(0)?;
                (x * x.affine(1.0 / 6.0, 0.5)?.clamp(0f32, 1f32)?)?
            }
            Op::Clip { min, max, from_inputs } => {
                let x = req(0)?;
                let (lo, hi) = if *from_inputs {
                    (opt(1).map(scalar_f32).transpose()?, opt(2).map(scalar_f32).transpose()?)
                } else {
                    (*min, *max)
                };
                let mut y = x.clone();
                if let Some(lo) = lo {
                    y = y.maximum(lo)?;
                }
                if let Some(hi) = hi {
                    y = y.minimum(hi)?;
                }
                y
            }
            Op::Pool(p) => kernels::pool(req(0)?, p)?,
            Op::GlobalPool { max } => {
                let x = req(0)?;
                if x.rank() < 3 {
                    bail!("expects a tensor of rank ≥ 3, got {:?}", x.dims());
                }
                let mut y = x.flatten_from(2)?;
                y = if *max { y.max_keepdim(2)? } else { y.mean_keepdim(2)? };
                let mut dims = x.dims().to_vec();
                dims[2..].iter_mut().for_each(|d| *d = 1);
                y.reshape(dims)?
            }
            Op::Gemm { alpha, beta, trans_a, trans_b } => {
                let (a, b) = (req(0)?, req(1)?);
                if a.rank() != 2 || b.rank() != 2 {
                    bail!("A and B must be 2-D, got {:?} and {:?}", a.dims(), b.dims());
                }
                let a = if *trans_a { a.t()? } else { a.clone() };
                let b = if *trans_b { b.t()? } else { b.clone() };
                let (m, k) = a.dims2()?;
                let n = b.dim(1)?;
                cost::record(cost::linear_macs(m, k, n));
                let mut y = a.matmul(&b)?;
                if *alpha != 1.0 {
                    y = y.affine(*alpha, 0.0)?;
                }
                if let Some(c) = opt(2)
                    && *beta != 0.0
                {
                    let c = if *beta == 1.0 { c.clone() } else { c.affine(*beta, 0.0)? };
                    y = y.broadcast_add(&c)?;
                }
                y
            }
            Op::MatMul => matmul(req(0)?, req(1)?)?,
            Op::Flatten { axis } => {
                let x = req(0)?;
                let axis = norm_axis(*axis, x.rank() + 1)?;
                let outer: usize = x.dims()[..axis].iter().product();
                let inner: usize = x.dims()[axis..].iter().product();
                x.reshape((outer, inner))?
            }
            Op::Reshape { allowzero } => {
                let x = req(0)?;
                let spec = ints(req(1)?)?;
                x.reshape(reshape_dims(x.dims(), &spec, *allowzero)?)?
            }
            Op::Transpose { perm } => {
                let x = req(0)?;
                let perm: Vec<usize> = match perm {
                    Some(p) => {
                        if p.len() != x.rank() {
                            bail!("perm has {} entries for a rank-{} input", p.len(), x.rank());
                        }
                        p.clone()
                    }
                    None => (0..x.rank()).rev().collect(),
                };
                x.permute(perm)?.contiguous()?
            }
            Op::Concat { axis } => {
                let xs: Vec<&Tensor> = (0..inputs.len()).filter_map(opt).collect();
                if xs.is_empty() {
                    bail!("no inputs");
                }
                let axis = norm_axis(*axis, xs[0].rank())?;
                Tensor::cat(&xs, axis)?
            }
            Op::Binary(b) => {
                let (x, y) = (req(0)?, req(1)?);
                // One monomorphic loop per op, so each one vectorises.
                let fast = match b {
                    BinOp::Add => kernels::cpu_zip(x, y, |a, b| a + b),
                    BinOp::Sub => kernels::cpu_zip(x, y, |a, b| a - b),
                    BinOp::Mul => kernels::cpu_zip(x, y, |a, b| a * b),
                    BinOp::Div => kernels::cpu_zip(x, y, |a, b| a / b),
                };
                match (fast, b) {
                    (Some(z), _) => z?,
                    (None, BinOp::Add) => x.broadcast_add(y)?,
                    (None, BinOp::Sub) => x.broadcast_sub(y)?,
                    (None, BinOp::Mul) => x.broadcast_mul(y)?,
                    (None, BinOp::Div) => x.broadcast_div(y)?,
                }
            }
            Op::AddN { relu } => {
                let xs = (0..inputs.len()).map(req).collect::<Result<Vec<&Tensor>>>()?;
                if xs.len() < 2 {
                    bail!("a fused sum of {} inputs", xs.len());
                }
                kernels::sum(&xs, *relu)?
            }
            Op::Softmax { axis, coerce_2d } => {
                let x = req(0)?;
                let axis = norm_axis(*axis, x.rank())?;
                if *coerce_2d {
                    let outer: usize = x.dims()[..axis].iter().product();
                    let inner: usize = x.dims()[axis..].iter().product();
                    candle_nn::ops::softmax_last_dim(&x.reshape((outer, inner))?)?.reshape(x.dims())?
                } else if axis + 1 == x.rank() {
                    candle_nn::ops::softmax_last_dim(&x.contiguous()?)?
                } else {
                    candle_nn::ops::softmax(x, axis)?
                }
            }
            Op::Pad { edge, pads, value } => {
                let x = req(0)?;
                let (pads, value) = match pads {
                    Some(p) => (p.clone(), *value),
                    None => {
                        let p = ints(req(1)?)?;
                        let v = opt(2).map(scalar_f32).transpose()?.unwrap_or(0.0);
                        (p, v)
                    }
                };
                let axes: Vec<usize> = match opt(3) {
                    Some(t) => ints(t)?.iter().map(|&a| norm_axis(a, x.rank())).collect::<Result<_>>()?,
                    None => (0..x.rank()).collect(),
                };
                if pads.len() != 2 * axes.len() {
                    bail!("pads has {} values for {} axes", pads.len(), axes.len());
                }
                let n = axes.len();
                let mut y = x.clone();
                for (i, &ax) in axes.iter().enumerate() {
                    y = kernels::pad_axis(&y, ax, pads[i], pads[i + n], value, *edge)?;
                }
                y
            }
            Op::Shape { start, end } => {
                let x = req(0)?;
                let r = x.rank() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let (s, e) = (clampi(*start), clampi(end.unwrap_or(r)));
                let dims: Vec<i64> = x.dims()[s..e.max(s)].iter().map(|&d| d as i64).collect();
                let n = dims.len();
                Tensor::from_vec(dims, n, x.device())?
            }
            Op::Gather { axis } => gather(req(0)?, req(1)?, *axis)?,
            Op::Unsqueeze { axes } => {
                let x = req(0)?;
                let axes = match axes {
                    Some(a) => a.clone(),
                    None => ints(req(1)?)?,
                };
                let out_rank = x.rank() + axes.len();
                let mut axes = axes.iter().map(|&a| norm_axis(a, out_rank)).collect::<Result<Vec<_>>>()?;
                axes.sort_unstable();
                let mut dims = x.dims().to_vec();
                for a in axes {
                    dims.insert(a, 1);
                }
                x.reshape(dims)?
            }
            Op::Squeeze { axes } => {
                let x = req(0)?;
                let axes = match (axes, opt(1)) {
                    (Some(a), _) => Some(a.clone()),
                    (None, Some(t)) => Some(ints(t)?),
                    (None, None) => None,
                };
                let dims: Vec<usize> = match axes {
                    None => x.dims().iter().copied().filter(|&d| d != 1).collect(),
                    Some(a) => {
                        let a = a.iter().map(|&v| norm_axis(v, x.rank())).collect::<Result<Vec<_>>>()?;
                        for &i in &a {
                            if x.dims()[i] != 1 {
                                bail!("cannot squeeze axis {i} of size {}", x.dims()[i]);
                            }
                        }
                        x.dims().iter().enumerate().filter(|(i, _)| !a.contains(i)).map(|(_, d)| *d).collect()
                    }
                };
                x.reshape(dims)?
            }
            Op::Cast { to } => req(0)?.to_dtype(*to)?,
        };
        Ok(vec![y])
    }
}

fn required<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    match inputs.get(i).copied().flatten() {
        Some(t) => Ok(t),
        None => bail!("required input {i} is missing"),
    }
}

fn optional<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    inputs.get(i).copied().flatten()
}

/// The operands of a sum fused into a convolution: its inputs from 3 on.
fn fused<'a>(inputs: &[Option<&'a Tensor>]) -> Result<Vec<&'a Tensor>> {
    (3..inputs.len().max(3)).map(|i| required(inputs, i)).collect()
}

fn constant_value(a: &Attrs<'_>, device: &Device) -> std::result::Result<Tensor, String> {
    if let Some(t) = a.tensor("value") {
        return tensor_from_proto(t, device);
    }
    let r = if a.has("value_float") {
        Tensor::new(a.float("value_float", 0.0), device)
    } else if let Some(v) = a.floats("value_floats") {
        let n = v.len();
        Tensor::from_vec(v, n, device)
    } else if a.has("value_int") {
        Tensor::new(a.int("value_int", 0), device)
    } else if let Some(v) = a.ints("value_ints") {
        let n = v.len();
        Tensor::from_vec(v, n, device)
    } else {
        return Err("Constant has no supported value attribute (value, value_float(s), value_int(s))".into());
    };
    r.map_err(|e| e.to_string())
}

/// Normalises a possibly negative axis against `rank`.
pub(crate) fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        bail!("axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}

/// The values of an integer (or float) tensor of any rank, as i64.
pub(crate) fn ints(t: &Tensor) -> Result<Vec<i64>> {
    t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()
}

fn scalar_f32(t: &Tensor) -> Result<f32> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => bail!("expected a scalar, got shape {:?}", t.dims()),
    }
}

/// Applies ONNX Reshape semantics: `0` copies the input dimension (unless `allowzero`), `-1` is
/// inferred from the element count.
pub(crate) fn reshape_dims(input: &[usize], spec: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let numel: usize = input.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            -1 => {
                if infer.replace(i).is_some() {
                    bail!("shape {spec:?} has more than one -1");
                }
                out.push(1);
            }
            0 if !allowzero => match input.get(i) {
                Some(&d) => out.push(d),
                None => bail!("shape {spec:?}: 0 at index {i} has no input dimension to copy ({input:?})"),
            },
            s if s < 0 => bail!("shape {spec:?} has invalid entry {s}"),
            s => out.push(s as usize),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !numel.is_multiple_of(known) {
            bail!("cannot reshape {input:?} to {spec:?}");
        }
        out[i] = numel / known;
    } else if known != numel {
        bail!("cannot reshape {input:?} ({numel} values) to {spec:?}");
    }
    Ok(out)
}

fn batch_norm(
    x: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if x.rank() < 2 {
        bail!("input must have rank ≥ 2, got {:?}", x.dims());
    }
    let c = x.dim(1)?;
    let mut shape = vec![1usize; x.rank()];
    shape[1] = c;
    // y = x·a + b with a = scale/√(var+ε), b = bias − mean·a: one multiply-add pass over x.
    let a = scale.broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    let b = bias.broadcast_sub(&mean.broadcast_mul(&a)?)?;
    x.broadcast_mul(&a.reshape(shape.as_slice())?)?.broadcast_add(&b.reshape(shape.as_slice())?)
}

fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    // 1-D operands are promoted (prepend / append a 1) and the extra axis removed afterwards.
    let (a1, b1) = (a.rank() == 1, b.rank() == 1);
    let a = if a1 { a.unsqueeze(0)? } else { a.clone() };
    let b = if b1 { b.unsqueeze(1)? } else { b.clone() };
    let (m, k) = (a.dim(D::Minus2)?, a.dim(D::Minus1)?);
    let n = b.dim(D::Minus1)?;
    let batch: usize =
        a.dims()[..a.rank() - 2].iter().product::<usize>().max(b.dims()[..b.rank() - 2].iter().product());
    cost::record(cost::linear_macs(batch * m, k, n));
    let mut y = if a.rank() == 2 && b.rank() == 2 { a.matmul(&b)? } else { a.broadcast_matmul(&b)? };
    if b1 {
        y = y.squeeze(D::Minus1)?;
    }
    if a1 {
        y = y.squeeze(D::Minus2)?;
    }
    Ok(y)
}

fn gather(data: &Tensor, indices: &Tensor, axis: i64) -> Result<Tensor> {
    let axis = norm_axis(axis, data.rank())?;
    let size = data.dim(axis)? as i64;
    let idx = ints(indices)?
        .into_iter()
        .map(|i| {
            let j = if i < 0 { i + size } else { i };
            if j < 0 || j >= size {
                bail!("index {i} is out of range for axis {axis} of size {size}");
            }
            Ok(j as u32)
        })
        .collect::<Result<Vec<u32>>>()?;
    let n = idx.len();
    let picked = data.index_select(&Tensor::from_vec(idx, n, data.device())?, axis)?;
    let mut dims = data.dims()[..axis].to_vec();
    dims.extend_from_slice(indices.dims());
    dims.extend_from_slice(&data.dims()[axis + 1..]);
    picked.reshape(dims)
}
