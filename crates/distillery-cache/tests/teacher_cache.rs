//! Teacher cache: two-phase writes, exactly-once commits, precision, compaction.

mod common;

use std::collections::HashSet;

use common::*;
use distillery_cache::{
    CacheOptions, CommitOutcome, FaceStore, LogitsPrecision, StagedFragments, TeacherCache,
};
use distillery_data::views_for;

fn rows_for(ids: &[distillery_core::FaceId], k: u32) -> Vec<distillery_cache::CacheRow> {
    ids.iter().flat_map(|id| views_for(id, k, 7).into_iter().map(move |v| row(id, v))).collect()
}

fn ids(range: std::ops::Range<u32>) -> Vec<distillery_core::FaceId> {
    faces(range).into_iter().map(|f| f.id).collect()
}

#[tokio::test]
async fn stage_commit_round_trip_is_exact_for_f32() {
    let dir = tempdir();
    let uri = uri(&dir, "cache.lance");
    let mut cache = TeacherCache::create_or_open(&uri, CacheOptions::default()).await.unwrap();
    let m = meta(1);
    let rows = rows_for(&ids(0..6), 2);
    let staged = cache.stage(&m, "s0", "w0", rows.clone()).await.unwrap();
    assert_eq!(staged.rows, 18);
    // Nothing is visible before the commit, and no dataset version exists yet.
    assert!(TeacherCache::open(&uri).await.is_err());

    // The staged fragments travel as JSON.
    let staged = StagedFragments::from_json(&staged.to_json()).unwrap();
    let out = cache.commit("s0", staged).await.unwrap();
    assert!(matches!(out, CommitOutcome::Committed { .. }));

    let reopened = TeacherCache::open(&uri).await.unwrap();
    assert_eq!(reopened.precision(), LogitsPrecision::F32);
    let got = reopened.rows(&m.fingerprint).await.unwrap();
    assert_eq!(got, rows, "every value, including logits, is stored exactly");
    assert_eq!(reopened.teacher(&m.fingerprint).unwrap().unwrap(), m);
    assert_eq!(reopened.committed_shards().await.unwrap(), HashSet::from(["s0".to_string()]));
}

#[tokio::test]
async fn f16_logits_are_within_half_precision() {
    let dir = tempdir();
    let uri = uri(&dir, "cache16.lance");
    let opts = CacheOptions { logits_precision: LogitsPrecision::F16, ..Default::default() };
    let mut cache = TeacherCache::create_or_open(&uri, opts).await.unwrap();
    let m = meta(2);
    let mut rows = rows_for(&ids(0..4), 1);
    for (i, r) in rows.iter_mut().enumerate() {
        r.logits[0] = 1.0 / 3.0 + i as f32; // not representable in f16
    }
    let staged = cache.stage(&m, "a", "w", rows.clone()).await.unwrap();
    cache.commit("a", staged).await.unwrap();
    let cache = TeacherCache::open(&uri).await.unwrap();
    assert_eq!(cache.precision(), LogitsPrecision::F16);
    let got = cache.rows(&m.fingerprint).await.unwrap();
    assert_eq!(got.len(), rows.len());
    let mut max_err = 0f32;
    for (g, w) in got.iter().zip(&rows) {
        assert_eq!((&g.face_id, g.view), (&w.face_id, w.view));
        assert_eq!(g.embedding, w.embedding);
        for (a, b) in g.logits.iter().zip(&w.logits) {
            let err = (a - b).abs();
            assert!(err <= b.abs() * 2f32.powi(-11) + 1e-7, "{a} vs {b}");
            max_err = max_err.max(err);
        }
    }
    assert!(max_err > 0.0, "f16 storage must actually round");
}

