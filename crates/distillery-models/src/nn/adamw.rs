//! The AdamW update of one parameter (Loshchilov & Hutter's decoupled weight decay, as in
//! PyTorch) as two in-place ops: the moments, then the parameter. Written out with candle ops an
//! update is about a dozen ops and fresh tensors per parameter, which on a GPU is a dozen kernel
//! launches for each of a student's ~150 tensors; here it is two, on the CPU two passes.
//!
//! The moments live in one tensor `mv [2, numel]` (m, then v) that the optimiser owns.
//! Elsewhere than the CPU and CUDA (or under [`super::with_portable_layers`]) the same update is
//! composed of candle ops and written back with `slice_set`.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, WithDType, bail};
use rayon::prelude::*;

/// One update's constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The parameter's multiplier before the step: `1 − lr·weight_decay`, or 1 without decay.
    pub decay: f64,
    /// This parameter's update count, from 1 (for the bias corrections).
    pub t: u64,
}

impl AdamWStep {
    fn bias_corrections(&self) -> (f64, f64) {
        let t = i32::try_from(self.t).unwrap_or(i32::MAX);
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }
}

/// Zeroed moments for `param`: `[2, numel]` on its device, in its dtype.
pub fn adamw_moments(param: &Tensor) -> Result<Tensor> {
    Tensor::zeros((2, param.elem_count()), param.dtype(), param.device())
}

/// Applies one AdamW update to `param` and its moments `mv` (see [`adamw_moments`]), both in
/// place, from `grad` (any layout with `param`'s element count).
pub fn adamw_update(param: &Tensor, mv: &Tensor, grad: &Tensor, step: &AdamWStep) -> Result<()> {
    let n = param.elem_count();
    if mv.dims() != [2, n] || grad.elem_count() != n {
        bail!(
            "adamw: moments {:?} and gradient {:?} do not fit a parameter of {n} elements",
            mv.dims(),
            grad.dims()
        );
    }
    if mv.dtype() != param.dtype() || !mv.is_contiguous() || !param.is_contiguous() {
        bail!("adamw: parameter and moments must be contiguous and of one dtype");
    }
    if step.t == 0 {
        bail!("adamw: update counts start at 1");
    }
    let grad = grad.to_dtype(param.dtype())?.flatten_all()?.contiguous()?;
    let (bc1, bc2) = step.bias_corrections();
    let kernels = matches!(param.dtype(), DType::F32 | DType::F64)
        && (super::cpu_kernels(param) || super::cuda_kernels(param, super::Kernels::AdamW));
    if kernels {
        mv.inplace_op2(&grad, &Moments { beta1: step.beta1, beta2: step.beta2 })?;
        return param.inplace_op2(mv, &Param { lr: step.lr, eps: step.eps, bc1, bc2, decay: step.decay });
    }
    let (m, v) = (mv.get(0)?, mv.get(1)?);
    let m = ((m * step.beta1)? + (&grad * (1.0 - step.beta1))?)?;
    let v = ((v * step.beta2)? + (grad.sqr()? * (1.0 - step.beta2))?)?;
    let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + step.eps)?)?;
    let next = ((param.flatten_all()? * step.decay)? - (update * step.lr)?)?;
    mv.slice_set(&Tensor::stack(&[m, v], 0)?, 0, 0)?;
    param.slice_set(&next.reshape(param.shape())?, 0, 0)
}

/// `mv ← (β1·m + (1−β1)·g, β2·v + (1−β2)·g²)`.
struct Moments {
    beta1: f64,
    beta2: f64,
}

/// `θ ← θ·decay − lr · (m/bc1) / (√(v/bc2) + ε)`.
struct Param {
    lr: f64,
    eps: f64,
    bc1: f64,
    bc2: f64,
    decay: f64,
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

fn range(l: &Layout, op: &str, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))
}

/// One of the two in-place updates, run on the CPU for f32 or f64 alike ([`cpu_update`]).
trait Update {
    /// What the updated and the read tensor are, for errors.
    const OPERANDS: [&'static str; 2];
    fn run<T: WithDType + num_like::Float>(&self, updated: &mut [T], read: &[T]);
}

/// `u` on contiguous CPU storages of one float dtype, `op` naming it in errors.
fn cpu_update<U: Update>(
    u: &U,
    op: &str,
    (s1, l1): (&mut CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<()> {
    let [first, second] = U::OPERANDS;
    let ((a, b), (c, d)) = (range(l1, op, first)?, range(l2, op, second)?);
    match (s1, s2) {
        (CpuStorage::F32(x), CpuStorage::F32(y)) => u.run(&mut x[a..b], &y[c..d]),
        (CpuStorage::F64(x), CpuStorage::F64(y)) => u.run(&mut x[a..b], &y[c..d]),
        _ => bail!("{op}: {first} and {second} must both be f32 or f64"),
    }
    Ok(())
}

impl Update for Moments {
    const OPERANDS: [&'static str; 2] = ["moments", "gradient"];

    fn run<T: WithDType + num_like::Float>(&self, mv: &mut [T], g: &[T]) {
        let n = g.len();
        let (b1, b2) = (T::from_f64(self.beta1), T::from_f64(self.beta2));
        let (c1, c2) = (T::one() - b1, T::one() - b2);
        let (m, v) = mv.split_at_mut(n);
        m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(
            |((m, v), g)| {
                for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                    *m = b1 * *m + c1 * g;
                    *v = b2 * *v + c2 * (g * g);
                }
            },
        );
    }
}

impl Update for Param {
    const OPERANDS: [&'static str; 2] = ["parameter", "moments"];

    fn run<T: WithDType + num_like::Float>(&self, p: &mut [T], mv: &[T]) {
        let n = p.len();
        let (m, v) = mv.split_at(n);
        let [lr, eps, bc1, bc2, decay] = [self.lr, self.eps, self.bc1, self.bc2, self.decay].map(T::from_f64);
        p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((p, m), v)| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                *p = *p * decay - lr * ((m / bc1) / ((v / bc2).sqrt() + eps));
            }
        });
    }
}

/// The float operations the updates need, for f32 and f64.
mod num_like {
    pub trait Float: Copy {
        fn sqrt(self) -> Self;
    }
    impl Float for f32 {
        fn sqrt(self) -> Self {
            f32::sqrt(self)
        }
    }
    impl Float for f64 {
        fn sqrt(self) -> Self {
            f64::sqrt(self)
        }
    }
}

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        cpu_update(self, self.name(), (s1, l1), (s2, l2))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        super::cuda::adamw_moments((s1, l1), (s2, l2), self.beta1, self.beta2)
    }
}

