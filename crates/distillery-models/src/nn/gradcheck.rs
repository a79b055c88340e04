//! Finite-difference gradient checking for tests (f64, central differences).
//!
//! The scalar checked is `Σ f(x) ⊙ r` with a fixed pseudo-random `r`, not `Σ f(x)`: a plain sum
//! hides errors in layers whose outputs sum to a constant (batch norm, softmax).

use candle_core::{DType, Device, Result, Shape, Tensor, Var, bail};

/// Deterministic values in roughly [-1, 1] (a 64-bit LCG), so failures reproduce.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// An f64 variable of `shape` filled with [`pseudo_random`] values.
pub fn rand_var(shape: impl Into<Shape>, seed: u64) -> Result<Var> {
    let shape = shape.into();
    let v = pseudo_random(shape.elem_count(), seed);
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Checks candle's gradients of `f` wrt every element of every var against central differences
/// with step `eps`; fails when `|auto − numeric| > tol · (1 + |auto| + |numeric|)`.
pub fn check_grads(vars: &[&Var], eps: f64, tol: f64, f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<()> {
    let args = || vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>();
    let out = f(&args())?;
    if out.dtype() != DType::F64 {
        bail!("gradcheck: f must return f64, got {:?}", out.dtype());
    }
    let r = Tensor::from_vec(pseudo_random(out.elem_count(), 99), out.shape(), &Device::Cpu)?;
    let loss = |args: &[Tensor]| -> Result<Tensor> { f(args)?.mul(&r)?.sum_all() };
    let grads = loss(&args())?.backward()?;
    for (vi, var) in vars.iter().enumerate() {
        let auto: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => vec![0.0; var.elem_count()],
        };
        let base: Vec<f64> = var.as_tensor().flatten_all()?.to_vec1()?;
        let shape = var.shape().clone();
        for i in 0..base.len() {
            let at = |d: f64| -> Result<f64> {
                let mut v = base.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu)?)?;
                loss(&args())?.to_scalar::<f64>()
            };
            let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), shape.clone(), &Device::Cpu)?)?;
            let a = auto[i];
            if (a - numeric).abs() > tol * (1.0 + a.abs() + numeric.abs()) {
                bail!("gradcheck: arg {vi} element {i}: autograd {a} vs finite difference {numeric}");
            }
        }
    }
    Ok(())
}
