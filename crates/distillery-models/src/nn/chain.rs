//! A chain of convolution → batch norm (→ ReLU6) stages, optionally with an identity shortcut
//! around it (MobileNetV2's inverted residual block), as one training op on the CPU.
//!
//! candle's backward pass gives every input of every op a gradient tensor of its own: a tensor of
//! zeros, then the op's gradient added into it, even where that input has a single consumer.
//! Between two stages of a chain that is a write, two reads and a write of an activation-sized
//! tensor spent on nothing (with the additions, about a seventh of a MobileNetV2 step at 224²). As
//! one op, the chain hands each stage's input gradient straight to the stage before it. Its stages
//! run the layers' own kernels ([`super::pointwise`], [`super::depthwise`], [`super::batchnorm`])
//! in the same order, so outputs, gradients and batch statistics are the same bits as the layers
//! applied one by one ([`super::conv_bn_chain_t`] falls back to that wherever this op does not
//! apply: other devices, other dtypes, shapes that do not fit).
//!
//! candle's custom ops take at most three tensors, so the op's inputs are `x`, the stages'
//! weights flattened and concatenated (a single stage's weight as it is), and the batch norms'
//! affine parameters concatenated as `γ₀ β₀ γ₁ β₁ …`. Those concatenations copy parameters only,
//! small next to the activations.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
    backend::BackendStorage, bail, op::BackpropOp,
};
use rayon::prelude::*;

use super::batchnorm::{BatchStats, BnTrain, BnTrainBwd};
use super::depthwise::{DwFwd, out_side};
use super::pointwise::PwFwd;

/// The convolution of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChainConv {
    /// 1×1 without bias, weight `[c_out, c_in, 1, 1]`.
    Pointwise,
    /// 3×3 depthwise, padding 1, without bias, weight `[c, 1, 3, 3]`; stride 1 or 2.
    Depthwise { stride: usize },
}

/// One stage: its convolution and that convolution's weight shape, then a batch norm with `eps`,
/// then a ReLU6 when `relu6`.
#[derive(Clone, Debug)]
pub(crate) struct Stage {
    pub conv: ChainConv,
    pub weight: Shape,
    pub eps: f64,
    pub relu6: bool,
}

impl Stage {
    /// Output channels and sides for an input of `c` channels and `h × w`; `None` when the
    /// stage does not fit it.
    fn out_dims(&self, (c, h, w): (usize, usize, usize)) -> Option<(usize, usize, usize)> {
        match (self.conv, self.weight.dims()) {
            (ChainConv::Pointwise, &[o, i, 1, 1]) if i == c => Some((o, h, w)),
            (ChainConv::Depthwise { stride: s @ (1 | 2) }, &[k, 1, 3, 3]) if k == c => {
                Some((c, out_side(h, s), out_side(w, s)))
            }
            _ => None,
        }
    }
}

/// What one stage's backward pass needs from its forward pass.
#[derive(Clone)]
struct Saved {
    /// The stage's input; `None` for the first stage, whose input is the op's.
    input: Option<Tensor>,
    /// The convolution's output (the batch norm's input).
    pre: Tensor,
    stats: BatchStats,
}

/// `(x, weights, params) → y`, see the module docs.
struct ChainTrain {
    stages: Vec<Stage>,
    residual: bool,
    /// Filled by the forward pass; read by the caller (batch statistics) and the backward pass.
    saved: Arc<Mutex<Option<Vec<Saved>>>>,
}

/// A tensor over a CPU storage of contiguous `shape` (no copy, no graph node).
fn cpu_tensor(s: CpuStorage, shape: Shape) -> Tensor {
    Tensor::from_storage(Storage::Cpu(s), shape, BackpropOp::none(), false)
}

fn contiguous_offsets(l: &Layout, op: &str, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// `out += x`, element by element (the shortcut of a residual chain).
fn add_into<T: WithDType>(out: &mut [T], x: &[T]) {
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
        super::simd::vectorized(
            #[inline(always)]
            || {
                for (o, x) in o.iter_mut().zip(x) {
                    *o += *x;
                }
            },
        )
    });
}

impl ChainTrain {
    /// The convolution of stage `st` on `(src, sl)` with the weight at `wl` in `ws`.
    fn conv(
        st: &Stage,
        src: &CpuStorage,
        sl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match st.conv {
            ChainConv::Pointwise => PwFwd.cpu_fwd(src, sl, ws, wl),
            ChainConv::Depthwise { stride } => DwFwd { stride }.cpu_fwd(src, sl, ws, wl),
        }
    }

