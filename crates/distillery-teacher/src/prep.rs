//! Encoded face → model input, for the pipeline and the `Infer` RPC.
//!
//! Everything goes through [`prepare_views`]: decode once, cut the face box, then for each view cut
//! its sub-crop, mirror it if asked and apply the teacher's [`Preprocess`]. Decoding once per face
//! (not per view) matters: decoding dominates CPU time.

use distillery_core::{Layout, Preprocess, ResizeFilter};
use distillery_data::View;
use image::RgbImage;
use image::imageops::{self, FilterType};

/// Decodes `bytes` (JPEG or PNG) to RGB.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, String> {
    image::load_from_memory(bytes).map(|i| i.to_rgb8()).map_err(|e| format!("cannot decode image: {e}"))
}

/// Integer pixel rectangle of `[x, y, w, h]` (floats) clamped to a `width`×`height` image.
fn clamp_rect(r: [f32; 4], width: u32, height: u32) -> Result<(u32, u32, u32, u32), String> {
    if r.iter().any(|v| !v.is_finite()) || r[2] <= 0.0 || r[3] <= 0.0 {
        return Err(format!("invalid box {r:?}"));
    }
    let x0 = r[0].max(0.0).floor() as u32;
    let y0 = r[1].max(0.0).floor() as u32;
    let x1 = ((r[0] + r[2]).ceil().max(0.0) as u32).min(width);
    let y1 = ((r[1] + r[3]).ceil().max(0.0) as u32).min(height);
    if x1 <= x0 || y1 <= y0 {
        return Err(format!("box {r:?} lies outside the {width}x{height} image"));
    }
    Ok((x0, y0, x1 - x0, y1 - y0))
}

/// The face crop of `img` for `box_xywh` (None: the whole image).
pub fn crop_face(img: &RgbImage, box_xywh: Option<[f32; 4]>) -> Result<RgbImage, String> {
    match box_xywh {
        None => Ok(img.clone()),
        Some(b) => {
            let (x, y, w, h) = clamp_rect(b, img.width(), img.height())?;
            Ok(imageops::crop_imm(img, x, y, w, h).to_image())
        }
    }
}

/// Applies `view` (relative sub-crop, then optional mirror) to a face crop.
pub fn apply_view(face: &RgbImage, view: &View) -> Result<RgbImage, String> {
    let (fw, fh) = (face.width() as f32, face.height() as f32);
    let [cx, cy, cw, ch] = view.crop;
    let (x, y, w, h) = clamp_rect([cx * fw, cy * fh, cw * fw, ch * fh], face.width(), face.height())
        .map_err(|e| format!("view {}: {e}", view.index))?;
    let mut out = imageops::crop_imm(face, x, y, w, h).to_image();
    if view.flip {
        imageops::flip_horizontal_in_place(&mut out);
    }
    Ok(out)
}

/// Applies `pp` to an RGB crop; returns `C*H*W` (or `H*W*C` for NHWC) f32 values.
pub fn to_input(crop: &RgbImage, pp: &Preprocess) -> Vec<f32> {
    let mut img = crop.clone();
    if pp.pad_to_square && img.width() != img.height() {
        let side = img.width().max(img.height());
        let mut sq = RgbImage::new(side, side);
        let ox = (side - img.width()) / 2;
        let oy = (side - img.height()) / 2;
        imageops::replace(&mut sq, &img, ox as i64, oy as i64);
        img = sq;
    }
    let [oh, ow] = pp.size;
    let filter = match pp.filter {
        ResizeFilter::Bilinear => FilterType::Triangle,
        ResizeFilter::Nearest => FilterType::Nearest,
    };
    if img.width() as usize != ow || img.height() as usize != oh {
        img = imageops::resize(&img, ow as u32, oh as u32, filter);
    }
    let c = pp.channels;
    let norm = |v: f32, ch: usize| {
        let m = pp.mean.get(ch).copied().unwrap_or(0.0);
        let s = pp.std.get(ch).copied().unwrap_or(1.0);
        (v * pp.scale - m) / s
    };
    let mut out = vec![0f32; c * oh * ow];
    for (x, y, px) in img.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        let vals: [f32; 3] = [px[0] as f32, px[1] as f32, px[2] as f32];
        for ch in 0..c {
            // Grey uses ITU-R BT.601 luma, like most face models trained on grey crops.
            let v = if c == 1 { 0.299 * vals[0] + 0.587 * vals[1] + 0.114 * vals[2] } else { vals[ch] };
            let idx = match pp.layout {
                Layout::Nchw => ch * oh * ow + y * ow + x,
                Layout::Nhwc => (y * ow + x) * c + ch,
            };
            out[idx] = norm(v, ch);
        }
    }
    out
}