#[tokio::test]
async fn committing_a_shard_twice_adds_nothing() {
    let dir = tempdir();
    let uri = uri(&dir, "cache.lance");
    let mut cache = TeacherCache::create_or_open(&uri, CacheOptions::default()).await.unwrap();
    let m = meta(3);
    let rows = rows_for(&ids(0..5), 0);
    let first = cache.stage(&m, "shard-1", "w0", rows.clone()).await.unwrap();
    // A retried worker stages the same shard again.
    let late = cache.stage(&m, "shard-1", "w1", rows.clone()).await.unwrap();
    let v = match cache.commit("shard-1", first).await.unwrap() {
        CommitOutcome::Committed { version } => version,
        o => panic!("{o:?}"),
    };
    assert_eq!(cache.commit("shard-1", late).await.unwrap(), CommitOutcome::AlreadyCommitted);
    // A separate committer process (fresh handle) also sees the shard as done.
    let mut other = TeacherCache::open(&uri).await.unwrap();
    let again = other.stage(&m, "shard-1", "w2", rows.clone()).await.unwrap();
    assert_eq!(other.commit("shard-1", again).await.unwrap(), CommitOutcome::AlreadyCommitted);
    assert_eq!(other.version(), v);
    assert_eq!(other.rows(&m.fingerprint).await.unwrap().len(), 5);

    // A staged shard cannot be committed under another key.
    let s = other.stage(&m, "shard-2", "w", rows).await.unwrap();
    let err = other.commit("shard-3", s).await.unwrap_err().to_string();
    assert!(err.contains("shard-3") && err.contains("shard-2"), "{err}");
}

#[tokio::test]
async fn empty_shards_are_remembered() {
    let dir = tempdir();
    let uri = uri(&dir, "cache.lance");
    let mut cache = TeacherCache::create_or_open(&uri, CacheOptions::default()).await.unwrap();
    let m = meta(4);
    let s = cache.stage(&m, "empty", "w", vec![]).await.unwrap();
    assert!(matches!(cache.commit("empty", s.clone()).await.unwrap(), CommitOutcome::Committed { .. }));
    assert_eq!(cache.commit("empty", s).await.unwrap(), CommitOutcome::AlreadyCommitted);
    let s = cache.stage(&m, "full", "w", rows_for(&ids(0..2), 0)).await.unwrap();
    cache.commit("full", s).await.unwrap();
    let reopened = TeacherCache::open(&uri).await.unwrap();
    let want: HashSet<String> = ["empty".to_string(), "full".to_string()].into();
    assert_eq!(reopened.committed_shards().await.unwrap(), want);
    assert_eq!(reopened.summary().await.unwrap().rows, 2);
}

#[tokio::test]
async fn concurrent_writers_then_one_committer() {
    let dir = tempdir();
    let uri = uri(&dir, "cache.lance");
    let m = meta(5);
    let all = ids(0..12);
    // Two workers with their own handles stage disjoint shards at the same time, before the
    // dataset exists.
    let w = |lo: usize, hi: usize, key: &'static str, name: &'static str| {
        let uri = uri.clone();
        let m = m.clone();
        let rows = rows_for(&all[lo..hi], 1);
        tokio::spawn(async move {
            let c = TeacherCache::create_or_open(&uri, CacheOptions::default()).await.unwrap();
            c.stage(&m, key, name, rows).await.unwrap().to_json()
        })
    };
    let (a, b) = tokio::join!(w(0, 6, "A", "wa"), w(6, 12, "B", "wb"));
    let (a, b) =
        (StagedFragments::from_json(&a.unwrap()).unwrap(), StagedFragments::from_json(&b.unwrap()).unwrap());

    let mut committer = TeacherCache::create_or_open(&uri, CacheOptions::default()).await.unwrap();
    committer.commit("B", b.clone()).await.unwrap();
    committer.commit("A", a).await.unwrap();
    assert_eq!(committer.commit("B", b).await.unwrap(), CommitOutcome::AlreadyCommitted);

    let got = committer.rows(&m.fingerprint).await.unwrap();
    assert_eq!(got.len(), 24);
    let mut want = rows_for(&all, 1);
    let key = |r: &distillery_cache::CacheRow| (r.face_id.clone(), r.view.index);
    want.sort_by_key(key);
    let mut got = got;
    got.sort_by_key(key);
    assert_eq!(got, want);
}

