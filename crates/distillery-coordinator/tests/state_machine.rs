//! The lease/commit state machine, driven by a manual clock (no sleeps).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use distillery_coordinator::ManualClock;
use distillery_coordinator::model::{Completion, JobState, Lease, LeaseOutcome, LeaseStatus, ShardState};

fn granted(o: LeaseOutcome) -> Lease {
    match o {
        LeaseOutcome::Granted(l) => *l,
        LeaseOutcome::NoWork { reason, .. } => panic!("expected a lease, got no work: {reason}"),
    }
}

#[tokio::test]
async fn lease_complete_and_finish_job() {
    let dir = tempfile::tempdir().unwrap();
    let f = open(dir.path(), backend(), Arc::new(ManualClock::new(1_000_000)), 3).await;
    let (job, again) = f.core.submit_job(spec(2)).await.unwrap();
    assert!(!again);
    // Fragments of 5 and 3 rows in shards of 2: 3 + 2 shards.
    assert_eq!(job.shards.total, 5);
    assert_eq!(job.images_total, 8);
    assert_eq!(job.state, JobState::Running);
    // The same spec again returns the active job.
    let (same, again) = f.core.submit_job(spec(2)).await.unwrap();
    assert!(again);
    assert_eq!(same.id, job.id);

    let reg = f.core.register_worker(worker("w1")).unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let l = granted(f.core.lease_shard("w1", &reg.session).unwrap());
        assert!(l.shard_key.starts_with(&format!("{}/", job.job_fingerprint)), "{}", l.shard_key);
        let c = f
            .core
            .complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 2 * l.range.len, 0)
            .await
            .unwrap();
        assert!(matches!(c, Completion::Committed { .. }), "{c:?}");
        seen.push((l.range.fragment_id, l.range.offset, l.range.len));
    }
    assert_eq!(seen, vec![(0, 0, 2), (0, 2, 2), (0, 4, 1), (1, 0, 2), (1, 2, 1)]);
    assert!(matches!(f.core.lease_shard("w1", &reg.session).unwrap(), LeaseOutcome::NoWork { .. }));
    let done = f.core.get_job(&job.id).unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.shards.committed, 5);
    assert_eq!(done.images_done, 8);
    assert_eq!(done.rows_written, 16);
    assert_eq!(f.backend.commit_count(CACHE), 5);
}

#[tokio::test]
async fn expired_lease_is_released_and_late_completion_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let f = open(dir.path(), backend(), clock.clone(), 3).await;
    let (job, _) = f.core.submit_job(spec(8)).await.unwrap();
    assert_eq!(job.shards.total, 2);
    let r1 = f.core.register_worker(worker("w1")).unwrap();
    let r2 = f.core.register_worker(worker("w2")).unwrap();
    let l1 = granted(f.core.lease_shard("w1", &r1.session).unwrap());
    assert_eq!(l1.shard_id, 0);

    // A heartbeat before the deadline extends the lease.
    clock.advance(TTL - Duration::from_secs(1));
    let st = f.core.heartbeat("w1", &r1.session, &[(l1.lease_id.clone(), 3)]).unwrap();
    let LeaseStatus::Active { deadline_ms } = st[0] else { panic!("{st:?}") };
    assert_eq!(deadline_ms, clock_now(&clock) + TTL.as_millis() as i64);
    assert_eq!(f.core.reap_expired().unwrap(), 0);

    // Past the extended deadline the reaper takes the lease back.
    clock.advance(TTL + Duration::from_millis(1));
    assert_eq!(f.core.reap_expired().unwrap(), 1);
    let j = f.core.get_job(&job.id).unwrap();
    assert_eq!((j.shards.pending, j.shards.leased), (2, 0));

    // Another worker gets the same shard again, as attempt 2.
    let l2 = granted(f.core.lease_shard("w2", &r2.session).unwrap());
    assert_eq!((l2.shard_id, l2.attempt), (0, 2));

    // The first worker's late completion is rejected and commits nothing.
    let late = f.core.complete_shard("w1", &l1.lease_id, &staged(&l1.shard_key), 10, 0).await.unwrap();
    assert_eq!(late, Completion::Rejected { reason: "lease expired".into() });
    assert_eq!(f.backend.commit_count(CACHE), 0);
    // And its heartbeat says the lease is gone.
    let st = f.core.heartbeat("w1", &r1.session, &[(l1.lease_id.clone(), 5)]).unwrap();
    assert_eq!(st, vec![LeaseStatus::Revoked]);

    // The new holder commits.
    let ok = f.core.complete_shard("w2", &l2.lease_id, &staged(&l2.shard_key), 10, 0).await.unwrap();
    assert!(matches!(ok, Completion::Committed { .. }));
    assert_eq!(f.backend.commit_count(CACHE), 1);
}

