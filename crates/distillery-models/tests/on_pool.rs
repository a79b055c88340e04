//! `nn::on_pool` keeps the pool's other workers awake while its closure runs, and lets them go
//! when it ends, also when several callers' work nests on the same workers or the closure panics. A binary of its own,
//! so that its global pool (three threads) serves these calls alone and the count of kept-awake
//! workers is theirs.

use std::time::{Duration, Instant};

use distillery_models::cost;
use distillery_models::nn::{on_pool, portable_layers, with_portable_layers, workers_kept_awake};
use rayon::prelude::*;

/// Waits, at most `limit`, for `cond`; whether it came true.
fn within(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            return false;
        }
        std::hint::spin_loop();
    }
    true
}

#[test]
fn other_workers_stay_awake_while_f_runs_and_leave_when_it_ends() {
    rayon::ThreadPoolBuilder::new().num_threads(3).build_global().expect("the first use of the global pool");
    let others = rayon::current_num_threads() - 1;

    // One caller: both other workers pick up their keep-awake job while `f` runs, and `f`'s
    // parallel loops still run and return everything.
    let (all_awake, sum) = on_pool(|| {
        let all_awake = within(Duration::from_secs(30), || workers_kept_awake() == others);
        let sum: u64 = (0..10_000u64).into_par_iter().map(|i| i * i).sum();
        (all_awake, sum)
    });
    assert!(all_awake, "{} of {others} workers kept awake", workers_kept_awake());
    assert_eq!(sum, (0..10_000u64).map(|i| i * i).sum::<u64>());
    assert_eq!(workers_kept_awake(), 0, "a worker still kept awake after on_pool returned");

    // Many callers at once, each `f` made of nested parallel loops: a worker waiting inside one
    // caller's loop runs other callers' work, keep-awake jobs included, so callers' frames nest on
    // the workers' stacks in every order. Every call must end, with its own results.
    std::thread::scope(|s| {
        for k in 1..=6u64 {
            s.spawn(move || {
                for _ in 0..100 {
                    let got = on_pool(|| {
                        (0..64u64)
                            .into_par_iter()
                            .map(|i| (0..16u64).into_par_iter().map(|j| i * j * k).sum::<u64>())
                            .sum::<u64>()
                    });
                    assert_eq!(got, k * (0..64u64).sum::<u64>() * (0..16u64).sum::<u64>());
                }
            });
        }
    });
    assert_eq!(workers_kept_awake(), 0, "a worker still kept awake after the callers ended");

    // A panic in `f` reaches the caller, and the worker that ran `f` has its own settings back
    // (not the caller's MAC counting and portable layers), as has the caller.
    let caught = std::panic::catch_unwind(|| {
        cost::count(|| {
            with_portable_layers(|| {
                on_pool(|| {
                    assert!(
                        cost::counting() && portable_layers(),
                        "the caller's settings did not carry over"
                    );
                    panic!("a failing model call");
                })
            })
        })
    });
    let message = caught.expect_err("the panic was lost").downcast::<&str>().map(|m| *m);
    assert_eq!(message.ok(), Some("a failing model call"));
    assert!(!cost::counting() && !portable_layers(), "the caller kept the settings of its unwound call");
    let settings = rayon::broadcast(|_| (cost::counting(), portable_layers()));
    assert!(settings.iter().all(|&s| s == (false, false)), "workers' (counting, portable): {settings:?}");
    assert_eq!(workers_kept_awake(), 0, "a worker still kept awake after a panicking call");
}