/// Shape of one prepared input (without the batch axis) for `pp`.
pub fn input_shape(pp: &Preprocess) -> [usize; 3] {
    let [h, w] = pp.size;
    match pp.layout {
        Layout::Nchw => [pp.channels, h, w],
        Layout::Nhwc => [h, w, pp.channels],
    }
}

/// Decodes `bytes` once and prepares each of `views` of the face at `box_xywh`.
pub fn prepare_views(
    bytes: &[u8],
    box_xywh: Option<[f32; 4]>,
    views: &[View],
    pp: &Preprocess,
) -> Result<Vec<Vec<f32>>, String> {
    let img = decode(bytes)?;
    let face = crop_face(&img, box_xywh)?;
    views.iter().map(|v| apply_view(&face, v).map(|c| to_input(&c, pp))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    #[test]
    fn views_crop_flip_and_normalise() {
        // Left half red, right half blue.
        let bytes = png(8, 8, |x, _| if x < 4 { [255, 0, 0] } else { [0, 0, 255] });
        let pp = Preprocess { size: [2, 2], filter: ResizeFilter::Nearest, ..Preprocess::unit_rgb(2) };
        let plain = View::plain();
        let flipped = View { index: 1, crop: [0.0, 0.0, 1.0, 1.0], flip: true };
        let left = View { index: 2, crop: [0.0, 0.0, 0.5, 1.0], flip: false };
        let out = prepare_views(&bytes, None, &[plain, flipped, left], &pp).unwrap();
        // CHW: red channel then green then blue, 2x2 each.
        assert_eq!(out[0], vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]);
        assert_eq!(out[1], vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(out[2], vec![1.0; 4].into_iter().chain(vec![0.0; 8]).collect::<Vec<_>>());
        // The face box is applied before the view: the right half only is blue.
        let right = prepare_views(&bytes, Some([4.0, 0.0, 4.0, 8.0]), &[plain], &pp).unwrap();
        assert_eq!(&right[0][8..], &[1.0; 4]);
    }

    #[test]
    fn corrupt_and_out_of_range_inputs_are_errors() {
        let pp = Preprocess::unit_rgb(4);
        let e = prepare_views(b"not an image", None, &[View::plain()], &pp).unwrap_err();
        assert!(e.contains("decode"), "{e}");
        let bytes = png(4, 4, |_, _| [1, 2, 3]);
        let e = prepare_views(&bytes, Some([10.0, 10.0, 2.0, 2.0]), &[View::plain()], &pp).unwrap_err();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn mean_std_grey_and_nhwc() {
        let bytes = png(2, 2, |_, _| [255, 255, 255]);
        let pp = Preprocess {
            channels: 1,
            layout: Layout::Nhwc,
            mean: vec![0.5],
            std: vec![0.25],
            ..Preprocess::unit_rgb(2)
        };
        let out = prepare_views(&bytes, None, &[View::plain()], &pp).unwrap();
        assert_eq!(input_shape(&pp), [2, 2, 1]);
        for v in &out[0] {
            assert!((v - 2.0).abs() < 1e-5, "{v}");
        }
    }
}