fn clock_now(c: &ManualClock) -> i64 {
    use distillery_coordinator::Clock;
    c.now_ms()
}

#[tokio::test]
async fn completion_past_deadline_without_reaper_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(5_000));
    let f = open(dir.path(), backend(), clock.clone(), 3).await;
    f.core.submit_job(spec(8)).await.unwrap();
    let r = f.core.register_worker(worker("w1")).unwrap();
    let l = granted(f.core.lease_shard("w1", &r.session).unwrap());
    clock.advance(TTL + Duration::from_millis(1));
    let c = f.core.complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 5, 0).await.unwrap();
    assert_eq!(c, Completion::Rejected { reason: "lease expired".into() });
    assert_eq!(f.backend.commit_count(CACHE), 0);
}

#[tokio::test]
async fn duplicate_completion_is_rejected_without_a_second_commit() {
    let dir = tempfile::tempdir().unwrap();
    let f = open(dir.path(), backend(), Arc::new(ManualClock::new(0)), 3).await;
    f.core.submit_job(spec(8)).await.unwrap();
    let r = f.core.register_worker(worker("w1")).unwrap();
    let l = granted(f.core.lease_shard("w1", &r.session).unwrap());
    let first = f.core.complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 5, 0).await.unwrap();
    assert_eq!(first, Completion::Committed { version: 1 });
    let again = f.core.complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 5, 0).await.unwrap();
    assert_eq!(again, Completion::AlreadyCommitted);
    // Another worker quoting the same lease is refused too.
    let other = f.core.complete_shard("w2", &l.lease_id, &staged(&l.shard_key), 5, 0).await.unwrap();
    assert!(matches!(other, Completion::AlreadyCommitted | Completion::Rejected { .. }), "{other:?}");
    assert_eq!(f.backend.commit_count(CACHE), 1);
    // An unknown lease is rejected.
    let unknown = f.core.complete_shard("w1", "nope", b"{}", 0, 0).await.unwrap();
    assert_eq!(unknown, Completion::Rejected { reason: "unknown lease".into() });
}

#[tokio::test]
async fn shard_is_poisoned_after_max_attempts_and_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let f = open(dir.path(), backend(), clock.clone(), 3).await;
    let (job, _) = f.core.submit_job(spec(8)).await.unwrap();
    let r = f.core.register_worker(worker("w1")).unwrap();
    // Shard 0 fails twice by report and once by expiry: poisoned after the third.
    for attempt in 1..=3u32 {
        let l = granted(f.core.lease_shard("w1", &r.session).unwrap());
        assert_eq!((l.shard_id, l.attempt), (0, attempt));
        if attempt < 3 {
            let out = f.core.fail_shard("w1", &l.lease_id, "decoder exploded", true).unwrap();
            assert_eq!(out.shard_state, ShardState::Pending);
        } else {
            clock.advance(TTL * 2);
            assert_eq!(f.core.reap_expired().unwrap(), 1);
        }
    }
    let j = f.core.get_job(&job.id).unwrap();
    assert_eq!(j.shards.poisoned, 1);
    assert_eq!(j.poisoned[0].shard_id, 0);
    assert!(j.poisoned[0].last_error.contains("lease expired"), "{:?}", j.poisoned);
    assert_eq!(j.state, JobState::Running);
    // The job goes on with shard 1 and ends completed-with-poisoned.
    let l = granted(f.core.lease_shard("w1", &r.session).unwrap());
    assert_eq!(l.shard_id, 1);
    f.core.complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 3, 0).await.unwrap();
    assert_eq!(f.core.get_job(&job.id).unwrap().state, JobState::CompletedWithPoisoned);
}

#[tokio::test]
async fn non_retryable_failure_poisons_at_once_and_all_poisoned_fails_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let f = open(dir.path(), backend(), Arc::new(ManualClock::new(0)), 3).await;
    let (job, _) = f.core.submit_job(spec(8)).await.unwrap();
    let r = f.core.register_worker(worker("w1")).unwrap();
    for _ in 0..2 {
        let l = granted(f.core.lease_shard("w1", &r.session).unwrap());
        let out = f.core.fail_shard("w1", &l.lease_id, "rows unreadable", false).unwrap();
        assert_eq!(out.shard_state, ShardState::Poisoned);
    }
    let j = f.core.get_job(&job.id).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error.as_deref(), Some("every shard was poisoned"));
}

