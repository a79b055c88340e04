//! Streaming reader over real Lance datasets: faces (small PNGs) joined with teacher rows.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use distillery_cache::{
    CacheOptions, FaceStore, StreamConfig, StreamPosition, TeacherCache, TeacherMeta, ViewSelection,
    open_stream,
};
use distillery_core::{FaceId, Preprocess};
use distillery_data::{Batch, FaceRecord, Split, views_for};

const K: u32 = 2;

struct Fixture {
    _dir: tempfile::TempDir,
    faces: FaceStore,
    cache: TeacherCache,
    meta: TeacherMeta,
    records: HashMap<FaceId, FaceRecord>,
}

async fn fixture(n: u32) -> Fixture {
    let dir = tempdir();
    let mut faces = FaceStore::create_or_open(&uri(&dir, "faces.lance")).await.unwrap();
    let recs = common::faces(0..n);
    // Two appends → two fragments, so the index spans fragments.
    faces.append(recs[..n as usize / 2].to_vec()).await.unwrap();
    faces.append(recs[n as usize / 2..].to_vec()).await.unwrap();
    let mut cache =
        TeacherCache::create_or_open(&uri(&dir, "cache.lance"), CacheOptions::default()).await.unwrap();
    let meta = meta(1);
    for (s, shard) in faces.shards(7).await.unwrap().iter().enumerate() {
        let rows: Vec<_> = faces
            .read_shard(shard)
            .await
            .unwrap()
            .iter()
            .flat_map(|f| views_for(&f.id, K, 11).into_iter().map(|v| row(&f.id, v)).collect::<Vec<_>>())
            .collect();
        let key = shard.key();
        let staged = cache.stage(&meta, &key, &format!("w{s}"), rows).await.unwrap();
        cache.commit(&key, staged).await.unwrap();
    }
    let records = recs.into_iter().map(|r| (r.id.clone(), r)).collect();
    Fixture { _dir: dir, faces, cache, meta, records }
}

fn cfg(seed: u64) -> StreamConfig {
    StreamConfig {
        batch_size: 4,
        shuffle_buffer: 8,
        seed,
        epochs: Some(2),
        views: ViewSelection::All,
        workers: 2,
        preprocess: Preprocess::unit_rgb(8),
        ..Default::default()
    }
}

fn keys(b: &Batch) -> Vec<(FaceId, u32)> {
    b.face_ids.iter().cloned().zip(b.views.iter().copied()).collect()
}

