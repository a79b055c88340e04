//! The distillation experiment of the quality bar (`tests/quality.rs`) at any size, for longer
//! quality runs than a test can afford:
//!
//! ```text
//! cargo run --profile dev --example distillation_experiment -- \
//!     --faces 4000 --side 48 --teacher-steps 300 --student-steps 400 --seeds 11,12,13,14,15 --dir /tmp/exp
//! ```
//!
//! Defaults are the test's sizes. Prints the report as JSON and a one-line summary. Unknown flags are refused.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use distillery_local::{ExperimentOptions, distillation_experiment};

#[global_allocator]
static GLOBAL: distillery_models::alloc::Allocator = distillery_models::alloc::Allocator;

fn parse() -> Result<ExperimentOptions, String> {
    let mut o = ExperimentOptions::quality_bar(std::env::temp_dir().join("distillery-experiment"));
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--dir" => o.dir = PathBuf::from(value),
            "--faces" => o.faces = num(&value)?,
            "--side" => o.side = num(&value)? as u32,
            "--teacher-steps" => o.teacher_steps = num(&value)?,
            "--student-steps" => o.student_steps = num(&value)?,
            "--labelled-fraction" => {
                o.labelled_fraction = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?
            }
            "--views" => o.views = num(&value)? as u32,
            "--workers" => o.workers = num(&value)? as usize,
            "--seed" => o.seed = num(&value)?,
            "--seeds" => o.student_seeds = value.split(',').map(num).collect::<Result<_, _>>()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(o)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    distillery_models::alloc::keep_freed_pages();
    let opts = parse()?;
    let r = distillation_experiment(&opts).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    println!(
        "teacher accuracy {:.4} | distilled {:.4} ({:.1}% of the teacher) | baseline {:.4} | per seed: {}",
        r.teacher.accuracy,
        r.mean_distilled_accuracy,
        100.0 * r.fraction_of_teacher_accuracy,
        r.mean_baseline_accuracy,
        r.seeds
            .iter()
            .map(|s| format!("{}: {:.4}/{:.4}", s.seed, s.distilled.accuracy, s.baseline.accuracy))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
