//! Seeded weight initialisation.
//!
//! candle's CPU random generator cannot be seeded, so a model built from a plain `VarMap` starts
//! from different weights every run. [`seeded_var_builder`] returns a `VarBuilder` whose new
//! variables are drawn from a ChaCha stream keyed by the run's seed and the variable's name, honouring
//! the initialisation each layer asks for (`Init::Randn`, `Uniform`, `Kaiming`, `Const`), and stored
//! in the given `VarMap` exactly like `VarBuilder::from_varmap` would.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Seeded {
    varmap: VarMap,
    seed: u64,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a of the name mixed with the seed: stable across platforms and runs.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Standard normal draws (Box–Muller).
fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        out.push(r * th.cos());
        out.push(r * th.sin());
    }
    out.truncate(n);
    out
}

fn uniforms(rng: &mut ChaCha8Rng, n: usize, lo: f64, up: f64) -> Vec<f64> {
    (0..n).map(|_| lo + (up - lo) * rng.random::<f64>()).collect()
}

/// Values of a new variable `name` of shape `s` initialised by `init`.
pub fn draw(s: &Shape, name: &str, init: Init, seed: u64) -> Vec<f64> {
    let n = s.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(name_seed(seed, name));
    match init {
        Init::Const(c) => vec![c; n],
        Init::Randn { mean, stdev } => normals(&mut rng, n).into_iter().map(|z| mean + stdev * z).collect(),
        Init::Uniform { lo, up } => uniforms(&mut rng, n, lo, up),
        Init::Kaiming { dist, fan, non_linearity } => {
            let fan = fan.for_shape(s);
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normals(&mut rng, n).into_iter().map(|z| std * z).collect(),
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    uniforms(&mut rng, n, -b, b)
                }
            }
        }
    }
}

impl SimpleBackend for Seeded {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        let values = draw(&s, name, h, self.seed);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("variable `{name}` must be created with a shape and an initialisation")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("varmap lock").contains_key(name)
    }
}

/// A `VarBuilder` creating variables in `varmap` from `seed` (see the module docs).
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Seeded { varmap: varmap.clone(), seed }), dtype, device.clone())
}

/// The variables of `varmap` sorted by name.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> =
        varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> Vec<(String, Var)> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
        candle_nn::linear(72, 16, vb.pp("lin")).unwrap();
        candle_nn::conv2d(8, 16, 3, Default::default(), vb.pp("conv")).unwrap();
        vb.get_with_hints(4, "scale", Init::Const(1.0)).unwrap();
        vb.get_with_hints((2, 3), "u", Init::Uniform { lo: -0.5, up: 0.25 }).unwrap();
        named_vars(&vm)
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn seeded_builder_is_deterministic_and_follows_init() {
        let (a, b, c) = (build(3), build(3), build(4));
        let names: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["conv.bias", "conv.weight", "lin.bias", "lin.weight", "scale", "u"]);
        for ((_, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(values(x), values(y));
        }
        assert_ne!(values(&a[1].1), values(&c[1].1));
        // conv weight: Kaiming normal, fan-in 8·3·3 = 72 → std √(2/72).
        let w = values(&a[1].1);
        let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        let expect = (2.0f32 / 72.0).sqrt();
        assert!((std - expect).abs() < 0.1 * expect, "{std} vs {expect}");
        assert!(values(&a[4].1).iter().all(|v| *v == 1.0));
        assert!(values(&a[5].1).iter().all(|v| (-0.5..0.25).contains(v)));
    }
}