async fn run(fx: &Fixture, cfg: StreamConfig, with_cache: bool) -> (Vec<Batch>, usize) {
    let cache = with_cache.then_some((&fx.cache, &fx.meta.fingerprint));
    let stream = open_stream(&fx.faces, cache, cfg).await.unwrap();
    let per_epoch = stream.batches_per_epoch();
    let batches =
        tokio::task::spawn_blocking(move || stream.collect::<Result<Vec<_>, _>>()).await.unwrap().unwrap();
    (batches, per_epoch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_view_once_per_epoch_with_matching_labels_and_logits() {
    let fx = fixture(20).await;
    let (batches, per_epoch) = run(&fx, cfg(1), true).await;
    assert_eq!(per_epoch, 15); // 60 (face, view) pairs / 4
    assert_eq!(batches.len(), 30);
    let all: HashSet<(FaceId, u32)> =
        fx.records.keys().flat_map(|id| (0..=K).map(move |v| (id.clone(), v))).collect();
    for epoch in batches.chunks(per_epoch) {
        let seen: Vec<_> = epoch.iter().flat_map(keys).collect();
        assert_eq!(seen.len(), 60);
        assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), all);
    }
    assert_ne!(
        batches[..per_epoch].iter().flat_map(keys).collect::<Vec<_>>(),
        batches[per_epoch..].iter().flat_map(keys).collect::<Vec<_>>(),
        "epochs are shuffled differently"
    );
    for b in &batches {
        assert_eq!(b.images.dims(), &[4, 3, 8, 8]);
        let px = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(px.iter().all(|v| (0.0..=1.0).contains(v)));
        let labels = b.labels.to_vec1::<u32>().unwrap();
        let mask = b.label_mask.to_vec1::<f32>().unwrap();
        let va = b.va.to_vec2::<f32>().unwrap();
        let va_mask = b.va_mask.to_vec1::<f32>().unwrap();
        let logits = b.teacher_logits.as_ref().expect("teacher logits").to_vec2::<f32>().unwrap();
        assert!(b.teacher_embedding.is_some());
        for (i, (id, view)) in keys(b).into_iter().enumerate() {
            let r = &fx.records[&id];
            assert_eq!(mask[i] == 1.0, r.label.is_some());
            assert_eq!(labels[i], r.label.unwrap_or(0));
            match (r.valence, r.arousal) {
                (Some(v), Some(a)) => assert_eq!((va_mask[i], va[i][0], va[i][1]), (1.0, v, a)),
                _ => assert_eq!(va_mask[i], 0.0),
            }
            let view = views_for(&id, K, 11)[view as usize];
            assert_eq!(logits[i], row(&id, view).logits, "teacher logits of {id} view {}", view.index);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_deterministic_per_seed_and_resumable() {
    let fx = fixture(16).await;
    let order = |bs: &[Batch]| bs.iter().flat_map(keys).collect::<Vec<_>>();
    let (a, per_epoch) = run(&fx, cfg(5), true).await;
    let (b, _) = run(&fx, cfg(5), true).await;
    let (c, _) = run(&fx, cfg(6), true).await;
    assert_eq!(order(&a), order(&b));
    assert_ne!(order(&a), order(&c));
    // Resume in the middle of the first epoch: the rest is identical.
    let start = StreamPosition { epoch: 0, batch: 5 };
    let (r, _) = run(&fx, StreamConfig { start, ..cfg(5) }, true).await;
    assert_eq!(order(&r), order(&a[5..]));
    // The stream reports where it is.
    let mut s = open_stream(&fx.faces, Some((&fx.cache, &fx.meta.fingerprint)), cfg(5)).await.unwrap();
    let pos = tokio::task::spawn_blocking(move || {
        for _ in 0..per_epoch + 2 {
            s.next().unwrap().unwrap();
        }
        s.position()
    })
    .await
    .unwrap();
    assert_eq!(pos, StreamPosition { epoch: 1, batch: 2 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_partition_the_rows() {
    let fx = fixture(20).await;
    let mut union = Vec::new();
    for rank in 0..3 {
        let c = StreamConfig { rank, world: 3, epochs: Some(1), shuffle_buffer: 32, ..cfg(9) };
        let (b, _) = run(&fx, c, true).await;
        let mine: Vec<_> = b.iter().flat_map(keys).collect();
        assert!(!mine.is_empty() && mine.len() < 60, "rank {rank}: {}", mine.len());
        union.extend(mine);
    }
    assert_eq!(union.len(), 60, "no row on two ranks");
    assert_eq!(union.iter().cloned().collect::<HashSet<_>>().len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_views_split_filter_and_no_cache() {
    let fx = fixture(20).await;
    // Plain views only.
    let c = StreamConfig { views: ViewSelection::PlainOnly, epochs: Some(1), ..cfg(2) };
    let (b, _) = run(&fx, c, true).await;
    let seen: Vec<_> = b.iter().flat_map(keys).collect();
    assert_eq!(seen.len(), 20);
    assert!(seen.iter().all(|(_, v)| *v == 0));
    // One random view per face.
    let c = StreamConfig { views: ViewSelection::Random, epochs: Some(1), ..cfg(2) };
    let (b, _) = run(&fx, c, true).await;
    let seen: Vec<_> = b.iter().flat_map(keys).collect();
    assert_eq!(seen.iter().map(|(id, _)| id.clone()).collect::<HashSet<_>>().len(), 20);
    assert_eq!(seen.len(), 20);
    assert!(seen.iter().any(|(_, v)| *v != 0));
    // Validation split, supervised (no cache), last partial batch dropped.
    let c =
        StreamConfig { split: Some(Split::Val), drop_last: true, batch_size: 3, epochs: Some(1), ..cfg(2) };
    let (b, per_epoch) = run(&fx, c, false).await;
    assert_eq!(per_epoch, 1); // 4 val faces, batches of 3, last dropped
    assert_eq!(b.len(), 1);
    assert!(b[0].teacher_logits.is_none() && b[0].teacher_va.is_none());
    for id in &b[0].face_ids {
        assert_eq!(fx.records[id].split, Split::Val);
    }
}

#[tokio::test]
async fn bad_config_names_the_field() {
    let fx = fixture(4).await;
    let c = StreamConfig { rank: 2, world: 2, ..cfg(0) };
    let err = open_stream(&fx.faces, None, c).await.err().unwrap().to_string();
    assert!(err.contains("stream.rank"), "{err}");
}