#[tokio::test]
async fn cached_shards_are_skipped_and_committed_keys_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend();
    let s = spec(4);
    // Fragment 1 (rows 0..3) is fully cached for this teacher; shard (0,0,4) was committed by an
    // earlier run of the same job.
    b.mark_cached(
        CACHE,
        &fp('a'),
        distillery_coordinator::model::ShardRange { fragment_id: 1, offset: 0, len: 3 },
    );
    let key0 = distillery_coordinator::model::shard_key(
        &s.fingerprint(),
        &distillery_coordinator::model::ShardRange { fragment_id: 0, offset: 0, len: 4 },
    );
    b.insert_commit(CACHE, &key0);
    let f = open(dir.path(), b, Arc::new(ManualClock::new(0)), 3).await;
    let (job, _) = f.core.submit_job(s).await.unwrap();
    assert_eq!(
        (job.shards.total, job.shards.skipped, job.shards.committed, job.shards.pending),
        (3, 1, 1, 1)
    );
    let r = f.core.register_worker(worker("w1")).unwrap();
    let l = granted(f.core.lease_shard("w1", &r.session).unwrap());
    assert_eq!((l.range.fragment_id, l.range.offset, l.range.len), (0, 4, 1));
    f.core.complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 2, 0).await.unwrap();
    let j = f.core.get_job(&job.id).unwrap();
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.images_skipped, 3);
}

#[tokio::test]
async fn teacher_mismatch_gets_no_work_and_reregistration_revokes_leases() {
    let dir = tempfile::tempdir().unwrap();
    let f = open(dir.path(), backend(), Arc::new(ManualClock::new(0)), 3).await;
    f.core.submit_job(spec(8)).await.unwrap();
    let mut other = worker("w-other");
    other.teacher_fingerprint = Some(fp('b'));
    let r = f.core.register_worker(other).unwrap();
    assert!(matches!(f.core.lease_shard("w-other", &r.session).unwrap(), LeaseOutcome::NoWork { .. }));

    let r1 = f.core.register_worker(worker("w1")).unwrap();
    let l = granted(f.core.lease_shard("w1", &r1.session).unwrap());
    // The worker restarts and registers again: the old lease is revoked, the old session stale.
    let r1b = f.core.register_worker(worker("w1")).unwrap();
    assert!(f.core.lease_shard("w1", &r1.session).is_err());
    let st = f.core.heartbeat("w1", &r1b.session, &[(l.lease_id.clone(), 0)]).unwrap();
    assert_eq!(st, vec![LeaseStatus::Revoked]);
    let again = granted(f.core.lease_shard("w1", &r1b.session).unwrap());
    assert_eq!((again.shard_id, again.attempt), (0, 2));
}

#[tokio::test]
async fn cancel_revokes_leases_and_rejects_their_completion() {
    let dir = tempfile::tempdir().unwrap();
    let f = open(dir.path(), backend(), Arc::new(ManualClock::new(0)), 3).await;
    let (job, _) = f.core.submit_job(spec(8)).await.unwrap();
    let r = f.core.register_worker(worker("w1")).unwrap();
    let l = granted(f.core.lease_shard("w1", &r.session).unwrap());
    let j = f.core.cancel_job(&job.id, "operator said stop").unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.shards.cancelled, 2);
    let st = f.core.heartbeat("w1", &r.session, &[(l.lease_id.clone(), 1)]).unwrap();
    assert_eq!(st, vec![LeaseStatus::Cancelled]);
    let c = f.core.complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 1, 0).await.unwrap();
    assert!(matches!(c, Completion::Rejected { .. }), "{c:?}");
    assert_eq!(f.backend.commit_count(CACHE), 0);
}

#[tokio::test]
async fn failed_commit_keeps_the_lease_for_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let f = open(dir.path(), backend(), Arc::new(ManualClock::new(0)), 3).await;
    f.core.submit_job(spec(8)).await.unwrap();
    let r = f.core.register_worker(worker("w1")).unwrap();
    let l = granted(f.core.lease_shard("w1", &r.session).unwrap());
    f.backend.fail_next_commits(1);
    let e = f.core.complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 5, 0).await.unwrap_err();
    assert!(e.to_string().contains("injected failure"), "{e}");
    let c = f.core.complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 5, 0).await.unwrap();
    assert!(matches!(c, Completion::Committed { .. }), "{c:?}");
    // Malformed staged JSON is a request error naming the field.
    let e = f.core.complete_shard("w1", "x", b"not json", 0, 0).await.unwrap_err();
    assert!(e.to_string().contains("staged_fragments"), "{e}");
}