    /// Output channels of each stage, from the weight shapes.
    fn channels(&self) -> impl Iterator<Item = usize> + '_ {
        self.stages.iter().map(|s| s.weight.dims()[0])
    }
}

impl CustomOp3 for ChainTrain {
    fn name(&self) -> &'static str {
        "conv-batch-norm-chain"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (w0, w1) = contiguous_offsets(wl, name, "weights")?;
        let (p0, p1) = contiguous_offsets(pl, name, "batch-norm parameters")?;
        let weights: usize = self.stages.iter().map(|s| s.weight.elem_count()).sum();
        let params: usize = self.channels().map(|c| 2 * c).sum();
        if w1 - w0 != weights || p1 - p0 != params {
            bail!(
                "{name}: {} weights and {} batch-norm parameters given, the stages take {weights} and {params}",
                w1 - w0,
                p1 - p0
            );
        }
        let (mut woff, mut poff) = (w0, p0);
        let mut saved: Vec<Saved> = Vec::with_capacity(self.stages.len());
        let mut input: Option<Tensor> = None;
        for (k, st) in self.stages.iter().enumerate() {
            let wk = Layout::contiguous_with_offset(st.weight.clone(), woff);
            let (pre, shape) = match &input {
                None => Self::conv(st, xs, xl, ws, &wk)?,
                Some(t) => {
                    let (guard, l) = t.storage_and_layout();
                    let Storage::Cpu(s) = &*guard else {
                        bail!("{name}: stage {k}'s input is not on the CPU")
                    };
                    Self::conv(st, s, l, ws, &wk)?
                }
            };
            let c = shape.dims()[1];
            let slot = Arc::new(Mutex::new(None));
            let bn = BnTrain { eps: st.eps, relu6: st.relu6, stats: slot.clone() };
            let gamma = Layout::contiguous_with_offset(c, poff);
            let beta = Layout::contiguous_with_offset(c, poff + c);
            let (out, _) = bn.cpu_fwd(&pre, &Layout::contiguous(shape.clone()), ps, &gamma, ps, &beta)?;
            let Some(stats) = slot.lock().expect("stats lock").take() else {
                bail!("{name}: stage {k}'s batch norm produced no statistics");
            };
            saved.push(Saved { input: input.take(), pre: cpu_tensor(pre, shape.clone()), stats });
            (woff, poff) = (woff + st.weight.elem_count(), poff + 2 * c);
            if k + 1 < self.stages.len() {
                input = Some(cpu_tensor(out, shape));
                continue;
            }
            *self.saved.lock().expect("saved lock") = Some(saved);
            let mut out = out;
            if self.residual {
                if shape.dims() != xl.dims() {
                    bail!(
                        "{name}: a shortcut needs the output {:?} to match the input {:?}",
                        shape.dims(),
                        xl.dims()
                    );
                }
                let (a, b) = contiguous_offsets(xl, name, "input")?;
                match (&mut out, xs) {
                    (CpuStorage::F32(o), CpuStorage::F32(x)) => add_into(o, &x[a..b]),
                    (CpuStorage::F64(o), CpuStorage::F64(x)) => add_into(o, &x[a..b]),
                    _ => bail!("{name}: unsupported dtype {:?} (f32 or f64)", xs.dtype()),
                }
            }
            return Ok((out, shape));
        }
        bail!("{name}: a chain needs at least one stage")
    }

    fn bwd(
        &self,
        x: &Tensor,
        weights: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let Some(saved) = self.saved.lock().expect("saved lock").clone() else {
            bail!("{name}: backward before forward");
        };
        let gammas = params.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let flat = weights.detach().flatten_all()?;
        let channels: Vec<usize> = self.channels().collect();
        let mut woff: usize = self.stages.iter().map(|s| s.weight.elem_count()).sum();
        let mut poff: usize = channels.iter().map(|c| 2 * c).sum();
        let mut g = grad.contiguous()?;
        let mut gw = Vec::with_capacity(self.stages.len());
        let mut gp = Vec::with_capacity(self.stages.len());
        for (k, st) in self.stages.iter().enumerate().rev() {
            let (sv, c) = (&saved[k], channels[k]);
            woff -= st.weight.elem_count();
            poff -= 2 * c;
            let op = BnTrainBwd {
                stats: sv.stats.clone(),
                gamma: gammas[poff..poff + c].to_vec(),
                relu6: st.relu6,
                reductions: Mutex::new(None),
            };
            let dpre = sv.pre.apply_op2_no_bwd(&g, &op)?;
            let Some((dgamma, dbeta)) = op.reductions.lock().expect("reductions lock").take() else {
                bail!("{name}: stage {k}'s batch norm produced no parameter gradients");
            };
            let input = sv.input.as_ref().unwrap_or(x);
            let wk = flat.narrow(0, woff, st.weight.elem_count())?.reshape(st.weight.clone())?;
            let (gin, gwk) = match st.conv {
                ChainConv::Pointwise => PwFwd.bwd(input, &wk, &dpre, &dpre)?,
                ChainConv::Depthwise { stride } => DwFwd { stride }.bwd(input, &wk, &dpre, &dpre)?,
            };
            let (Some(gin), Some(gwk)) = (gin, gwk) else {
                bail!("{name}: stage {k}'s convolution produced no gradients");
            };
            gw.push(gwk.flatten_all()?);
            gp.push((dgamma, dbeta));
            g = gin;
        }
        if self.residual {
            g = g.add(grad)?;
        }
        gw.reverse();
        gp.reverse();
        let gw = Tensor::cat(&gw, 0)?.reshape(weights.shape())?;
        let gp: Vec<f64> = gp.into_iter().flat_map(|(dg, db)| dg.into_iter().chain(db)).collect();
        let n = gp.len();
        let gp = Tensor::from_vec(gp, n, x.device())?.to_dtype(params.dtype())?;
        Ok((Some(g), Some(gw), Some(gp)))
    }
}

