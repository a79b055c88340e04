//! Faces dataset on real Lance files in a tempdir.

mod common;

use std::collections::HashMap;

use common::*;
use distillery_cache::FaceStore;
use distillery_cache::faces::rejects_uri;
use distillery_data::Reject;

#[tokio::test]
async fn append_dedupes_and_round_trips_records() {
    let dir = tempdir();
    let uri = uri(&dir, "faces.lance");
    let mut store = FaceStore::create_or_open(&uri).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 0);
    assert_eq!(store.version(), 0);

    // A repeated record inside one batch counts as a duplicate.
    let mut first = faces(0..10);
    first.push(face(3));
    let st = store.append(first).await.unwrap();
    assert_eq!((st.added, st.duplicates), (10, 1));
    let v1 = store.version();
    assert!(v1 >= 1);

    // Re-ingesting the same faces plus new ones adds only the new ones, from a fresh handle too.
    let mut again = FaceStore::open(&uri).await.unwrap();
    let st = again.append(faces(5..15)).await.unwrap();
    assert_eq!((st.added, st.duplicates), (5, 5));
    assert_eq!(again.count().await.unwrap(), 15);
    let st = again.append(faces(0..15)).await.unwrap();
    assert_eq!((st.added, st.duplicates), (0, 15));
    assert_eq!(again.version(), v1 + 1, "an append of only duplicates must not commit");

    // Every field survives storage exactly.
    let expected: HashMap<_, _> = faces(0..15).into_iter().map(|f| (f.id.clone(), f)).collect();
    let ids: Vec<_> = expected.keys().cloned().collect();
    let got = again.read_ids(&ids).await.unwrap();
    assert_eq!(got.len(), 15);
    for r in got {
        assert_eq!(&r, &expected[&r.id]);
    }
}

#[tokio::test]
async fn open_without_dataset_is_a_clear_error() {
    let dir = tempdir();
    let uri = uri(&dir, "missing.lance");
    let err = FaceStore::open(&uri).await.err().expect("must fail").to_string();
    assert!(err.contains("missing.lance") && err.contains("faces dataset"), "{err}");
}

#[tokio::test]
async fn bad_records_are_rejected_with_their_id() {
    let dir = tempdir();
    let mut store = FaceStore::create_or_open(&uri(&dir, "f.lance")).await.unwrap();
    let mut bad = face(1);
    bad.image = b"GIF89a....".to_vec();
    let err = store.append(vec![face(0), bad.clone()]).await.unwrap_err().to_string();
    assert!(err.contains(bad.id.as_str()) && err.contains("PNG"), "{err}");
    // Nothing was written, and the good record can still be appended.
    assert_eq!(store.count().await.unwrap(), 0);
    assert_eq!(store.append(vec![face(0)]).await.unwrap().added, 1);
}

#[tokio::test]
async fn rejects_are_stored_beside_the_faces() {
    let dir = tempdir();
    let uri = uri(&dir, "faces.lance");
    assert!(rejects_uri(&uri).ends_with("faces.rejects.lance"));
    let mut store = FaceStore::create_or_open(&uri).await.unwrap();
    let rejects = vec![
        Reject { source: "a.jpg".into(), row: Some(3), reason: "truncated JPEG".into() },
        Reject { source: "b.png".into(), row: None, reason: "no face".into() },
    ];
    store.append_rejects(rejects.clone()).await.unwrap();
    store.append_rejects(rejects[..1].to_vec()).await.unwrap();
    let got = store.rejects().await.unwrap();
    assert_eq!(got, vec![rejects[0].clone(), rejects[1].clone(), rejects[0].clone()]);
    assert_eq!(store.stats().await.unwrap().rejects, 3);
}

#[tokio::test]
async fn shards_cover_every_row_exactly_once() {
    let dir = tempdir();
    let mut store = FaceStore::create_or_open(&uri(&dir, "faces.lance")).await.unwrap();
    // Three appends → three fragments of 7, 5 and 11 rows.
    store.append(faces(0..7)).await.unwrap();
    store.append(faces(7..12)).await.unwrap();
    store.append(faces(12..23)).await.unwrap();
    let shards = store.shards(4).await.unwrap();
    let lens: Vec<u64> = shards.iter().map(|s| s.len).collect();
    assert_eq!(lens, vec![4, 3, 4, 1, 4, 4, 3]);
    assert!(shards.iter().all(|s| s.len <= 4));
    let json = serde_json::to_string(&shards[2]).unwrap();
    assert_eq!(serde_json::from_str::<distillery_cache::ShardRange>(&json).unwrap(), shards[2]);

    let mut seen = Vec::new();
    for s in &shards {
        let recs = store.read_shard(s).await.unwrap();
        assert_eq!(recs.len() as u64, s.len);
        seen.extend(recs.into_iter().map(|r| r.id));
    }
    let want: Vec<_> = faces(0..23).into_iter().map(|f| f.id).collect();
    assert_eq!(seen, want, "shards in order reproduce storage order exactly once");

    let bogus = distillery_cache::ShardRange { fragment_id: 99, offset: 0, len: 1 };
    let err = store.read_shard(&bogus).await.unwrap_err().to_string();
    assert!(err.contains("f99:0+1"), "{err}");
}

#[tokio::test]
async fn stats_count_splits_classes_and_labels() {
    let dir = tempdir();
    let mut store = FaceStore::create_or_open(&uri(&dir, "faces.lance")).await.unwrap();
    let recs = faces(0..40);
    store.append(recs.clone()).await.unwrap();
    let st = store.stats().await.unwrap();
    assert_eq!(st.faces, 40);
    assert_eq!(st.splits["train"], 32);
    assert_eq!(st.splits["val"], 8);
    let labelled = recs.iter().filter(|r| r.label.is_some()).count() as u64;
    assert_eq!(st.unlabelled, 40 - labelled);
    let class_total: u64 = st.classes.values().flat_map(|m| m.values()).sum();
    assert_eq!(class_total, labelled);
    let want = recs.iter().filter(|r| r.split.as_str() == "train" && r.label == Some(2)).count() as u64;
    assert_eq!(st.classes["train"].get(&2).copied().unwrap_or(0), want);
    let vals: Vec<f64> = recs.iter().filter_map(|r| r.valence).map(f64::from).collect();
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    let std = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
    let v = st.valence.unwrap();
    assert_eq!(v.count, 40);
    assert!((v.mean - mean).abs() < 1e-9 && (v.std - std).abs() < 1e-6, "{v:?} vs {mean} {std}");
    assert_eq!(st.arousal.unwrap().count, 30);
}

#[tokio::test]
async fn compaction_merges_fragments_and_keeps_rows() {
    let dir = tempdir();
    let mut store = FaceStore::create_or_open(&uri(&dir, "faces.lance")).await.unwrap();
    for k in 0..4 {
        store.append(faces(k * 5..k * 5 + 5)).await.unwrap();
    }
    let mut before = store.ids().await.unwrap();
    let (b, a) = store.compact().await.unwrap();
    assert_eq!((b, a), (4, 1));
    let mut after = store.ids().await.unwrap();
    before.sort();
    after.sort();
    assert_eq!(before, after);
}
