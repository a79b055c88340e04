//! Procedurally drawn, labelled synthetic faces for tests, demos and smoke-training.
//!
//! Each face is drawn by our own rasteriser (`raster`) from a parametric model: face oval, eyes
//! (openness), eyebrows (height, inner-end tilt), nose (wrinkle), mouth (corner curvature, opening,
//! width, one-sided raise) and cheeks. Every EmoNet class moves these parameters in its own direction
//! (after the facial action units that characterise it: e.g. fear raises the inner brows and stretches
//! an open mouth, anger lowers and knits them and presses the lips), scaled by a continuous
//! *intensity* `t ∈ [0.2, 1]`. Valence and arousal are the class's circumplex position times the same
//! `t` plus a little jitter, so they are predictable from the image, not just from the class.
//!
//! Nuisance variation makes the task non-trivial: pose (±20° roll, offset, scale), face shape, skin
//! tone, hair, lighting gradient and colour cast, background clutter, glasses, sunglasses, hats, a
//! random occluder and Gaussian pixel noise.
//!
//! Everything is a pure function of `(seed, index)`: the RNG is ChaCha8 seeded with `seed` on stream
//! `index`, the class is a per-8-block permutation (exact balance) and the split comes from a hash
//! of `(seed, index)`. So faces can be generated in any order, in parallel, and always come out
//! byte-identical.

mod raster;

use std::f32::consts::PI;
use std::ops::Range;

use distillery_core::{Error, FaceId, classes::EMONET_8};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use self::raster::{Canvas, Rgb, V2, mix, quad_bezier, scale, v2};
use crate::{FaceRecord, Split};

/// What to generate: `count` faces of `size`×`size` pixels from `seed`, split by `split` fractions.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    pub count: u64,
    /// Side of the square image in pixels (16..=1024).
    pub size: u32,
    pub seed: u64,
    /// Fractions of train, val and test; non-negative, summing to 1.
    pub split: [f32; 3],
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self { count: 1000, size: 64, seed: 0, split: [0.8, 0.1, 0.1] }
    }
}

impl SynthConfig {
    /// Checks the configuration; errors name the field (`synth.size`, `synth.split`).
    pub fn validate(&self) -> distillery_core::Result<()> {
        if !(16..=1024).contains(&self.size) {
            return Err(Error::config("synth.size", format!("{} is not in 16..=1024", self.size)));
        }
        let sum: f32 = self.split.iter().sum();
        if self.split.iter().any(|f| !f.is_finite() || *f < 0.0) || (sum - 1.0).abs() > 1e-4 {
            return Err(Error::config(
                "synth.split",
                format!("{:?} must be three non-negative fractions summing to 1", self.split),
            ));
        }
        Ok(())
    }
}

/// Ground truth of one synthetic face.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SynthLabels {
    /// Index into EmoNet's 8 classes.
    pub label: u32,
    pub valence: f32,
    pub arousal: f32,
    /// Expression strength in [0.2, 1]; valence/arousal scale with it (0 for neutral faces).
    pub intensity: f32,
}

/// Circumplex position (valence, arousal) of each EmoNet class at full intensity.
pub const CLASS_VA: [[f32; 2]; 8] = [
    [0.0, 0.0],   // neutral
    [0.7, 0.4],   // happy
    [-0.6, -0.4], // sad
    [0.2, 0.8],   // surprise
    [-0.6, 0.7],  // fear
    [-0.7, 0.3],  // disgust
    [-0.6, 0.7],  // anger
    [-0.4, 0.2],  // contempt
];

/// Facial parameters, as offsets from a neutral face (units are loosely "fraction of the full
/// range" of each feature; see `draw_face` for how each one moves the drawing).
#[derive(Clone, Copy, Debug, Default)]
struct Expr {
    eye_open: f32,
    brow_height: f32,
    /// Positive raises the inner ends (sad, fear), negative lowers and knits them (anger).
    brow_tilt: f32,
    /// Mouth-corner raise: positive smiles, negative frowns.
    curve: f32,
    open: f32,
    width: f32,
    /// One-sided corner raise (contempt).
    asym: f32,
    /// Nose wrinkle and raised upper lip (disgust).
    wrinkle: f32,
    teeth: f32,
    cheeks: f32,
}

