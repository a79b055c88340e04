//! Test fixtures: tiny synthetic faces (real PNG bytes) and teacher rows derived from them.
#![allow(dead_code)]

use distillery_cache::{CacheRow, TeacherMeta};
use distillery_core::{FaceId, TeacherFingerprint};
use distillery_data::{FaceRecord, Split, View};

/// A `w`×`h` PNG whose pixels encode `seed`, so every face differs.
pub fn png(seed: u32, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(seed * 37 + x * 5) as u8, (seed * 11 + y * 7) as u8, (seed * 3 + x + y) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

/// Face `i` of a synthetic dataset: labelled with class `i % 8`, valence/arousal from `i`,
/// split train except every fifth (val); every third face has a box.
pub fn face(i: u32) -> FaceRecord {
    let image = png(i, 12, 10);
    let box_xywh = i.is_multiple_of(3).then_some([1.0, 1.0, 8.0, 7.0]);
    FaceRecord {
        id: FaceId::of(&image, box_xywh),
        image,
        width: 12,
        height: 10,
        box_xywh,
        label: (i % 7 != 6).then_some(i % 8),
        valence: Some((i as f32 * 0.1).sin()),
        arousal: (!i.is_multiple_of(4)).then(|| (i as f32 * 0.2).cos() * 0.5),
        split: if i % 5 == 4 { Split::Val } else { Split::Train },
        source: format!("synth:0:{i}"),
    }
}

pub fn faces(range: std::ops::Range<u32>) -> Vec<FaceRecord> {
    range.map(face).collect()
}

pub fn meta(tag: u8) -> TeacherMeta {
    TeacherMeta {
        fingerprint: TeacherFingerprint::parse(&format!("{:02x}", tag).repeat(16)).unwrap(),
        name: format!("teacher{tag}"),
        classes: distillery_core::classes::EMONET_8.iter().map(|s| s.to_string()).collect(),
    }
}

/// The teacher row for (face, view): logits are a deterministic, exactly representable
/// function of the id and view so tests can recompute them.
pub fn row(id: &FaceId, view: View) -> CacheRow {
    let h = u32::from_str_radix(&id.as_str()[..6], 16).unwrap();
    let logits: Vec<f32> = (0..8).map(|c| ((h >> c) % 97) as f32 * 0.125 - 6.0 + view.index as f32).collect();
    CacheRow {
        face_id: id.clone(),
        view,
        logits,
        valence: Some((h % 200) as f32 / 100.0 - 1.0),
        arousal: view.index.is_multiple_of(2).then(|| (h % 150) as f32 / 150.0),
        embedding: Some((0..4).map(|k| (h % (k + 5)) as f32 + 0.3).collect()),
        landmarks: (view.index == 0).then(|| (0..136).map(|k| k as f32 * 0.5).collect()),
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn uri(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_str().unwrap().to_owned()
}