/// The chain of `stages` (and the shortcut when `residual`) over `x [n, c, h, w]` as one
/// training op, with each stage's batch statistics; `weights` and `params` as in the module docs.
/// `None` where the op does not apply (not on the CPU, not f32/f64, a stage that does not fit its
/// input, fewer than two values per channel, a shortcut between different shapes): the caller
/// then runs the stages one by one, which reports any error.
pub(crate) fn train_cpu(
    x: &Tensor,
    stages: Vec<Stage>,
    residual: bool,
    weights: &Tensor,
    params: &Tensor,
) -> Result<Option<(Tensor, Vec<BatchStats>)>> {
    let dtype = x.dtype();
    let fits_dtype = matches!(dtype, DType::F32 | DType::F64)
        && weights.dtype() == dtype
        && params.dtype() == dtype
        && [weights, params].iter().all(|t| t.device().is_cpu());
    if !x.device().is_cpu() || !fits_dtype || stages.is_empty() {
        return Ok(None);
    }
    let (n, c, h, w) = x.dims4()?;
    let mut dims = (c, h, w);
    for st in &stages {
        match st.out_dims(dims) {
            Some(d) if n * d.1 * d.2 >= 2 => dims = d,
            _ => return Ok(None),
        }
    }
    if residual && dims != (c, h, w) {
        return Ok(None);
    }
    let saved = Arc::new(Mutex::new(None));
    let op = ChainTrain { stages, residual, saved: saved.clone() };
    let y = x.contiguous()?.apply_op3(&weights.contiguous()?, &params.contiguous()?, op)?;
    let Some(saved) = saved.lock().expect("saved lock").clone() else {
        bail!("conv-batch-norm-chain: forward produced no statistics");
    };
    Ok(Some((y, saved.into_iter().map(|s| s.stats).collect())))
}

