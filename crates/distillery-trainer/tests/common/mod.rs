//! Fixture for the pipeline and service tests: a small faces dataset in Lance (PNG faces whose
//! bright quadrant encodes the class) and a teacher cache whose rows are a noisy version of the
//! truth, so a run has something to learn and a teacher to agree with.
#![allow(dead_code)]

use distillery_cache::{CacheOptions, CacheRow, FaceStore, TeacherCache, TeacherMeta};
use distillery_core::{FaceId, TeacherFingerprint};
use distillery_data::{FaceRecord, Split, View};

pub const SIDE: u32 = 32;

fn png(i: u32, class: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let q = (x >= SIDE / 2) as u32 + 2 * ((y >= SIDE / 2) as u32);
        let on = q == class % 4;
        let noise = ((i * 31 + x * 7 + y * 13) % 23) as u8;
        let base: u8 = if on { 200 } else { 40 };
        let tint = if class >= 4 { 60 } else { 0 };
        image::Rgb([base + noise, base.saturating_sub(tint) + noise, 40 + tint + noise])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

/// Face `i`: class `i % 8`, valence/arousal from the class; every fifth face is in `val`.
pub fn face(i: u32) -> FaceRecord {
    let class = i % 8;
    let image = png(i, class);
    FaceRecord {
        id: FaceId::of(&image, None),
        image,
        width: SIDE,
        height: SIDE,
        box_xywh: None,
        label: Some(class),
        valence: Some(class as f32 / 4.0 - 0.9),
        arousal: Some(if class.is_multiple_of(2) { 0.4 } else { -0.3 }),
        split: if i % 5 == 4 { Split::Val } else { Split::Train },
        source: format!("test:{i}"),
    }
}

pub fn meta() -> TeacherMeta {
    TeacherMeta {
        fingerprint: TeacherFingerprint::parse(&"ab".repeat(16)).unwrap(),
        name: "fixture-teacher".into(),
        classes: distillery_core::classes::EMONET_8.iter().map(|s| s.to_string()).collect(),
    }
}

/// The fixture teacher's row: confident in the true class, valence/arousal close to the truth.
pub fn row(f: &FaceRecord) -> CacheRow {
    let c = f.label.unwrap() as usize;
    CacheRow {
        face_id: f.id.clone(),
        view: View::plain(),
        logits: (0..8).map(|k| if k == c { 3.0 } else { (k as f32 * 0.1).sin() }).collect(),
        valence: f.valence.map(|v| v * 0.9),
        arousal: f.arousal.map(|a| a * 0.9),
        embedding: Some((0..6).map(|k| ((c + k) % 3) as f32).collect()),
        landmarks: None,
    }
}

/// Writes `n` faces and their teacher rows; returns (faces URI, cache URI).
pub async fn datasets(dir: &std::path::Path, n: u32) -> (String, String) {
    let faces_uri = dir.join("faces.lance").display().to_string();
    let cache_uri = dir.join("cache.lance").display().to_string();
    let mut faces = FaceStore::create_or_open(&faces_uri).await.unwrap();
    let records: Vec<FaceRecord> = (0..n).map(face).collect();
    faces.append(records.clone()).await.unwrap();
    let mut cache = TeacherCache::create_or_open(&cache_uri, CacheOptions::default()).await.unwrap();
    let m = meta();
    for shard in faces.shards(64).await.unwrap() {
        let rows: Vec<CacheRow> = faces.read_shard(&shard).await.unwrap().iter().map(row).collect();
        let key = shard.key();
        let staged = cache.stage(&m, &key, "fixture", rows).await.unwrap();
        cache.commit(&key, staged).await.unwrap();
    }
    (faces_uri, cache_uri)
}

/// A quick run on the fixture: tiny student at 32 px, a few steps.
pub fn config_toml(faces: &str, cache: Option<&str>, steps: u64) -> String {
    let cache = cache.map(|c| format!("cache = \"{c}\"\n")).unwrap_or_default();
    format!(
        r#"seed = 3
[data]
faces = "{faces}"
{cache}batch_size = 16
workers = 1
shuffle_buffer = 64
[student]
spec = "tiny@32"
num_classes = 8
[loss]
feature = "mse"
feature_weight = 0.1
[optim]
lr = 0.003
warmup_steps = 2
steps = {steps}
[checkpoint]
every_n_steps = 4
[log]
every_n_steps = 2
"#
    )
}
