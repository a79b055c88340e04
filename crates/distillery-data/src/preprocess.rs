//! From encoded bytes to a model input: decode (with limits), crop a face box, apply a view,
//! resize and normalise per a [`Preprocess`] spec.
//!
//! Conventions, so that teachers see inputs like those they were made for:
//! - boxes are `[x, y, w, h]` in pixels, rounded to whole pixels; parts outside the image are zeros;
//! - `pad_to_square` centres the crop on a zero square of side `max(w, h)` (face-api's inputs);
//! - bilinear resizing uses half-pixel centres (`src = (dst + 0.5)·in/out − 0.5`, clamped to the
//!   edge) without antialiasing, as OpenCV's `INTER_LINEAR` and PyTorch's `align_corners=False`;
//! - values stay f32 after resizing (no rounding back to bytes).

use std::io::Cursor;

use candle_core::{Device, Tensor};
use distillery_core::{Layout, Preprocess, ResizeFilter};
use image::{ImageError, ImageReader, Limits, RgbImage};

use crate::View;

/// Largest accepted image side in pixels.
pub const MAX_SIDE: u32 = 8192;
/// Largest allocation a decoder may make, in bytes.
pub const MAX_ALLOC: u64 = 512 * 1024 * 1024;

/// Why an encoded image could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("image is empty (0 bytes)")]
    Empty,
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),
    #[error("image too large: {0} (limits: {MAX_SIDE}×{MAX_SIDE} pixels, {MAX_ALLOC} bytes)")]
    TooLarge(String),
    #[error("image is truncated: {0}")]
    Truncated(String),
    #[error("corrupt {format} image: {reason}")]
    Corrupt { format: String, reason: String },
}

/// Decodes a JPEG or PNG into RGB, refusing images beyond [`MAX_SIDE`] / [`MAX_ALLOC`] before
/// their pixels are allocated (decompression bombs).
pub fn decode(bytes: &[u8]) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Truncated(e.to_string()))?;
    let Some(format) = reader.format() else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(PreprocessError::UnsupportedFormat(format!(
            "unrecognised signature {} (JPEG and PNG are supported)",
            head.join(" ")
        )));
    };
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let fmt = format!("{format:?}");
    match reader.decode() {
        Ok(img) => Ok(img.into_rgb8()),
        Err(ImageError::Limits(e)) => Err(PreprocessError::TooLarge(e.to_string())),
        Err(ImageError::Unsupported(e)) => Err(PreprocessError::UnsupportedFormat(e.to_string())),
        Err(ImageError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(PreprocessError::Truncated(format!("{fmt} data ends early: {e}")))
        }
        Err(e) => {
            let reason = e.to_string();
            let lower = reason.to_ascii_lowercase();
            if lower.contains("eof")
                || lower.contains("end of")
                || lower.contains("truncat")
                || lower.contains("unexpected end")
            {
                Err(PreprocessError::Truncated(format!("{fmt} data ends early: {reason}")))
            } else {
                Err(PreprocessError::Corrupt { format: fmt, reason })
            }
        }
    }
}

/// Crops `box_xywh` (pixels, rounded) out of `img`; pixels outside the image are zero. With
/// `pad_to_square` the crop is centred on a zero square of side `max(w, h)`.
pub fn crop(img: &RgbImage, box_xywh: [f32; 4], pad_to_square: bool) -> RgbImage {
    let x0 = box_xywh[0].round() as i64;
    let y0 = box_xywh[1].round() as i64;
    let w = (box_xywh[2].round() as i64).max(1);
    let h = (box_xywh[3].round() as i64).max(1);
    let (cw, ch, offx, offy) = if pad_to_square {
        let side = w.max(h);
        (side, side, (side - w) / 2, (side - h) / 2)
    } else {
        (w, h, 0, 0)
    };
    let (iw, ih) = (img.width() as i64, img.height() as i64);
    let mut out = RgbImage::new(cw as u32, ch as u32);
    for oy in 0..h {
        let sy = y0 + oy;
        if sy < 0 || sy >= ih {
            continue;
        }
        for ox in 0..w {
            let sx = x0 + ox;
            if sx < 0 || sx >= iw {
                continue;
            }
            out.put_pixel((ox + offx) as u32, (oy + offy) as u32, *img.get_pixel(sx as u32, sy as u32));
        }
    }
    out
}

/// EmoNet's AffectNet crop: a square of side `0.91·(w + h)` about the box centre.
pub fn affectnet_box(b: [f32; 4]) -> [f32; 4] {
    let (cx, cy) = (b[0] + b[2] / 2.0, b[1] + b[3] / 2.0);
    let side = 0.91 * (b[2] + b[3]);
    [cx - side / 2.0, cy - side / 2.0, side, side]
}

