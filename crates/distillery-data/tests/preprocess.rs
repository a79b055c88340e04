//! Image preprocessing on tiny synthetic images.

use candle_core::Device;
use distillery_core::{Layout, Preprocess, ResizeFilter};
use distillery_data::View;
use distillery_data::preprocess::{
    PreprocessError, affectnet_box, apply_view, batch_to_tensor, crop, decode, to_chw,
};
use image::{ImageEncoder, Rgb, RgbImage};

/// 4×3 image whose pixel (x, y) is (10x + y, 100 + y, 200 − x).
fn tiny() -> RgbImage {
    RgbImage::from_fn(4, 3, |x, y| Rgb([(10 * x + y) as u8, (100 + y) as u8, (200 - x) as u8]))
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .unwrap();
    buf
}

fn raw(side: usize) -> Preprocess {
    Preprocess { size: [side, side], scale: 1.0, ..Preprocess::emonet() }
}

#[test]
fn decode_round_trips_png_and_explains_failures() {
    let img = tiny();
    let bytes = png(&img);
    assert_eq!(decode(&bytes).unwrap(), img);
    assert!(matches!(decode(&[]), Err(PreprocessError::Empty)));
    let e = decode(b"GIF89a not really").unwrap_err();
    assert!(matches!(e, PreprocessError::UnsupportedFormat(_)), "{e}");
    assert!(e.to_string().contains("unsupported"), "{e}");
    let e = decode(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(matches!(e, PreprocessError::Truncated(_) | PreprocessError::Corrupt { .. }), "{e}");
}

#[test]
fn decode_refuses_images_beyond_the_size_limit() {
    // A valid PNG header declaring 9000×16 pixels: refused from the header, before decoding.
    let img = RgbImage::new(9000, 16);
    let e = decode(&png(&img)).unwrap_err();
    assert!(matches!(e, PreprocessError::TooLarge(_)), "{e}");
    assert!(e.to_string().contains("too large"), "{e}");
}

#[test]
fn crop_zero_pads_outside_the_image_and_centres_squares() {
    let img = tiny();
    // Box sticking out on the left and top by one pixel.
    let c = crop(&img, [-1.0, -1.0, 3.0, 2.0], false);
    assert_eq!(c.dimensions(), (3, 2));
    assert_eq!(c.get_pixel(0, 0), &Rgb([0, 0, 0]));
    assert_eq!(c.get_pixel(1, 1), img.get_pixel(0, 0));
    assert_eq!(c.get_pixel(2, 1), img.get_pixel(1, 0));
    // 2 wide × 4 tall centred on a 4×4 zero square: one zero column each side.
    let s = crop(&img, [1.0, 0.0, 2.0, 4.0], true);
    assert_eq!(s.dimensions(), (4, 4));
    assert_eq!(s.get_pixel(0, 0), &Rgb([0, 0, 0]));
    assert_eq!(s.get_pixel(3, 2), &Rgb([0, 0, 0]));
    assert_eq!(s.get_pixel(1, 0), img.get_pixel(1, 0));
    assert_eq!(s.get_pixel(2, 2), img.get_pixel(2, 2));
    assert_eq!(s.get_pixel(1, 3), &Rgb([0, 0, 0])); // row 3 is below the image
}

#[test]
fn affectnet_box_is_a_centred_square() {
    let b = affectnet_box([10.0, 20.0, 40.0, 60.0]);
    let side = 0.91 * 100.0;
    assert!((b[2] - side).abs() < 1e-4 && (b[3] - side).abs() < 1e-4);
    assert!((b[0] + b[2] / 2.0 - 30.0).abs() < 1e-4);
    assert!((b[1] + b[3] / 2.0 - 50.0).abs() < 1e-4);
}

#[test]
fn apply_view_crops_relative_then_flips() {
    let img = tiny();
    assert_eq!(apply_view(&img, &View::plain()), img);
    let v = View { index: 1, crop: [0.25, 0.0, 0.5, 1.0], flip: true };
    let out = apply_view(&img, &v);
    assert_eq!(out.dimensions(), (2, 3));
    // Columns 1..3 of the source, mirrored.
    assert_eq!(out.get_pixel(0, 1), img.get_pixel(2, 1));
    assert_eq!(out.get_pixel(1, 1), img.get_pixel(1, 1));
}

#[test]
fn to_chw_bilinear_uses_half_pixel_centres() {
    // 2×1 → 4×1: source centres at 0.5 and 1.5; outputs sample at (o + 0.5)/2 − 0.5 =
    // −0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1): [a, .75a+.25b, .25a+.75b, b].
    let img = RgbImage::from_fn(2, 1, |x, _| if x == 0 { Rgb([0, 40, 80]) } else { Rgb([100, 40, 0]) });
    let p = Preprocess { size: [1, 4], ..raw(1) };
    let v = to_chw(&img, &p);
    assert_eq!(v.len(), 3 * 4);
    assert_eq!(&v[0..4], &[0.0, 25.0, 75.0, 100.0]);
    assert_eq!(&v[4..8], &[40.0; 4]);
    assert_eq!(&v[8..12], &[80.0, 60.0, 20.0, 0.0]);
    // Downscaling 4×1 → 2×1 samples at 0.5 and 2.5: plain averages of neighbours.
    let img = RgbImage::from_fn(4, 1, |x, _| Rgb([(x * 10) as u8, 0, 0]));
    let v = to_chw(&img, &Preprocess { size: [1, 2], ..raw(1) });
    assert_eq!(&v[0..2], &[5.0, 25.0]);
}

#[test]
fn to_chw_normalises_per_channel_and_honours_layout_and_grey() {
    let img = RgbImage::from_pixel(2, 2, Rgb([255, 0, 51]));
    let p = Preprocess {
        size: [2, 2],
        scale: 1.0 / 255.0,
        mean: vec![0.5, 0.5, 0.0],
        std: vec![0.5, 0.25, 0.2],
        filter: ResizeFilter::Nearest,
        ..Preprocess::emonet()
    };
    let v = to_chw(&img, &p);
    assert!((v[0] - 1.0).abs() < 1e-6 && (v[4] + 2.0).abs() < 1e-6 && (v[8] - 1.0).abs() < 1e-6, "{v:?}");
    let v = to_chw(&img, &Preprocess { layout: Layout::Nhwc, ..p.clone() });
    assert!((v[0] - 1.0).abs() < 1e-6 && (v[1] + 2.0).abs() < 1e-6 && (v[2] - 1.0).abs() < 1e-6, "{v:?}");
    let grey = to_chw(&img, &Preprocess { channels: 1, mean: vec![], std: vec![], ..p });
    assert_eq!(grey.len(), 4);
    let want = (0.299 * 255.0 + 0.114 * 51.0) / 255.0;
    assert!((grey[0] - want).abs() < 1e-5, "{grey:?}");
}

#[test]
fn batch_to_tensor_stacks_and_checks_lengths() {
    let p = raw(2);
    let a = to_chw(&tiny(), &p);
    let b: Vec<f32> = a.iter().map(|v| v + 1.0).collect();
    let t = batch_to_tensor(&[a.clone(), b], &p, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3, 2, 2]);
    let rows = t.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(rows[0], a);
    assert_eq!(rows[1][0], a[0] + 1.0);
    let nhwc = Preprocess { layout: Layout::Nhwc, ..p.clone() };
    assert_eq!(batch_to_tensor(std::slice::from_ref(&a), &nhwc, &Device::Cpu).unwrap().dims(), &[1, 2, 2, 3]);
    let e = batch_to_tensor(&[a, vec![0.0; 3]], &p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("item 1"), "{e}");
}
