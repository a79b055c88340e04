//! A tiny anti-aliased rasteriser for the synthetic faces.
//!
//! Every primitive is drawn from a signed distance `d` (pixels, negative inside): a pixel centre
//! gets coverage `clamp(0.5 − d, 0, 1)`, which is an analytic one-pixel box filter across the edge.
//! That is enough anti-aliasing for 32–256 px faces and needs no supersampling, so a 64² face with a
//! few dozen shapes costs well under a millisecond. Only the bounding box of each shape is visited.

use std::ops::{Add, Mul, Neg, Sub};

use image::RgbImage;

/// A point or vector in pixel (or face-local) coordinates; `y` points down.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub(crate) struct V2 {
    pub x: f32,
    pub y: f32,
}

pub(crate) const fn v2(x: f32, y: f32) -> V2 {
    V2 { x, y }
}

impl V2 {
    pub fn dot(self, o: V2) -> f32 {
        self.x * o.x + self.y * o.y
    }
    pub fn len(self) -> f32 {
        self.dot(self).sqrt()
    }
    /// Rotates by `a` radians (clockwise on screen, as `y` points down).
    pub fn rot(self, a: f32) -> V2 {
        let (s, c) = a.sin_cos();
        v2(c * self.x - s * self.y, s * self.x + c * self.y)
    }
}

impl Add for V2 {
    type Output = V2;
    fn add(self, o: V2) -> V2 {
        v2(self.x + o.x, self.y + o.y)
    }
}
impl Sub for V2 {
    type Output = V2;
    fn sub(self, o: V2) -> V2 {
        v2(self.x - o.x, self.y - o.y)
    }
}
impl Mul<f32> for V2 {
    type Output = V2;
    fn mul(self, k: f32) -> V2 {
        v2(self.x * k, self.y * k)
    }
}
impl Neg for V2 {
    type Output = V2;
    fn neg(self) -> V2 {
        v2(-self.x, -self.y)
    }
}

/// Linear RGB colour with components in 0..=1.
pub(crate) type Rgb = [f32; 3];

pub(crate) fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

pub(crate) fn scale(a: Rgb, k: f32) -> Rgb {
    [a[0] * k, a[1] * k, a[2] * k]
}

/// Points of the quadratic Bézier `p0 → p2` with control `p1`, `n + 1` of them, ends included.
pub(crate) fn quad_bezier(p0: V2, p1: V2, p2: V2, n: usize) -> Vec<V2> {
    (0..=n)
        .map(|i| {
            let t = i as f32 / n as f32;
            let u = 1.0 - t;
            p0 * (u * u) + p1 * (2.0 * u * t) + p2 * (t * t)
        })
        .collect()
}

/// Distance from `p` to the segment `a–b`.
fn seg_dist(p: V2, a: V2, b: V2) -> f32 {
    let ab = b - a;
    let l2 = ab.dot(ab);
    let t = if l2 > 0.0 { ((p - a).dot(ab) / l2).clamp(0.0, 1.0) } else { 0.0 };
    (p - (a + ab * t)).len()
}

/// Approximate signed distance to an ellipse with radii `r`, rotated by `angle`, centred at the
/// origin: `k0 (k0 − 1) / k1` with `k0 = |p/r|`, `k1 = |p/r²|` (first-order correction of the
/// implicit function by its gradient). Exact on the boundary, good to a fraction of a pixel near it.
fn ellipse_sd(p: V2, r: V2, angle: f32) -> f32 {
    let q = p.rot(-angle);
    let k0 = v2(q.x / r.x, q.y / r.y).len();
    let k1 = v2(q.x / (r.x * r.x), q.y / (r.y * r.y)).len();
    if k1 < 1e-6 { -r.x.min(r.y) } else { k0 * (k0 - 1.0) / k1 }
}

/// An RGB float image that shapes are alpha-blended into.
pub(crate) struct Canvas {
    pub w: usize,
    pub h: usize,
    pub px: Vec<Rgb>,
}

impl Canvas {
    pub fn new(w: usize, h: usize, fill: Rgb) -> Self {
        Self { w, h, px: vec![fill; w * h] }
    }

    /// Calls `f(x, y, centre)` for each pixel whose centre lies in the box `lo..hi` grown by 1 px.
    fn for_box(&mut self, lo: V2, hi: V2, mut f: impl FnMut(&mut Rgb, V2)) {
        let x0 = (lo.x - 1.0).floor().max(0.0) as usize;
        let y0 = (lo.y - 1.0).floor().max(0.0) as usize;
        let x1 = ((hi.x + 1.0).ceil().max(0.0) as usize).min(self.w);
        let y1 = ((hi.y + 1.0).ceil().max(0.0) as usize).min(self.h);
        for y in y0..y1 {
            let row = &mut self.px[y * self.w..(y + 1) * self.w];
            for (x, px) in row.iter_mut().enumerate().take(x1).skip(x0) {
                f(px, v2(x as f32 + 0.5, y as f32 + 0.5));
            }
        }
    }

    /// Blends `color` with opacity `alpha × coverage(d(p))` where `d` is a signed distance.
    fn shade(&mut self, lo: V2, hi: V2, color: Rgb, alpha: f32, sd: impl Fn(V2) -> f32) {
        self.for_box(lo, hi, |px, p| {
            let cov = (0.5 - sd(p)).clamp(0.0, 1.0) * alpha;
            if cov > 0.0 {
                *px = mix(*px, color, cov);
            }
        });
    }

    pub fn fill_ellipse(&mut self, c: V2, r: V2, angle: f32, color: Rgb, alpha: f32) {
        let m = r.x.max(r.y);
        self.shade(c - v2(m, m), c + v2(m, m), color, alpha, |p| ellipse_sd(p - c, r, angle));
    }