#[tokio::test]
async fn existing_summary_and_coverage() {
    let dir = tempdir();
    let fu = uri(&dir, "faces.lance");
    let mut store = FaceStore::create_or_open(&fu).await.unwrap();
    store.append(faces(0..10)).await.unwrap();
    let all = ids(0..10);
    let mut cache =
        TeacherCache::create_or_open(&uri(&dir, "cache.lance"), CacheOptions::default()).await.unwrap();
    let (m1, m2) = (meta(6), meta(7));
    let s = cache.stage(&m1, "t1-a", "w", rows_for(&all[..4], 2)).await.unwrap();
    cache.commit("t1-a", s).await.unwrap();
    let s = cache.stage(&m2, "t2-a", "w", rows_for(&all[3..5], 0)).await.unwrap();
    cache.commit("t2-a", s).await.unwrap();

    let ex = cache.existing(&m1.fingerprint).await.unwrap();
    assert_eq!(ex.len(), 12);
    assert!(ex.contains(&(all[0].clone(), 2)));
    assert!(!ex.contains(&(all[4].clone(), 0)));
    // A worker skips what is already there.
    let todo: Vec<_> = all.iter().filter(|id| !ex.contains(&((*id).clone(), 0))).collect();
    assert_eq!(todo.len(), 6);

    let cov = cache.coverage(&store, &m1.fingerprint).await.unwrap();
    assert_eq!((cov.faces, cov.covered, cov.missing), (10, 4, 6));
    let cov = cache.coverage(&store, &m2.fingerprint).await.unwrap();
    assert_eq!((cov.faces, cov.covered, cov.missing), (10, 2, 8));

    let sum = cache.summary().await.unwrap();
    assert_eq!(sum.rows, 14);
    assert_eq!(sum.shards, 2);
    assert_eq!(sum.teachers.len(), 2);
    let t1 = sum.teachers.iter().find(|t| t.fingerprint == m1.fingerprint).unwrap();
    assert_eq!((t1.rows, t1.name.as_str(), t1.classes.len()), (12, "teacher6", 8));
    assert_eq!(sum.views[&0], 6);
    assert_eq!(sum.views[&2], 4);
    assert_eq!(sum.versions.last().unwrap().0, sum.version);
}

#[tokio::test]
async fn invalid_rows_name_the_shard_and_face() {
    let dir = tempdir();
    let cache = TeacherCache::create_or_open(&uri(&dir, "c.lance"), CacheOptions::default()).await.unwrap();
    let all = ids(0..2);
    let mut rows = rows_for(&all, 0);
    rows[1].logits.pop();
    let err = cache.stage(&meta(8), "sk", "w", rows).await.unwrap_err().to_string();
    assert!(err.contains("sk") && err.contains(all[1].as_str()) && err.contains("7 logits"), "{err}");
    let mut rows = rows_for(&all, 0);
    rows.push(rows[0].clone());
    let err = cache.stage(&meta(8), "sk", "w", rows).await.unwrap_err().to_string();
    assert!(err.contains("duplicate"), "{err}");
}

#[tokio::test]
async fn compaction_and_cleanup_keep_rows() {
    let dir = tempdir();
    let uri = uri(&dir, "cache.lance");
    let mut cache = TeacherCache::create_or_open(&uri, CacheOptions::default()).await.unwrap();
    let m = meta(9);
    let all = ids(0..12);
    for (k, chunk) in all.chunks(3).enumerate() {
        let key = format!("s{k}");
        let s = cache.stage(&m, &key, "w", rows_for(chunk, 1)).await.unwrap();
        cache.commit(&key, s).await.unwrap();
    }
    let key = |r: &distillery_cache::CacheRow| (r.face_id.clone(), r.view.index);
    let mut before = cache.rows(&m.fingerprint).await.unwrap();
    before.sort_by_key(key);
    let shards_before = cache.committed_shards().await.unwrap();
    let st = cache.compact().await.unwrap();
    assert_eq!((st.fragments_before, st.fragments_after), (4, 1));
    let mut after = cache.rows(&m.fingerprint).await.unwrap();
    after.sort_by_key(key);
    assert_eq!(before, after);
    assert_eq!(cache.committed_shards().await.unwrap(), shards_before);
    let cl = cache.cleanup(std::time::Duration::ZERO).await.unwrap();
    assert!(cl.old_versions >= 1, "{cl:?}");
    let reopened = TeacherCache::open(&uri).await.unwrap();
    assert_eq!(reopened.rows(&m.fingerprint).await.unwrap().len(), 24);
}