impl InplaceOp2 for Param {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        cpu_update(self, self.name(), (s1, l1), (s2, l2))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        super::cuda::adamw_param((s1, l1), (s2, l2), [self.lr, self.eps, self.bc1, self.bc2, self.decay])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// AdamW on one scalar, written out from the update equations in f64.
    fn reference(p0: f64, grads: &[f64], s: AdamWStep) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = i as i32 + 1;
            m = s.beta1 * m + (1.0 - s.beta1) * g;
            v = s.beta2 * v + (1.0 - s.beta2) * g * g;
            let (mh, vh) = (m / (1.0 - s.beta1.powi(t)), v / (1.0 - s.beta2.powi(t)));
            p = p * s.decay - s.lr * mh / (vh.sqrt() + s.eps);
        }
        p
    }

    /// Three updates of a 2×50 000 parameter (several parallel chunks) follow the equations, in
    /// f64 and f32, on the kernels and on the composed path.
    #[test]
    fn updates_follow_the_equations() -> Result<()> {
        let dev = Device::Cpu;
        let base = AdamWStep { lr: 0.05, beta1: 0.9, beta2: 0.99, eps: 1e-8, decay: 1.0 - 0.05 * 0.1, t: 0 };
        let p0 = Tensor::randn(0f64, 1., (2, 50_000), &dev)?;
        let grads: Vec<Tensor> =
            (0..3).map(|_| Tensor::randn(0f64, 1., (2, 50_000), &dev)).collect::<Result<_>>()?;
        let p0v = p0.flatten_all()?.to_vec1::<f64>()?;
        let gv: Vec<Vec<f64>> =
            grads.iter().map(|g| g.flatten_all()?.to_vec1::<f64>()).collect::<Result<_>>()?;
        for dtype in [DType::F64, DType::F32] {
            for portable in [false, true] {
                let p = p0.to_dtype(dtype)?.copy()?;
                let mv = adamw_moments(&p)?;
                let run = || -> Result<()> {
                    for (i, g) in grads.iter().enumerate() {
                        adamw_update(&p, &mv, &g.to_dtype(dtype)?, &AdamWStep { t: i as u64 + 1, ..base })?;
                    }
                    Ok(())
                };
                if portable {
                    crate::nn::with_portable_layers(run)?
                } else {
                    run()?
                }
                let got = p.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                for (i, (&got, &p0)) in got.iter().zip(&p0v).enumerate().step_by(997) {
                    let want = reference(p0, &[gv[0][i], gv[1][i], gv[2][i]], base);
                    assert!(
                        (got - want).abs() < tol * (1.0 + want.abs()),
                        "{dtype:?} portable={portable} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The kernels and the composition give the same f32 parameters (to rounding).
    #[test]
    fn kernels_match_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let p0 = Tensor::randn(0f32, 1., (64, 3, 3, 3), &dev)?;
        let g = Tensor::randn(0f32, 1., (64, 3, 3, 3), &dev)?;
        let step = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, decay: 0.999, t: 1 };
        let (a, b) = (p0.copy()?, p0.copy()?);
        let (ma, mb) = (adamw_moments(&a)?, adamw_moments(&b)?);
        adamw_update(&a, &ma, &g, &step)?;
        crate::nn::with_portable_layers(|| adamw_update(&b, &mb, &g, &step))?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "parameters differ by {d}");
        let d = (ma - mb)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "moments differ by {d}");
        Ok(())
    }

    #[test]
    fn rejects_mismatched_state() {
        let dev = Device::Cpu;
        let p = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let g = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let step = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, decay: 1.0, t: 1 };
        let wrong = Tensor::zeros((2, 11), DType::F32, &dev).unwrap();
        assert!(adamw_update(&p, &wrong, &g, &step).unwrap_err().to_string().contains("do not fit"));
        let mv = adamw_moments(&p).unwrap();
        assert!(
            adamw_update(&p, &mv, &g, &AdamWStep { t: 0, ..step })
                .unwrap_err()
                .to_string()
                .contains("start at 1")
        );
    }
}