/// Applies a [`View`]: the sub-crop (relative to `img`'s size; zeros outside), then the flip.
pub fn apply_view(img: &RgbImage, view: &View) -> RgbImage {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let plain = view.crop == [0.0, 0.0, 1.0, 1.0];
    let mut out = if plain {
        img.clone()
    } else {
        let c = view.crop;
        crop(img, [c[0] * w, c[1] * h, c[2] * w, c[3] * h], false)
    };
    if view.flip {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// Resizes `img` to `p.size` and normalises it: `(v·scale − mean[c]) / std[c]`, as `[C, H, W]`
/// (or `[H, W, C]` for [`Layout::Nhwc`]), one grey channel (ITU-R 601 luma) when `channels == 1`.
pub fn to_chw(img: &RgbImage, p: &Preprocess) -> Vec<f32> {
    let [oh, ow] = p.size;
    let rgb = resize(img, oh, ow, p.filter);
    let c = p.channels;
    let norm = |ch: usize, v: f32| {
        let v = v * p.scale - p.mean.get(ch).copied().unwrap_or(0.0);
        v / p.std.get(ch).copied().unwrap_or(1.0)
    };
    let mut out = vec![0f32; c * oh * ow];
    for i in 0..oh * ow {
        let px = &rgb[i * 3..i * 3 + 3];
        for ch in 0..c {
            let v = if c == 1 { 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2] } else { px[ch] };
            let idx = match p.layout {
                Layout::Nchw => ch * oh * ow + i,
                Layout::Nhwc => i * c + ch,
            };
            out[idx] = norm(ch, v);
        }
    }
    out
}

/// Interleaved RGB f32 of `img` resized to `oh`×`ow`.
fn resize(img: &RgbImage, oh: usize, ow: usize, filter: ResizeFilter) -> Vec<f32> {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let mut out = vec![0f32; oh * ow * 3];
    if iw == 0 || ih == 0 {
        return out;
    }
    match filter {
        ResizeFilter::Nearest => {
            let pick = |o: usize, n_in: usize, n_out: usize| {
                (((o as f64 + 0.5) * n_in as f64 / n_out as f64) as usize).min(n_in - 1)
            };
            for y in 0..oh {
                let sy = pick(y, ih, oh);
                for x in 0..ow {
                    let sx = pick(x, iw, ow);
                    for c in 0..3 {
                        out[(y * ow + x) * 3 + c] = src[(sy * iw + sx) * 3 + c] as f32;
                    }
                }
            }
        }
        ResizeFilter::Bilinear => {
            // Per output coordinate: the two source indices and the weight of the second.
            let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
                let scale = n_in as f64 / n_out as f64;
                (0..n_out)
                    .map(|o| {
                        let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                        let i0 = (s.floor() as usize).min(n_in - 1);
                        let i1 = (i0 + 1).min(n_in - 1);
                        (i0, i1, (s - i0 as f64).min(1.0) as f32)
                    })
                    .collect()
            };
            let (ty, tx) = (taps(ih, oh), taps(iw, ow));
            for (y, &(y0, y1, wy)) in ty.iter().enumerate() {
                for (x, &(x0, x1, wx)) in tx.iter().enumerate() {
                    for c in 0..3 {
                        let p = |yy: usize, xx: usize| src[(yy * iw + xx) * 3 + c] as f32;
                        let top = p(y0, x0) + (p(y0, x1) - p(y0, x0)) * wx;
                        let bot = p(y1, x0) + (p(y1, x1) - p(y1, x0)) * wx;
                        out[(y * ow + x) * 3 + c] = top + (bot - top) * wy;
                    }
                }
            }
        }
    }
    out
}

/// Stacks preprocessed items (each from [`to_chw`] with the same `p`) into `[n, C, H, W]` (or
/// `[n, H, W, C]`) on `device`.
pub fn batch_to_tensor(items: &[Vec<f32>], p: &Preprocess, device: &Device) -> candle_core::Result<Tensor> {
    let [h, w] = p.size;
    let per = p.channels * h * w;
    let mut flat = Vec::with_capacity(items.len() * per);
    for (i, it) in items.iter().enumerate() {
        if it.len() != per {
            candle_core::bail!(
                "item {i} has {} values, expected {per} for {:?}×{}",
                it.len(),
                p.size,
                p.channels
            );
        }
        flat.extend_from_slice(it);
    }
    let n = items.len();
    match p.layout {
        Layout::Nchw => Tensor::from_vec(flat, (n, p.channels, h, w), device),
        Layout::Nhwc => Tensor::from_vec(flat, (n, h, w, p.channels), device),
    }
}
