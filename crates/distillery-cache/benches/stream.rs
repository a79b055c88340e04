//! Throughput of the cache and the streaming reader on synthetic faces in a tempdir:
//! teacher-cache rows/s (stage+commit and read back) and decoded images/s through `open_stream`.
//!
//! `./dev bench --bench stream` (env: BENCH_FACES, BENCH_VIEWS, BENCH_WORKERS).
#![allow(clippy::print_stdout)]

/// The allocator the `distillery` binary uses, so the numbers match what users run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use distillery_cache::{
    CacheOptions, CacheRow, FaceStore, StreamConfig, TeacherCache, TeacherMeta, ViewSelection, open_stream,
};
use distillery_core::{FaceId, Preprocess, TeacherFingerprint};
use distillery_data::{FaceRecord, Split, views_for};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn face(i: u32, side: u32) -> FaceRecord {
    let mut img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(i * 31 + x) as u8, (i * 7 + y) as u8, ((x * y) ^ i) as u8])
    });
    // The first pixel spells out `i`, so every face is distinct.
    img.put_pixel(0, 0, image::Rgb([i as u8, (i >> 8) as u8, (i >> 16) as u8]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    let image = buf.into_inner();
    FaceRecord {
        id: FaceId::of(&image, None),
        image,
        width: side,
        height: side,
        box_xywh: None,
        label: Some(i % 8),
        valence: Some(0.1),
        arousal: Some(-0.2),
        split: Split::Train,
        source: format!("bench:{i}"),
    }
}

fn main() {
    let n = env("BENCH_FACES", 2000) as u32;
    let k = env("BENCH_VIEWS", 2) as u32;
    let workers = env("BENCH_WORKERS", 2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let furi = dir.path().join("faces.lance").to_str().unwrap().to_owned();
    let curi = dir.path().join("cache.lance").to_str().unwrap().to_owned();

    let (faces, cache, meta) = rt.block_on(async {
        let mut faces = FaceStore::create_or_open(&furi).await.unwrap();
        let recs: Vec<_> = (0..n).map(|i| face(i, 96)).collect();
        let t = Instant::now();
        faces.append(recs.clone()).await.unwrap();
        println!(
            "faces append: {n} faces in {:.2?} ({:.0} faces/s)",
            t.elapsed(),
            n as f64 / t.elapsed().as_secs_f64()
        );

        let meta = TeacherMeta {
            fingerprint: TeacherFingerprint::parse(&"ab".repeat(16)).unwrap(),
            name: "bench".into(),
            classes: (0..8).map(|c| format!("c{c}")).collect(),
        };
        let mut cache = TeacherCache::create_or_open(&curi, CacheOptions::default()).await.unwrap();
        let rows: Vec<CacheRow> = recs
            .iter()
            .flat_map(|f| {
                views_for(&f.id, k, 0).into_iter().map(|v| CacheRow {
                    face_id: f.id.clone(),
                    view: v,
                    logits: vec![0.5; 8],
                    valence: Some(0.1),
                    arousal: Some(0.2),
                    embedding: Some(vec![0.25; 256]),
                    landmarks: None,
                })
            })
            .collect();
        let total = rows.len();
        let t = Instant::now();
        for (s, chunk) in rows.chunks(1000).enumerate() {
            let key = format!("s{s}");
            let staged = cache.stage(&meta, &key, "bench", chunk.to_vec()).await.unwrap();
            cache.commit(&key, staged).await.unwrap();
        }
        let dt = t.elapsed().as_secs_f64();
        println!("cache stage+commit: {total} rows in {dt:.2}s ({:.0} rows/s)", total as f64 / dt);
        let t = Instant::now();
        let back = cache.rows(&meta.fingerprint).await.unwrap();
        let dt = t.elapsed().as_secs_f64();
        println!("cache read: {} rows in {dt:.3}s ({:.0} rows/s)", back.len(), back.len() as f64 / dt);
        (faces, cache, meta)
    });

    let cfg = StreamConfig {
        batch_size: 64,
        shuffle_buffer: 1024,
        epochs: Some(1),
        views: ViewSelection::All,
        workers,
        preprocess: Preprocess::unit_rgb(112),
        ..Default::default()
    };
    let stream = rt.block_on(open_stream(&faces, Some((&cache, &meta.fingerprint)), cfg)).unwrap();
    let t = Instant::now();
    let mut images = 0usize;
    for b in stream {
        images += b.unwrap().len();
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "stream: {images} decoded+preprocessed 96→112 images in {dt:.2}s ({:.0} images/s, {workers} workers)",
        images as f64 / dt
    );
}
