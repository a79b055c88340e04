//! The quality bar of distillation, on synthetic faces through the real system (Lance datasets,
//! a coordinator and two gRPC workers labelling into a cache, the trainer streaming it back).
//!
//! A teacher trained on every label; students that see 10 % of the labels, trained with the same
//! budget with and without the teacher, over five seeds (one student's accuracy swings by several
//! points of the teacher's on this small held-out split; the bar is about the mean). Asserted: the
//! distilled students beat the baselines on mean accuracy and mean CCC on the held-out split, and
//! reach at least 90 % of the teacher's accuracy. Every number is printed.
#![allow(clippy::print_stdout)]

use distillery_local::{ExperimentOptions, distillation_experiment};

/// Training allocates and frees large tensors every step; the `distillery` binary uses it too.
#[global_allocator]
static GLOBAL: distillery_models::alloc::Allocator = distillery_models::alloc::Allocator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distilled_students_beat_the_baseline_and_approach_the_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ExperimentOptions::quality_bar(tmp.path().to_path_buf());
    let r = distillation_experiment(&opts).await.unwrap();
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    println!(
        "teacher accuracy {:.4} CCC {:.4} | distilled accuracy {:.4} CCC {:.4} ({:.1}% of the teacher) | baseline accuracy {:.4} CCC {:.4}",
        r.teacher.accuracy,
        r.teacher.mean_ccc,
        r.mean_distilled_accuracy,
        r.mean_distilled_ccc,
        100.0 * r.fraction_of_teacher_accuracy,
        r.mean_baseline_accuracy,
        r.mean_baseline_ccc
    );
    // Chance is 1/8: the teacher must have learnt something for the comparison to mean anything.
    assert!(r.teacher.accuracy > 0.2, "teacher accuracy {}", r.teacher.accuracy);
    assert!(
        r.mean_distilled_accuracy > r.mean_baseline_accuracy,
        "distillation did not improve accuracy: {:.4} vs {:.4}",
        r.mean_distilled_accuracy,
        r.mean_baseline_accuracy
    );
    assert!(
        r.mean_distilled_ccc > r.mean_baseline_ccc,
        "distillation did not improve mean CCC: {:.4} vs {:.4}",
        r.mean_distilled_ccc,
        r.mean_baseline_ccc
    );
    assert!(
        r.fraction_of_teacher_accuracy >= 0.9,
        "distilled students reach only {:.1}% of the teacher's accuracy",
        100.0 * r.fraction_of_teacher_accuracy
    );
}