    /// The outline of an ellipse, `width` pixels wide, centred on its boundary.
    pub fn stroke_ellipse(&mut self, c: V2, r: V2, angle: f32, width: f32, color: Rgb, alpha: f32) {
        let m = r.x.max(r.y) + width;
        self.shade(c - v2(m, m), c + v2(m, m), color, alpha, |p| {
            ellipse_sd(p - c, r, angle).abs() - width * 0.5
        });
    }

    pub fn stroke_polyline(&mut self, pts: &[V2], width: f32, color: Rgb, alpha: f32) {
        if pts.is_empty() {
            return;
        }
        let (lo, hi) = bounds(pts, width * 0.5);
        self.shade(lo, hi, color, alpha, |p| {
            let d = if pts.len() == 1 {
                (p - pts[0]).len()
            } else {
                pts.windows(2).map(|s| seg_dist(p, s[0], s[1])).fold(f32::INFINITY, f32::min)
            };
            d - width * 0.5
        });
    }

    /// Fills a closed polygon (even–odd rule), anti-aliased along its edges.
    pub fn fill_polygon(&mut self, pts: &[V2], color: Rgb, alpha: f32) {
        if pts.len() < 3 {
            return;
        }
        let (lo, hi) = bounds(pts, 0.0);
        self.shade(lo, hi, color, alpha, |p| {
            let mut d = f32::INFINITY;
            let mut inside = false;
            let mut j = pts.len() - 1;
            for i in 0..pts.len() {
                let (a, b) = (pts[j], pts[i]);
                d = d.min(seg_dist(p, a, b));
                if (a.y > p.y) != (b.y > p.y) && p.x < a.x + (p.y - a.y) / (b.y - a.y) * (b.x - a.x) {
                    inside = !inside;
                }
                j = i;
            }
            if inside { -d } else { d }
        });
    }

    /// Multiplies every pixel by `f(centre)` (lighting).
    pub fn modulate(&mut self, f: impl Fn(V2) -> Rgb) {
        let (w, h) = (self.w as f32, self.h as f32);
        self.for_box(v2(0.0, 0.0), v2(w, h), |px, p| {
            let k = f(p);
            *px = [px[0] * k[0], px[1] * k[1], px[2] * k[2]];
        });
    }

    /// Quantises to 8-bit RGB; `noise(i)` is added per channel sample `i` before rounding.
    pub fn to_rgb8(&self, mut noise: impl FnMut() -> f32) -> RgbImage {
        let mut buf = Vec::with_capacity(self.w * self.h * 3);
        for px in &self.px {
            for c in px {
                buf.push(((c + noise()) * 255.0).round().clamp(0.0, 255.0) as u8);
            }
        }
        RgbImage::from_raw(self.w as u32, self.h as u32, buf).expect("buffer has w*h*3 bytes")
    }
}

fn bounds(pts: &[V2], pad: f32) -> (V2, V2) {
    let mut lo = v2(f32::INFINITY, f32::INFINITY);
    let mut hi = v2(f32::NEG_INFINITY, f32::NEG_INFINITY);
    for p in pts {
        lo = v2(lo.x.min(p.x), lo.y.min(p.y));
        hi = v2(hi.x.max(p.x), hi.y.max(p.y));
    }
    (lo - v2(pad, pad), hi + v2(pad, pad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coverage_sum(c: &Canvas) -> f32 {
        c.px.iter().map(|p| p[0]).sum()
    }

    #[test]
    fn ellipse_area_matches_analytic_area() {
        let mut c = Canvas::new(64, 64, [0.0; 3]);
        c.fill_ellipse(v2(32.0, 31.3), v2(20.0, 11.0), 0.4, [1.0; 3], 1.0);
        let area = std::f32::consts::PI * 20.0 * 11.0;
        let got = coverage_sum(&c);
        assert!((got - area).abs() / area < 0.01, "area {got} vs {area}");
        // Anti-aliased: some pixels are partially covered.
        assert!(c.px.iter().any(|p| p[0] > 0.05 && p[0] < 0.95));
    }

    #[test]
    fn polygon_and_stroke_areas() {
        let mut c = Canvas::new(40, 40, [0.0; 3]);
        c.fill_polygon(&[v2(5.0, 5.0), v2(25.0, 5.0), v2(25.0, 15.5)], [1.0; 3], 1.0);
        let got = coverage_sum(&c);
        assert!((got - 105.0).abs() < 2.0, "triangle area {got}");
        let mut c = Canvas::new(40, 40, [0.0; 3]);
        c.stroke_polyline(&[v2(5.0, 20.0), v2(35.0, 20.0)], 2.0, [1.0; 3], 1.0);
        // A 30×2 bar plus two half-disc caps of radius 1.
        let got = coverage_sum(&c);
        assert!((got - (60.0 + std::f32::consts::PI)).abs() < 2.0, "stroke area {got}");
    }

    #[test]
    fn shapes_outside_the_canvas_are_clipped() {
        let mut c = Canvas::new(8, 8, [0.0; 3]);
        c.fill_ellipse(v2(-50.0, 4.0), v2(3.0, 3.0), 0.0, [1.0; 3], 1.0);
        c.stroke_polyline(&[v2(100.0, 100.0), v2(120.0, 130.0)], 3.0, [1.0; 3], 1.0);
        assert_eq!(coverage_sum(&c), 0.0);
        c.fill_ellipse(v2(4.0, 4.0), v2(30.0, 30.0), 0.0, [1.0; 3], 1.0);
        assert_eq!(coverage_sum(&c), 64.0);
    }
}