const fn ex(v: [f32; 10]) -> Expr {
    Expr {
        eye_open: v[0],
        brow_height: v[1],
        brow_tilt: v[2],
        curve: v[3],
        open: v[4],
        width: v[5],
        asym: v[6],
        wrinkle: v[7],
        teeth: v[8],
        cheeks: v[9],
    }
}

/// Each class's expression at full intensity, in EmoNet order.
const CLASS_EXPR: [Expr; 8] = [
    //   eye   brow_h tilt  curve  open  width asym wrinkle teeth cheeks
    ex([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]), // neutral
    ex([-0.25, 0.05, 0.0, 1.0, 0.35, 0.35, 0.0, 0.0, 1.0, 1.0]), // happy
    ex([-0.25, 0.05, 0.9, -0.8, 0.0, -0.1, 0.0, 0.0, 0.0, 0.0]), // sad
    ex([0.55, 0.9, 0.15, 0.0, 1.0, -0.45, 0.0, 0.0, 0.0, 0.0]), // surprise
    ex([0.5, 0.55, 0.8, -0.35, 0.55, 0.45, 0.0, 0.0, 1.0, 0.0]), // fear
    ex([-0.35, -0.35, -0.3, -0.6, 0.2, 0.0, 0.0, 1.0, 1.0, 0.0]), // disgust
    ex([-0.25, -0.6, -1.0, -0.4, 0.12, -0.15, 0.0, 0.35, 1.0, 0.0]), // anger
    ex([-0.1, 0.05, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), // contempt
];

const SKIN: [Rgb; 8] = [
    [0.98, 0.84, 0.74],
    [0.94, 0.76, 0.64],
    [0.87, 0.68, 0.54],
    [0.78, 0.58, 0.43],
    [0.66, 0.47, 0.33],
    [0.55, 0.38, 0.26],
    [0.43, 0.29, 0.20],
    [0.33, 0.22, 0.15],
];

const HAIR: [Rgb; 6] = [
    [0.08, 0.06, 0.05],
    [0.22, 0.14, 0.08],
    [0.42, 0.27, 0.14],
    [0.75, 0.60, 0.35],
    [0.55, 0.22, 0.10],
    [0.62, 0.62, 0.62],
];

const EYES: [Rgb; 4] = [[0.25, 0.15, 0.08], [0.12, 0.08, 0.05], [0.25, 0.42, 0.6], [0.3, 0.45, 0.25]];

/// SplitMix64 finaliser: a cheap, well-mixed 64-bit hash.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash2(a: u64, b: u64) -> u64 {
    splitmix64(splitmix64(a) ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// The EmoNet class of face `index`: each aligned block of 8 indices holds every class once, in a
/// seed- and block-dependent order, so any prefix is balanced to within one face per class.
pub fn class_of(seed: u64, index: u64) -> u32 {
    let block = index / 8;
    let mut perm: [u32; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
    let mut h = hash2(seed ^ 0x636C_6173_7365_7321, block);
    for i in (1..8).rev() {
        h = splitmix64(h);
        let j = (h % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm[(index % 8) as usize]
}

/// The split of face `index`, from a hash of `(seed, index)` compared with the cumulative fractions.
pub fn split_of(seed: u64, index: u64, fractions: [f32; 3]) -> Split {
    let u = (hash2(seed ^ 0x7370_6C69_7421, index) >> 11) as f64 / (1u64 << 53) as f64;
    if u < fractions[0] as f64 {
        Split::Train
    } else if u < (fractions[0] + fractions[1]) as f64 {
        Split::Val
    } else {
        Split::Test
    }
}

fn uni(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

/// Standard normal sample (Box–Muller; one of the pair is discarded for simplicity).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1 = rng.random::<f32>().max(1e-7);
    let u2 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

fn jitter_rgb(rng: &mut ChaCha8Rng, c: Rgb, s: f32) -> Rgb {
    [
        (c[0] + s * normal(rng)).clamp(0.0, 1.0),
        (c[1] + s * normal(rng)).clamp(0.0, 1.0),
        (c[2] + s * normal(rng)).clamp(0.0, 1.0),
    ]
}

fn random_rgb(rng: &mut ChaCha8Rng) -> Rgb {
    [rng.random(), rng.random(), rng.random()]
}

/// Draws face `index` of `seed` at `size`×`size` pixels and returns it with its labels.
pub fn generate_one(seed: u64, index: u64, size: u32) -> (RgbImage, SynthLabels) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let label = class_of(seed, index);

    // Expression: the class direction scaled by intensity, plus per-parameter noise that blurs
    // class boundaries (weak expressions of different classes look alike, as in real faces).
    let intensity = if label == 0 { 0.0 } else { uni(&mut rng, 0.2, 1.0) };
    let dir = CLASS_EXPR[label as usize];
    let mut e = Expr::default();
    {
        let n = 0.07;
        let mut f = |d: f32| d * intensity + n * normal(&mut rng);
        e.eye_open = f(dir.eye_open);
        e.brow_height = f(dir.brow_height);
        e.brow_tilt = f(dir.brow_tilt);
        e.curve = f(dir.curve);
        e.open = f(dir.open);
        e.width = f(dir.width);
        e.asym = f(dir.asym);
        e.wrinkle = f(dir.wrinkle);
    }
    e.teeth = dir.teeth;
    e.cheeks = dir.cheeks * intensity;
    let [cv, ca] = CLASS_VA[label as usize];
    let valence = (cv * intensity + 0.05 * normal(&mut rng)).clamp(-1.0, 1.0);
    let arousal = (ca * intensity + 0.05 * normal(&mut rng)).clamp(-1.0, 1.0);

    let canvas = draw_face(&mut rng, &e, size as usize);
    let sigma = uni(&mut rng, 0.004, 0.045);
    let img = canvas.to_rgb8(|| sigma * normal(&mut rng));
    (img, SynthLabels { label, valence, arousal, intensity })
}

/// Maps face-local coordinates (face half-height 1, y down) to pixels.
struct Pose {
    centre: V2,
    scale: f32,
    roll: f32,
}

impl Pose {
    fn p(&self, q: V2) -> V2 {
        self.centre + q.rot(self.roll) * self.scale
    }
    fn ps(&self, qs: &[V2]) -> Vec<V2> {
        qs.iter().map(|q| self.p(*q)).collect()
    }
    fn r(&self, r: V2) -> V2 {
        r * self.scale
    }
    fn l(&self, len: f32) -> f32 {
        len * self.scale
    }
}

fn draw_face(rng: &mut ChaCha8Rng, e: &Expr, size: usize) -> Canvas {
    let s = size as f32;
    let bg0 = random_rgb(rng);
    let bg1 = mix(bg0, random_rgb(rng), uni(rng, 0.2, 0.8));
    let bg_dir = v2(1.0, 0.0).rot(uni(rng, 0.0, 2.0 * PI));
    let mut cv = Canvas::new(size, size, bg0);
    for (i, px) in cv.px.iter_mut().enumerate() {
        let p = v2((i % size) as f32 / s - 0.5, (i / size) as f32 / s - 0.5);
        *px = mix(bg0, bg1, (p.dot(bg_dir) + 0.7) / 1.4);
    }

    // Background clutter.
    for _ in 0..rng.random_range(2..9) {
        let c = v2(uni(rng, 0.0, s), uni(rng, 0.0, s));
        let col = random_rgb(rng);
        let a = uni(rng, 0.4, 1.0);
        match rng.random_range(0..3) {
            0 => {
                let r = v2(uni(rng, 0.03, 0.3) * s, uni(rng, 0.03, 0.3) * s);
                cv.fill_ellipse(c, r, uni(rng, 0.0, PI), col, a);
            }
            1 => {
                let (hw, hh, ang) = (uni(rng, 0.03, 0.3) * s, uni(rng, 0.03, 0.3) * s, uni(rng, 0.0, PI));
                let pts: Vec<V2> = [v2(-hw, -hh), v2(hw, -hh), v2(hw, hh), v2(-hw, hh)]
                    .iter()
                    .map(|q| c + q.rot(ang))
                    .collect();
                cv.fill_polygon(&pts, col, a);
            }
            _ => {
                let d = v2(uni(rng, 0.1, 0.6) * s, 0.0).rot(uni(rng, 0.0, 2.0 * PI));
                cv.stroke_polyline(&[c, c + d], uni(rng, 0.01, 0.05) * s, col, a);
            }
        }
    }

    let pose = Pose {
        centre: v2(s * (0.5 + uni(rng, -0.07, 0.07)), s * (0.47 + uni(rng, -0.05, 0.07))),
        scale: s * 0.33 * uni(rng, 0.86, 1.1),
        roll: uni(rng, -20.0, 20.0).to_radians(),
    };
    let roll = pose.roll;
    let frx = 0.74 + 0.05 * normal(rng); // face half-width
    let skin = pick(rng, &SKIN);
    let skin = jitter_rgb(rng, skin, 0.025);
    let skin_dark = scale(skin, 0.8);
    let hair = pick(rng, &HAIR);
    let hair = jitter_rgb(rng, hair, 0.03);
    let shirt = random_rgb(rng);
    let has_hair = rng.random_bool(0.85);
    let long_hair = has_hair && rng.random_bool(0.4);

    // Shoulders and neck, behind the head.
    cv.fill_ellipse(pose.p(v2(0.0, 2.35)), pose.r(v2(1.9, 1.05)), roll, shirt, 1.0);
    if long_hair {
        for side in [-1.0f32, 1.0] {
            let c = pose.p(v2(side * frx * 0.92, 0.55));
            cv.fill_ellipse(c, pose.r(v2(0.3, 0.8)), roll - side * 0.1, hair, 1.0);
        }
    }
    let neck = pose.ps(&[v2(-0.3, 0.5), v2(0.3, 0.5), v2(0.34, 1.55), v2(-0.34, 1.55)]);
    cv.fill_polygon(&neck, scale(skin, 0.88), 1.0);
    if has_hair {
        cv.fill_ellipse(pose.p(v2(0.0, -0.14)), pose.r(v2(frx * 1.16, 1.1)), roll, hair, 1.0);
    }
    for side in [-1.0f32, 1.0] {
        let c = pose.p(v2(side * frx * 0.98, 0.04));
        cv.fill_ellipse(c, pose.r(v2(0.12, 0.2)), roll, scale(skin, 0.92), 1.0);
    }
    cv.fill_ellipse(pose.p(v2(0.0, 0.0)), pose.r(v2(frx, 1.0)), roll, skin, 1.0);
    // Jaw shading keeps the oval readable on skin-coloured backgrounds.
    cv.stroke_ellipse(pose.p(v2(0.0, 0.0)), pose.r(v2(frx, 1.0)), roll, pose.l(0.03), skin_dark, 0.6);
    if has_hair {
        let c = pose.p(v2(uni(rng, -0.15, 0.15), -0.98 + uni(rng, 0.0, 0.08)));
        cv.fill_ellipse(c, pose.r(v2(frx * 1.02, 0.32)), roll + uni(rng, -0.15, 0.15), hair, 1.0);
    }

    // Cheeks and nasolabial folds (smiles raise the cheeks; disgust deepens the folds).
    let mouth_y = 0.53 + 0.02 * normal(rng);
    let mw = (0.26 * (1.0 + 0.5 * e.width)).clamp(0.1, 0.45);
    if e.cheeks > 0.05 {
        for side in [-1.0f32, 1.0] {
            let c = pose.p(v2(side * 0.42, 0.2));
            cv.fill_ellipse(c, pose.r(v2(0.16, 0.1)), roll, [0.9, 0.45, 0.45], 0.3 * e.cheeks);
        }
    }
    let folds = (e.cheeks + e.wrinkle).clamp(0.0, 1.0);
    if folds > 0.05 {
        for side in [-1.0f32, 1.0] {
            let pts = pose.ps(&quad_bezier(
                v2(side * 0.15, 0.22),
                v2(side * (mw + 0.12), 0.3),
                v2(side * (mw + 0.07), mouth_y + 0.06),
                6,
            ));
            cv.stroke_polyline(&pts, pose.l(0.025), skin_dark, 0.7 * folds);
        }
    }

    // Eyes.
    let eye_dx = 0.32 + 0.02 * normal(rng);
    let eye_y = -0.12 + 0.02 * normal(rng);
    let open = (0.5 + e.eye_open + 0.05 * normal(rng)).clamp(0.04, 1.2);
    let eye_col = pick(rng, &EYES);
    let eye_col = jitter_rgb(rng, eye_col, 0.03);
    let gaze = v2(0.03 * normal(rng), 0.01 * normal(rng));
    let ink = [0.12, 0.08, 0.07];
    for side in [-1.0f32, 1.0] {
        let ec = v2(side * eye_dx, eye_y);
        let ry = 0.02 + 0.1 * open;
        let (erx, tilt) = (0.15, side * 0.06);
        cv.fill_ellipse(pose.p(ec), pose.r(v2(erx, ry)), roll + tilt, [0.95, 0.94, 0.92], 1.0);
        let ir = 0.068f32;
        let ic = pose.p(ec + gaze);
        cv.fill_ellipse(ic, pose.r(v2(ir, ir.min(ry * 0.95))), roll, eye_col, 1.0);
        cv.fill_ellipse(ic, pose.r(v2(0.032, 0.032f32.min(ry * 0.7))), roll, [0.02; 3], 1.0);
        // Upper lid along the top half of the eye, lower lid thinner.
        let arc = |lower: bool| -> Vec<V2> {
            (0..=8)
                .map(|i| {
                    let t = PI * i as f32 / 8.0;
                    let q = v2(-erx * t.cos(), if lower { ry } else { -ry } * t.sin());
                    pose.p(ec + q.rot(tilt))
                })
                .collect()
        };
        cv.stroke_polyline(&arc(false), pose.l(0.035), ink, 0.9);
        cv.stroke_polyline(&arc(true), pose.l(0.018), skin_dark, 0.7);
        if e.cheeks > 0.3 {
            // Raised lower lid of a Duchenne smile.
            let pts = arc(true).iter().map(|p| *p + v2(0.0, pose.l(0.05)).rot(roll)).collect::<Vec<_>>();
            cv.stroke_polyline(&pts, pose.l(0.02), skin_dark, 0.5 * e.cheeks);
        }
    }

    // Eyebrows: height moves both ends, tilt raises (sad, fear) or lowers and knits (anger) the inner
    // ends. Contempt lifts the brow on its raised side a little.
    let smirk_side = if rng.random_bool(0.5) { -1.0f32 } else { 1.0 };
    let brow_w = 0.065 * uni(rng, 0.8, 1.3);
    let brow_col = mix(hair, ink, 0.4);
    for side in [-1.0f32, 1.0] {
        let by = -0.41 - 0.15 * e.brow_height - if side == smirk_side { 0.05 * e.asym } else { 0.0 };
        let inner_x = 0.11 + 0.03 * e.brow_tilt.min(0.0);
        let inner = v2(side * inner_x, by - 0.12 * e.brow_tilt);
        let outer = v2(side * 0.5, by + 0.05 + 0.03 * e.brow_tilt);
        let ctrl = v2(side * 0.32, by - 0.09 - 0.05 * e.brow_height.max(0.0));
        let pts = pose.ps(&quad_bezier(inner, ctrl, outer, 8));
        cv.stroke_polyline(&pts, pose.l(brow_w), brow_col, 0.95);
    }

    // Nose, with wrinkles across the bridge for disgust and anger.
    let nose_dir = if rng.random_bool(0.5) { -1.0f32 } else { 1.0 };
    let nose = pose.ps(&[v2(0.02 * nose_dir, -0.05), v2(0.07 * nose_dir, 0.2), v2(0.0, 0.27)]);
    cv.stroke_polyline(&nose, pose.l(0.03), skin_dark, 0.6);
    for side in [-1.0f32, 1.0] {
        cv.fill_ellipse(pose.p(v2(side * 0.07, 0.27)), pose.r(v2(0.035, 0.02)), roll, scale(skin, 0.5), 0.6);
    }
    if e.wrinkle > 0.1 {
        for k in 0..3 {
            let y = -0.06 + 0.055 * k as f32;
            let pts = pose.ps(&quad_bezier(v2(-0.09, y + 0.01), v2(0.0, y - 0.02), v2(0.09, y + 0.01), 4));
            cv.stroke_polyline(&pts, pose.l(0.018), skin_dark, (0.8 * e.wrinkle).min(1.0));
        }
    }

    // Mouth: corner heights from curvature (and a one-sided raise for contempt), opening between an
    // upper and a lower Bézier lip line.
    let lip = mix(skin, [0.7, 0.2, 0.25], 0.45);
    let corner = |side: f32| {
        let smirk = if side == smirk_side { e.asym } else { -0.1 * e.asym };
        let x = side * (mw + if side == smirk_side { 0.05 * e.asym } else { 0.0 });
        v2(x, mouth_y - 0.11 * (e.curve + 0.8 * smirk))
    };
    let (lc, rc) = (corner(-1.0), corner(1.0));
    let mid_curve = e.curve + 0.35 * e.asym;
    let open_amt = e.open.clamp(0.0, 1.2);
    if open_amt < 0.07 {
        let ctrl = v2(0.0, mouth_y + 0.1 * mid_curve);
        cv.stroke_polyline(&pose.ps(&quad_bezier(lc, ctrl, rc, 10)), pose.l(0.045), mix(lip, ink, 0.4), 0.95);
        cv.fill_ellipse(pose.p(v2(0.0, mouth_y + 0.09)), pose.r(v2(mw * 0.5, 0.035)), roll, lip, 0.5);
    } else {
        let up_ctrl = v2(0.0, mouth_y - 0.12 * open_amt + 0.05 * mid_curve - 0.08 * e.wrinkle.max(0.0));
        let lo_ctrl = v2(0.0, mouth_y + 0.32 * open_amt + 0.12 * mid_curve);
        let upper = quad_bezier(lc, up_ctrl, rc, 10);
        let lower = quad_bezier(rc, lo_ctrl, lc, 10);
        let outline: Vec<V2> = upper.iter().chain(lower.iter()).copied().collect();
        cv.fill_polygon(&pose.ps(&outline), [0.28, 0.06, 0.07], 1.0);
        if e.teeth > 0.5 && open_amt > 0.1 {
            let depth = (0.5 * open_amt).min(0.09);
            let band: Vec<V2> =
                upper.iter().copied().chain(upper.iter().rev().map(|p| *p + v2(0.0, depth))).collect();
            cv.fill_polygon(&pose.ps(&band), [0.96, 0.94, 0.86], 0.95);
        }
        let mut ring = outline.clone();
        ring.push(outline[0]);
        cv.stroke_polyline(&pose.ps(&ring), pose.l(0.04), lip, 1.0);
    }

    // Occluders.
    if rng.random_bool(0.12) {
        let hat = random_rgb(rng);
        let low = uni(rng, 0.0, 0.18);
        let crown = pose.ps(&[
            v2(-frx, -0.68 + low),
            v2(frx, -0.68 + low),
            v2(frx * 0.85, -1.6),
            v2(-frx * 0.85, -1.6),
        ]);
        cv.fill_polygon(&crown, hat, 1.0);
        cv.fill_ellipse(pose.p(v2(0.0, -0.7 + low)), pose.r(v2(frx * 1.45, 0.1)), roll, scale(hat, 0.8), 1.0);
    }
    let glasses = rng.random_range(0..100u32);
    if glasses < 22 {
        let frame = jitter_rgb(rng, [0.1, 0.1, 0.1], 0.08);
        let dark = glasses < 5;
        for side in [-1.0f32, 1.0] {
            let c = pose.p(v2(side * eye_dx, eye_y + 0.02));
            let r = pose.r(v2(0.21, 0.15));
            if dark {
                cv.fill_ellipse(c, r, roll, [0.05, 0.05, 0.07], 0.93);
            }
            cv.stroke_ellipse(c, r, roll, pose.l(0.035), frame, 1.0);
            let temple = pose.ps(&[v2(side * (eye_dx + 0.21), eye_y), v2(side * frx, eye_y - 0.03)]);
            cv.stroke_polyline(&temple, pose.l(0.03), frame, 1.0);
        }
        let bridge = pose.ps(&[v2(-eye_dx + 0.21, eye_y), v2(eye_dx - 0.21, eye_y)]);
        cv.stroke_polyline(&bridge, pose.l(0.03), frame, 1.0);
    }
    if rng.random_bool(0.05) {
        // A random object in front of part of the face.
        let c = pose.p(v2(uni(rng, -0.8, 0.8), uni(rng, -0.6, 0.9)));
        let r = pose.r(v2(uni(rng, 0.2, 0.5), uni(rng, 0.15, 0.4)));
        cv.fill_ellipse(c, r, uni(rng, 0.0, PI), random_rgb(rng), 1.0);
    }

    // Lighting: brightness, a linear gradient across the image and a colour cast.
    let bright = uni(rng, 0.7, 1.2);
    let grad = uni(rng, 0.0, 0.7);
    let light_dir = v2(1.0, 0.0).rot(uni(rng, 0.0, 2.0 * PI));
    let cast = [uni(rng, 0.9, 1.1), uni(rng, 0.9, 1.1), uni(rng, 0.9, 1.1)];
    let centre = v2(s * 0.5, s * 0.5);
    cv.modulate(|p| {
        let k = bright * (1.0 + grad * ((p - centre) * (1.0 / s)).dot(light_dir));
        [k * cast[0], k * cast[1], k * cast[2]]
    });
    cv
}

/// Encodes an RGB image as PNG (fast compression: synthetic sets are regenerated, not archived).
pub fn encode_png(img: &RgbImage) -> Vec<u8> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::with_capacity(img.as_raw().len() / 2);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .expect("encoding an in-memory RGB8 PNG cannot fail");
    out
}

/// Face `index` of `cfg` as a stored record (whole image is the face; source `synth:<seed>:<index>`).
pub fn record(cfg: &SynthConfig, index: u64) -> FaceRecord {
    let (img, labels) = generate_one(cfg.seed, index, cfg.size);
    let image = encode_png(&img);
    FaceRecord {
        id: FaceId::of(&image, None),
        image,
        width: cfg.size,
        height: cfg.size,
        box_xywh: None,
        label: Some(labels.label),
        valence: Some(labels.valence),
        arousal: Some(labels.arousal),
        split: split_of(cfg.seed, index, cfg.split),
        source: format!("synth:{}:{}", cfg.seed, index),
    }
}

/// Faces `range` of `cfg`, generated in parallel, in index order.
pub fn generate_batch(cfg: &SynthConfig, range: Range<u64>) -> Vec<FaceRecord> {
    range.into_par_iter().map(|i| record(cfg, i)).collect()
}

/// Faces generated in parallel batches of this many.
const BATCH: u64 = 256;

/// All `cfg.count` faces in index order, generated lazily in parallel batches (memory stays at one
/// batch). Call [`SynthConfig::validate`] first; an invalid config is not checked here.
pub fn generate(cfg: SynthConfig) -> impl Iterator<Item = FaceRecord> {
    let count = cfg.count;
    (0..count.div_ceil(BATCH)).flat_map(move |b| {
        let start = b * BATCH;
        generate_batch(&cfg, start..(start + BATCH).min(count))
    })
}

/// Name of class `label` of a synthetic face (EmoNet order).
pub fn class_name(label: u32) -> &'static str {
    EMONET_8[label as usize]
}
