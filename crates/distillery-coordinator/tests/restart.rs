//! Durable state: a coordinator reopened on the same state directory keeps committed work and
//! returns in-flight shards to the queue.

mod common;

use std::sync::Arc;

use common::*;
use distillery_coordinator::ManualClock;
use distillery_coordinator::model::{Completion, JobState, LeaseOutcome};

#[tokio::test]
async fn reopen_keeps_commits_and_requeues_leases() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend();
    let clock = Arc::new(ManualClock::new(0));
    let (job_id, leased_key, committed_key) = {
        let f = open(dir.path(), b.clone(), clock.clone(), 3).await;
        let (job, _) = f.core.submit_job(spec(4)).await.unwrap();
        assert_eq!(job.shards.total, 3);
        let r = f.core.register_worker(worker("w1")).unwrap();
        let LeaseOutcome::Granted(a) = f.core.lease_shard("w1", &r.session).unwrap() else { panic!() };
        let LeaseOutcome::Granted(b2) = f.core.lease_shard("w1", &r.session).unwrap() else { panic!() };
        let c = f.core.complete_shard("w1", &a.lease_id, &staged(&a.shard_key), 8, 0).await.unwrap();
        assert!(matches!(c, Completion::Committed { .. }));
        (job.id, b2.shard_key.clone(), a.shard_key.clone())
    };
    // The cache also holds a commit the old coordinator made but never recorded (a crash between
    // the cache commit and the store write): the reopened coordinator must see it.
    let lost = {
        let s = spec(4);
        distillery_coordinator::model::shard_key(
            &s.fingerprint(),
            &distillery_coordinator::model::ShardRange { fragment_id: 1, offset: 0, len: 3 },
        )
    };
    b.insert_commit(CACHE, &lost);
    assert_ne!(lost, leased_key);

    let f = open(dir.path(), b.clone(), clock, 3).await;
    let j = f.core.get_job(&job_id).unwrap();
    assert_eq!(j.state, JobState::Running);
    assert_eq!((j.shards.committed, j.shards.pending, j.shards.leased), (2, 1, 0), "{:?}", j.shards);
    // The old session is gone: the worker must register again; it then gets the shard that was
    // in flight, and nothing already committed.
    assert!(f.core.lease_shard("w1", "old-session").is_err());
    let r = f.core.register_worker(worker("w1")).unwrap();
    let LeaseOutcome::Granted(l) = f.core.lease_shard("w1", &r.session).unwrap() else { panic!() };
    assert_eq!(l.shard_key, leased_key);
    assert_ne!(l.shard_key, committed_key);
    f.core.complete_shard("w1", &l.lease_id, &staged(&l.shard_key), 2, 0).await.unwrap();
    assert_eq!(f.core.get_job(&job_id).unwrap().state, JobState::Completed);
    // Three shards, three commits in all: nothing was committed twice.
    assert_eq!(b.commit_count(CACHE), 3);
    drop(f);

    // A finished job stays finished after another reopen.
    let f = open(dir.path(), b, Arc::new(ManualClock::new(0)), 3).await;
    assert_eq!(f.core.get_job(&job_id).unwrap().state, JobState::Completed);
    assert_eq!(f.core.list_jobs(&[], 0).len(), 1);
}
