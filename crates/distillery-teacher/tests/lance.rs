//! The pipeline on a shard of a real Lance faces dataset in a temporary directory, staging into a
//! real teacher cache: one row per (face, view) after the commit, the corrupt image skipped, and a
//! second pass over the committed shard recomputing nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use distillery_cache::{CacheOptions, FaceStore, StagedFragments, TeacherCache};
use distillery_core::FaceId;
use distillery_data::{FaceRecord, Split};
use distillery_models::teacher::Teacher;
use distillery_proto::v1;
use distillery_teacher::{
    Engine, LanceStorage, Metrics, PipelineConfig, ShardJob, ShardStorage, TinyTeacher, label_shard,
};

fn face(i: u32) -> FaceRecord {
    let img = image::RgbImage::from_fn(12, 10, |x, y| {
        image::Rgb([(i * 31 + x * 9) as u8, (y * 13) as u8, (i * 7) as u8])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    let image = buf.into_inner();
    let box_xywh = i.is_multiple_of(2).then_some([1.0, 1.0, 9.0, 8.0]);
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

#[tokio::test]
async fn a_lance_shard_gets_one_row_per_face_view_and_skips_the_corrupt_image() {
    let dir = tempfile::tempdir().unwrap();
    let faces_uri = dir.path().join("faces.lance").to_str().unwrap().to_string();
    let cache_uri = dir.path().join("cache.lance").to_str().unwrap().to_string();
    let mut faces: Vec<FaceRecord> = (0..6).map(face).collect();
    // PNG magic (so the store accepts it) followed by garbage (so decoding fails).
    let bad = b"\x89PNG\r\n\x1a\n-- truncated --".to_vec();
    let corrupt = FaceRecord {
        id: FaceId::of(&bad, None),
        image: bad,
        box_xywh: None,
        source: "test:bad".into(),
        ..face(99)
    };
    faces.insert(3, corrupt.clone());
    let mut store = FaceStore::create_or_open(&faces_uri).await.unwrap();
    store.append(faces.clone()).await.unwrap();
    let shards = store.shards(1000).await.unwrap();
    assert_eq!(shards.len(), 1);
    let s = &shards[0];

    let teacher = Arc::new(TinyTeacher::new(2, 8, &Device::Cpu).unwrap());
    let engine = Engine::start(teacher.clone(), 2);
    let metrics = Metrics::new();
    let lease = v1::ShardLease {
        lease_id: "l1".into(),
        shard_key: format!("job/{}", s.key()),
        range: Some(v1::ShardRange { fragment_id: s.fragment_id, offset: s.offset, len: s.len }),
        faces_uri,
        cache_uri: cache_uri.clone(),
        views: 2,
        view_seed: 5,
        ..Default::default()
    };
    let cfg = PipelineConfig {
        max_batch: 4,
        max_delay: Duration::from_millis(2),
        stage_rows: 7,
        ..Default::default()
    };
    let job = ShardJob { shard_key: lease.shard_key.clone(), augmentations: 2, view_seed: 5 };

    let storage = LanceStorage;
    let read = storage.read_faces(&lease).await.unwrap();
    assert_eq!(read.len(), 7);
    let mut sink = storage.open_sink(&lease, teacher.info(), "w1").await.unwrap();
    let report = label_shard(&engine, &cfg, &metrics, &job, read, sink.as_mut()).await.unwrap();
    assert_eq!(report.rows, 18);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.failures[0].face_id, corrupt.id);

    // Chunks of 7 rows were merged into one staged set; the coordinator's commit makes them visible.
    let staged = StagedFragments::from_json(&report.staged).unwrap();
    assert_eq!(staged.rows, 18);
    assert!(staged.fragments.len() >= 2, "18 rows staged in chunks of 7");
    let mut cache = TeacherCache::create_or_open(&cache_uri, CacheOptions::default()).await.unwrap();
    cache.commit(&lease.shard_key, staged).await.unwrap();
    let fp = &teacher.info().fingerprint;
    let rows = cache.rows(fp).await.unwrap();
    let keys: HashSet<(FaceId, u32)> = rows.iter().map(|r| (r.face_id.clone(), r.view.index)).collect();
    assert_eq!(rows.len(), 18);
    assert_eq!(keys.len(), 18, "exactly one row per (face, view)");
    for f in faces.iter().filter(|f| f.id != corrupt.id) {
        for v in 0..=2 {
            assert!(keys.contains(&(f.id.clone(), v)), "missing {} view {v}", f.id);
        }
    }
    assert!(!keys.iter().any(|(id, _)| *id == corrupt.id));

    // A retry of the committed shard finds every pair cached and labels nothing.
    let mut sink = storage.open_sink(&lease, teacher.info(), "w1").await.unwrap();
    let again =
        label_shard(&engine, &cfg, &metrics, &job, storage.read_faces(&lease).await.unwrap(), sink.as_mut())
            .await
            .unwrap();
    assert_eq!((again.rows, again.skipped_existing, again.faces_skipped), (0, 18, 6));
}
