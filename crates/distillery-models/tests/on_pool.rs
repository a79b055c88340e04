//! `nn::on_pool` keeps the pool's other workers awake while its closure runs, and lets them go
//! when it ends, also when several callers' work nests on the same workers or the closure
//! panics. A binary of its own, so that its global pool (three threads) serves these calls alone
//! and the counts of kept-awake workers are theirs.

use std::time::{Duration, Instant};

use distillery_models::cost;
use distillery_models::nn::{
    keep_awake_runs, on_pool, portable_layers, with_portable_layers, workers_kept_awake,
};
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

    // One caller: the other workers run their keep-awake jobs while `f` runs (`f` only spins
    // meanwhile, so no job is run by its own thread), and `f`'s parallel loops still run and
    // return everything. The jobs are counted as they start, not as a number awake at one
    // moment: on a loaded machine a worker preempted for longer than the idle limit leaves
    // before the other arrives.
    let before = keep_awake_runs();
    let (all_ran, sum) = on_pool(|| {
        let all_ran = within(Duration::from_secs(60), || keep_awake_runs() - before == others);
        let sum: u64 = (0..10_000u64).into_par_iter().map(|i| i * i).sum();
        (all_ran, sum)
    });
    assert!(all_ran, "{} of {others} keep-awake jobs ran", keep_awake_runs() - before);
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
