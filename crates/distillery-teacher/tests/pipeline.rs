//! The labelling pipeline on in-memory shards: one row per (face, view), corrupt images skipped,
//! cached pairs not recomputed, rows matching the teacher, and queues within their bounds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use distillery_core::FaceId;
use distillery_data::{FaceRecord, Split};
use distillery_models::teacher::Teacher;
use distillery_teacher::metrics::stage;
use distillery_teacher::pipeline::{MemorySink, views_for};
use distillery_teacher::prep::prepare_views;
use distillery_teacher::{Engine, Metrics, PipelineConfig, ShardJob, TinyTeacher, label_shard};

fn png_face(i: u32) -> FaceRecord {
    let img = image::RgbImage::from_fn(12, 10, |x, y| {
        image::Rgb([(x * 20 + i) as u8, (y * 25) as u8, (i * 37 % 256) as u8])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    let image = buf.into_inner();
    let box_xywh = Some([1.0, 1.0, 10.0, 8.0]);
    FaceRecord {
        id: FaceId::of(&image, box_xywh),
        image,
        width: 12,
        height: 10,
        box_xywh,
        label: Some(i % 8),
        valence: None,
        arousal: None,
        split: Split::Train,
        source: format!("test:{i}"),
    }
}

fn corrupt_face() -> FaceRecord {
    let image = b"\x89PNG\r\n\x1a\nthis is not really a png".to_vec();
    FaceRecord {
        id: FaceId::of(&image, None),
        image,
        box_xywh: None,
        source: "test:corrupt".into(),
        ..png_face(0)
    }
}

fn small_cfg() -> PipelineConfig {
    PipelineConfig {
        max_batch: 4,
        max_delay: Duration::from_millis(5),
        decode_threads: 2,
        decode_queue: 2,
        ready_queue: 3,
        infer_queue: 1,
        stage_rows: 16,
    }
}

#[tokio::test]
async fn one_row_per_face_view_with_corrupt_and_cached_skipped() {
    let teacher = Arc::new(TinyTeacher::new(5, 8, &Device::Cpu).unwrap());
    let engine = Engine::start(teacher.clone(), 2);
    let metrics = Metrics::new();
    let job = ShardJob { shard_key: "s0".into(), augmentations: 2, view_seed: 9 };
    let mut faces: Vec<FaceRecord> = (0..40).map(png_face).collect();
    faces.insert(17, corrupt_face());
    faces.push(png_face(3)); // a duplicate face must not produce duplicate rows
    let cached = faces[0].id.clone();
    let mut sink = MemorySink::default();
    sink.existing.insert((cached.clone(), 1));

    let cfg = small_cfg();
    let report = label_shard(&engine, &cfg, &metrics, &job, faces.clone(), &mut sink).await.unwrap();

    assert_eq!(report.faces, 41);
    assert_eq!(report.skipped_existing, 1);
    assert_eq!(report.rows, 40 * 3 - 1);
    assert_eq!(sink.rows.len(), report.rows);
    assert!(sink.chunks >= report.rows / cfg.stage_rows, "rows are staged in chunks");
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.failures[0].face_id, corrupt_face().id);
    assert!(report.failures[0].reason.contains("decode"), "{}", report.failures[0].reason);
    assert_eq!(metrics.errors(distillery_teacher::metrics::error_kind::DECODE), 1);

    let keys: HashSet<(FaceId, u32)> = sink.rows.iter().map(|r| (r.face_id.clone(), r.view.index)).collect();
    assert_eq!(keys.len(), sink.rows.len(), "exactly one row per (face, view)");
    assert!(!keys.contains(&(cached.clone(), 1)));
    assert!(keys.contains(&(cached, 2)));

    // Every row is the teacher's output for exactly that face and view.
    let by_id: HashMap<FaceId, &FaceRecord> = faces.iter().map(|f| (f.id.clone(), f)).collect();
    for row in sink.rows.iter().step_by(7) {
        let f = by_id[&row.face_id];
        let views = views_for(&f.id, 2, 9);
        assert_eq!(views[row.view.index as usize], row.view);
        let input = prepare_views(&f.image, f.box_xywh, &[row.view], &teacher.info().preprocess).unwrap();
        let x = Tensor::from_vec(input[0].clone(), (1, 3, 8, 8), &Device::Cpu).unwrap();
        let out = teacher.forward(&x).unwrap();
        let want = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in row.logits.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "row {:?}: {:?} vs {:?}", row.view, row.logits, want);
        }
        assert_eq!(row.landmarks.as_ref().unwrap().len(), 136);
        assert!(row.valence.unwrap().abs() <= 1.0);
    }

    // Batches respect the configured maximum and account for every row.
    assert!(metrics.batch_size_max.get() <= 4 && metrics.batch_size_max.get() >= 1);
    assert!(metrics.batches.get() as usize >= report.rows.div_ceil(4));
    assert_eq!(metrics.images.get() as usize, report.rows);
}

#[tokio::test]
async fn queues_stay_within_their_bounds() {
    let teacher = Arc::new(TinyTeacher::new(1, 8, &Device::Cpu).unwrap());
    let engine = Engine::start(teacher, 1);
    let metrics = Metrics::new();
    let job = ShardJob { shard_key: "s1".into(), augmentations: 3, view_seed: 0 };
    let faces: Vec<FaceRecord> = (0..60).map(png_face).collect();
    let mut sink = MemorySink::default();
    let cfg = small_cfg();
    let report = label_shard(&engine, &cfg, &metrics, &job, faces, &mut sink).await.unwrap();
    assert_eq!(report.rows, 240);

    for s in [stage::DECODE, stage::READY, stage::INFER] {
        let (hw, cap) = (metrics.high_water(s), metrics.capacity(s));
        assert!(hw >= 1, "stage {s} was never used");
        assert!(hw <= cap, "stage {s}: high water {hw} above its bound {cap}");
    }
    // All prepared inputs alive at once: bounded by construction, far below the shard's 240.
    let bound = cfg.in_flight_bound(4, 4) as i64;
    let hw = metrics.high_water(stage::IN_FLIGHT);
    assert_eq!(metrics.capacity(stage::IN_FLIGHT), bound);
    assert!(hw >= 4 && hw <= bound, "in flight high water {hw}, bound {bound}");
    assert!(bound < 240);
    let text = metrics.render();
    assert!(text.contains("distillery_teacher_queue_high_water{stage=\"ready\"}"), "{text}");
}

#[tokio::test]
async fn a_shard_fully_cached_does_no_work() {
    let teacher = Arc::new(TinyTeacher::new(1, 8, &Device::Cpu).unwrap());
    let engine = Engine::start(teacher, 1);
    let metrics = Metrics::new();
    let job = ShardJob { shard_key: "s2".into(), augmentations: 1, view_seed: 0 };
    let faces: Vec<FaceRecord> = (0..5).map(png_face).collect();
    let mut sink = MemorySink::default();
    for f in &faces {
        sink.existing.insert((f.id.clone(), 0));
        sink.existing.insert((f.id.clone(), 1));
    }
    let report = label_shard(&engine, &small_cfg(), &metrics, &job, faces, &mut sink).await.unwrap();
    assert_eq!((report.rows, report.skipped_existing, sink.rows.len()), (0, 10, 0));
    assert_eq!(metrics.batches.get(), 0);
}