#[cfg(test)]
mod tests {
    use super::super::gradcheck::{check_grads, pseudo_random, rand_var};
    use super::super::{
        BatchNorm2d, ConvBn, DepthwiseConv3x3, Pointwise, StageConv, conv_bn_chain_stepwise, conv_bn_chain_t,
        conv_bn_chain_train_cpu,
    };
    use crate::cost;
    use candle_core::{DType, Device, Result, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// An inverted residual's layers: 1×1 expansion (when `hidden` differs from `c_in`), 3×3
    /// depthwise, 1×1 projection, each with its batch norm.
    struct Block {
        expand: Option<(Pointwise, BatchNorm2d)>,
        dw: (DepthwiseConv3x3, BatchNorm2d),
        project: (Pointwise, BatchNorm2d),
    }

    impl Block {
        fn new(
            vb: VarBuilder<'_>,
            (c_in, hidden, c_out, stride): (usize, usize, usize, usize),
        ) -> Result<Self> {
            let expand = if hidden != c_in {
                Some((Pointwise::new(c_in, hidden, vb.pp("e"))?, BatchNorm2d::new(hidden, vb.pp("e_bn"))?))
            } else {
                None
            };
            Ok(Self {
                expand,
                dw: (
                    DepthwiseConv3x3::new(hidden, stride, vb.pp("d"))?,
                    BatchNorm2d::new(hidden, vb.pp("d_bn"))?,
                ),
                project: (
                    Pointwise::new(hidden, c_out, vb.pp("p"))?,
                    BatchNorm2d::new(c_out, vb.pp("p_bn"))?,
                ),
            })
        }

        fn stages(&self) -> Vec<ConvBn<'_>> {
            let mut s = Vec::new();
            if let Some((c, bn)) = &self.expand {
                s.push(ConvBn { conv: StageConv::Pointwise(c), bn, relu6: true });
            }
            s.push(ConvBn { conv: StageConv::Depthwise(&self.dw.0), bn: &self.dw.1, relu6: true });
            s.push(ConvBn { conv: StageConv::Pointwise(&self.project.0), bn: &self.project.1, relu6: false });
            s
        }
    }

    /// Batch-norm affine parameters spread wide enough that ReLU6 cuts at both ends.
    fn spread_affine(vm: &VarMap, seed: u64) -> Result<()> {
        let data = vm.data().lock().expect("varmap lock");
        for (name, var) in data.iter().filter(|(k, _)| k.ends_with("bn.weight") || k.ends_with("bn.bias")) {
            let scale = if name.ends_with("weight") { 3.0 } else { 2.0 };
            let v: Vec<f64> = pseudo_random(var.elem_count(), seed + name.len() as u64)
                .iter()
                .map(|r| r * scale + if name.ends_with("weight") { 0.5 } else { 1.0 })
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// A second VarMap holding copies of `vm`'s variables.
    fn copy_of(vm: &VarMap) -> Result<VarMap> {
        let copy = VarMap::new();
        for (k, v) in vm.data().lock().expect("varmap lock").iter() {
            let var = Var::from_tensor(&v.as_tensor().copy()?)?;
            copy.data().lock().expect("varmap lock").insert(k.clone(), var);
        }
        Ok(copy)
    }

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    /// Fails naming the first element where `a` and `b` differ in their bits.
    fn assert_same(what: &str, a: Option<&Tensor>, b: Option<&Tensor>) -> Result<()> {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (bits(a)?, bits(b)?),
            (None, None) => return Ok(()),
            (a, b) => panic!("{what}: present {} vs {}", a.is_some(), b.is_some()),
        };
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
            let (x, y) = (f32::from_bits(a[i]), f32::from_bits(b[i]));
            let n = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            panic!("{what}: {n} of {} values differ, the first at {i}: {x} vs {y}", a.len());
        }
        Ok(())
    }

