//! Encoded face → model input, for the pipeline and the `Infer` RPC.
//!
//! Everything goes through [`prepare_views`]: decode once, cut the face box, then for each view cut
//! its sub-crop, mirror it if asked and apply the teacher's [`Preprocess`]. Decoding once per face
//! (not per view) matters: decoding dominates CPU time.

use distillery_core::{Layout, Preprocess};
use distillery_data::View;
use distillery_data::preprocess;
use image::RgbImage;

/// Decodes `bytes` (JPEG or PNG) to RGB, with the size limits of [`preprocess::decode`].
pub fn decode(bytes: &[u8]) -> Result<RgbImage, String> {
    preprocess::decode(bytes).map_err(|e| format!("cannot decode image: {e}"))
}

/// The face crop of `img` for `box_xywh` (None: the whole image). A box that misses the image
/// entirely is an error; one that overlaps an edge is zero-padded there.
pub fn crop_face(img: &RgbImage, box_xywh: Option<[f32; 4]>) -> Result<RgbImage, String> {
    match box_xywh {
        None => Ok(img.clone()),
        Some(b) => {
            let (w, h) = (img.width() as f32, img.height() as f32);
            if b.iter().any(|v| !v.is_finite()) || b[2] <= 0.0 || b[3] <= 0.0 {
                return Err(format!("invalid box {b:?}"));
            }
            if b[0] >= w || b[1] >= h || b[0] + b[2] <= 0.0 || b[1] + b[3] <= 0.0 {
                return Err(format!("box {b:?} lies outside the {}x{} image", img.width(), img.height()));
            }
            Ok(preprocess::crop(img, b, false))
        }
    }
}

/// Applies `view` (relative sub-crop, then optional mirror) to a face crop.
pub fn apply_view(face: &RgbImage, view: &View) -> Result<RgbImage, String> {
    if view.crop.iter().any(|v| !v.is_finite()) || view.crop[2] <= 0.0 || view.crop[3] <= 0.0 {
        return Err(format!("view {}: invalid crop {:?}", view.index, view.crop));
    }
    Ok(preprocess::apply_view(face, view))
}

/// Applies `pp` to an RGB crop (zero-padding it to a centred square first when the teacher asks
/// for that); returns `C*H*W` (or `H*W*C` for NHWC) f32 values.
pub fn to_input(crop: &RgbImage, pp: &Preprocess) -> Vec<f32> {
    if pp.pad_to_square && crop.width() != crop.height() {
        let sq = preprocess::crop(crop, [0.0, 0.0, crop.width() as f32, crop.height() as f32], true);
        preprocess::to_chw(&sq, pp)
    } else {
        preprocess::to_chw(crop, pp)
    }
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
        let pp = Preprocess {
            size: [2, 2],
            filter: distillery_core::ResizeFilter::Nearest,
            ..Preprocess::unit_rgb(2)
        };
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