    /// The fused chain gives the same bits as the layers one by one: output, every gradient,
    /// running statistics, MACs; with and without expansion and shortcut, strides 1 and 2, odd
    /// and mixed sides.
    #[test]
    fn one_op_gives_the_same_bits_as_the_layers_one_by_one() -> Result<()> {
        let dev = Device::Cpu;
        // (n, c_in, hidden, c_out, stride, h, w, residual)
        for (n, c_in, hidden, c_out, stride, h, w, residual) in [
            (4, 8, 48, 8, 1, 7, 9, true),
            (3, 16, 96, 24, 2, 9, 8, false),
            (2, 16, 16, 8, 1, 6, 6, false),
            (5, 24, 144, 24, 1, 14, 14, true),
        ] {
            let what = format!("{n}×{c_in}→{hidden}→{c_out} s{stride} {h}×{w} residual {residual}");
            let vm = VarMap::new();
            let geometry = (c_in, hidden, c_out, stride);
            let block = Block::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), geometry)?;
            spread_affine(&vm, n as u64)?;
            let vm2 = copy_of(&vm)?;
            let block2 = Block::new(VarBuilder::from_varmap(&vm2, DType::F32, &dev), geometry)?;
            let x = Var::from_tensor(&rand_var((n, c_in, h, w), 3)?.as_tensor().to_dtype(DType::F32)?)?;
            let x2 = Var::from_tensor(&x.as_tensor().copy()?)?;
            let (y, macs) = cost::count(|| conv_bn_chain_train_cpu(&x, &block.stages(), residual));
            let y = y?.expect("the chain fits the fused op");
            let (y2, macs2) = cost::count(|| conv_bn_chain_stepwise(&x2, &block2.stages(), residual, true));
            let y2 = y2?;
            assert_eq!(macs, macs2, "{what}: MACs");
            assert_same(&format!("{what}: output"), Some(&y), Some(&y2))?;
            let r =
                Tensor::from_vec(pseudo_random(y.elem_count(), 5), y.shape(), &dev)?.to_dtype(DType::F32)?;
            let g = (&y * &r)?.sum_all()?.backward()?;
            let g2 = (&y2 * &r)?.sum_all()?.backward()?;
            assert_same(&format!("{what}: input gradient"), g.get(&x), g2.get(&x2))?;
            let (d1, d2) = (vm.data().lock().expect("lock"), vm2.data().lock().expect("lock"));
            for (name, v) in d1.iter() {
                let v2 = &d2[name];
                assert_same(&format!("{what}: gradient of {name}"), g.get(v), g2.get(v2))?;
                // Running statistics were updated by the forward pass; parameters are untouched.
                assert_same(&format!("{what}: value of {name}"), Some(v), Some(v2))?;
            }
            let moved = d1.iter().filter(|(k, _)| k.ends_with("running_mean")).count();
            assert_eq!(moved, 2 + usize::from(hidden != c_in), "{what}: running statistics");
            assert!(d1.iter().filter(|(k, _)| k.ends_with("running_mean")).all(|(_, v)| {
                v.as_tensor().abs().and_then(|a| a.sum_all()).and_then(|s| s.to_scalar::<f32>()).unwrap()
                    > 0.0
            }));
        }
        Ok(())
    }

    /// Finite differences through the fused op (f64): input, every weight and affine parameter,
    /// with a shortcut and with stride 2.
    #[test]
    fn one_op_gradchecks() -> Result<()> {
        let dev = Device::Cpu;
        for (geometry, (h, w), residual) in [((3, 6, 3, 1), (4, 3), true), ((2, 4, 3, 2), (5, 4), false)] {
            let vm = VarMap::new();
            let block = Block::new(VarBuilder::from_varmap(&vm, DType::F64, &dev), geometry)?;
            spread_affine(&vm, 11)?;
            let x = rand_var((2, geometry.0, h, w), 12)?;
            assert!(conv_bn_chain_train_cpu(&x, &block.stages(), residual)?.is_some(), "not fused");
            let mut vars: Vec<Var> = {
                let data = vm.data().lock().expect("lock");
                data.iter().filter(|(k, _)| !k.contains("running")).map(|(_, v)| v.clone()).collect()
            };
            vars.push(x);
            let refs: Vec<&Var> = vars.iter().collect();
            let last = refs.len() - 1;
            check_grads(&refs, 1e-6, 1e-6, |a| conv_bn_chain_t(&a[last], &block.stages(), residual, true))?;
        }
        Ok(())
    }

    /// Chains the op does not fit run layer by layer, which names what is wrong.
    #[test]
    fn misfitting_chains_fall_back_and_report_the_layer() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let block = Block::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), (4, 8, 4, 1))?;
        let x = Tensor::zeros((2, 5, 3, 3), DType::F32, &dev)?;
        assert!(conv_bn_chain_train_cpu(&x, &block.stages(), false)?.is_none());
        let err = conv_bn_chain_t(&x, &block.stages(), false, true).unwrap_err().to_string();
        assert!(err.contains("pointwise-conv") && err.contains("5 channels"), "{err}");
        // No stages: the input itself (and doubled with the shortcut).
        let x = Tensor::ones((2, 4, 3, 3), DType::F32, &dev)?;
        let y = conv_bn_chain_t(&x, &[], true, true)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![2f32; 72]);
        // One value per channel: batch norm cannot train on it.
        let x = Tensor::zeros((1, 4, 1, 1), DType::F32, &dev)?;
        assert!(conv_bn_chain_train_cpu(&x, &block.stages(), false)?.is_none());
        let err = conv_bn_chain_t(&x, &block.stages(), false, true).unwrap_err().to_string();
        assert!(err.contains("more than one value per channel"), "{err}");
        Ok(())
    }
}
