//! The distillation experiment behind the quality bar: does a teacher's knowledge, cached once,
//! make a better student than the labels alone?
//!
//! On synthetic faces: a teacher is trained by the trainer on every label (α = 0), labels the faces
//! through a coordinator and gRPC workers into a Lance cache, and then, for each seed, the same
//! student is trained twice with the same budget and the same labelled fraction — once with KD +
//! teacher-bounded regression from the cache, once from the labels only — and all are scored on
//! the held-out test split.

use std::path::{Path, PathBuf};

use candle_core::Device;
use distillery_cache::{FaceStore, TeacherCache};
use distillery_core::TeacherFingerprint;
use distillery_data::Split;
use distillery_trainer::eval::{EvalOptions, EvalReport};
use distillery_trainer::run::{StudentPredictor, evaluate, resolve_teacher};
use serde::Serialize;

use crate::error::Result;
use crate::quickstart::{label_locally, step, student_configs, synthesise, teacher_config, train};

/// Sizes of the experiment.
#[derive(Clone, Debug, Serialize)]
pub struct ExperimentOptions {
    /// Everything is written here (created if missing).
    pub dir: PathBuf,
    pub faces: u64,
    pub side: u32,
    pub teacher_steps: u64,
    pub student_steps: u64,
    /// Fraction of faces whose labels the students may see.
    pub labelled_fraction: f64,
    /// Augmented teacher views per face besides the plain one.
    pub views: u32,
    pub workers: usize,
    /// Seed of the data and the teacher.
    pub seed: u64,
    /// One distilled and one baseline student per seed.
    pub student_seeds: Vec<u64>,
}

impl ExperimentOptions {
    /// The sizes of the quality bar (`tests/quality.rs`): 4,000 faces at 48², teacher and
    /// students 300 and 400 steps, 10 % of the labels, one augmented view, two workers, five
    /// student seeds; a few minutes on two cores.
    pub fn quality_bar(dir: PathBuf) -> Self {
        Self {
            dir,
            faces: 4000,
            side: 48,
            teacher_steps: 300,
            student_steps: 400,
            labelled_fraction: 0.1,
            views: 1,
            workers: 2,
            seed: 0,
            student_seeds: vec![11, 12, 13, 14, 15],
        }
    }
}

/// Scores of one model on the test split.
#[derive(Clone, Debug, Serialize)]
pub struct Scores {
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Mean of the valence and arousal CCC.
    pub mean_ccc: f64,
    pub teacher_agreement: Option<f64>,
}

impl Scores {
    fn of(r: &EvalReport) -> Self {
        Scores {
            accuracy: r.expression.accuracy,
            macro_f1: r.expression.macro_f1,
            mean_ccc: r.affect.as_ref().map_or(f64::NAN, |a| a.mean_ccc),
            teacher_agreement: r.teacher.as_ref().map(|t| t.top1_agreement),
        }
    }
}

/// The distilled and the baseline student of one seed.
#[derive(Clone, Debug, Serialize)]
pub struct SeedResult {
    pub seed: u64,
    pub distilled: Scores,
    pub baseline: Scores,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExperimentReport {
    pub options: ExperimentOptions,
    pub teacher: Scores,
    pub seeds: Vec<SeedResult>,
    pub mean_distilled_accuracy: f64,
    pub mean_baseline_accuracy: f64,
    pub mean_distilled_ccc: f64,
    pub mean_baseline_ccc: f64,
    /// Mean distilled accuracy over the teacher's.
    pub fraction_of_teacher_accuracy: f64,
}

/// Scores the model in `run_dir` on the test split, with agreement against the cached teacher.
async fn score(
    run_dir: &Path,
    store: &FaceStore,
    cache: &TeacherCache,
    fp: &TeacherFingerprint,
) -> Result<Scores> {
    let p = StudentPredictor::load(run_dir, &Device::Cpu)?;
    let eval = EvalOptions { split: "test".into(), ..Default::default() };
    let (report, _) = evaluate(&p, store, Some((cache, fp)), Split::Test, 128, &eval).await?;
    Ok(Scores::of(&report))
}

/// Runs the experiment; see the module docs.
pub async fn distillation_experiment(opts: &ExperimentOptions) -> Result<ExperimentReport> {
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).map_err(|e| step("create directory", format!("{}: {e}", dir.display())))?;
    let faces_uri = dir.join("faces.lance").to_string_lossy().into_owned();
    let cache_uri = dir.join("cache.lance").to_string_lossy().into_owned();
    synthesise(&faces_uri, opts.faces, opts.side, opts.seed).await?;

    let teacher_dir = dir.join("teacher");
    train(&teacher_config(opts.side, &faces_uri, opts.seed + 1, opts.teacher_steps), &teacher_dir).await?;
    label_locally(dir, &faces_uri, &cache_uri, &teacher_dir, opts.views, opts.workers, opts.seed).await?;

    let store = FaceStore::open(&faces_uri).await?;
    let cache = TeacherCache::open(&cache_uri).await?;
    let fp = resolve_teacher(&cache, None)?;
    let teacher = score(&teacher_dir, &store, &cache, &fp).await?;

    let mut seeds = Vec::new();
    for &seed in &opts.student_seeds {
        let (kd, base) = student_configs(
            opts.side,
            &faces_uri,
            &cache_uri,
            seed,
            opts.labelled_fraction,
            opts.views,
            opts.student_steps,
        );
        let (kd_dir, base_dir) = (dir.join(format!("kd-{seed}")), dir.join(format!("baseline-{seed}")));
        train(&kd, &kd_dir).await?;
        train(&base, &base_dir).await?;
        seeds.push(SeedResult {
            seed,
            distilled: score(&kd_dir, &store, &cache, &fp).await?,
            baseline: score(&base_dir, &store, &cache, &fp).await?,
        });
    }
    let mean = |f: &dyn Fn(&SeedResult) -> f64| seeds.iter().map(f).sum::<f64>() / seeds.len().max(1) as f64;
    let mean_distilled_accuracy = mean(&|s| s.distilled.accuracy);
    Ok(ExperimentReport {
        mean_baseline_accuracy: mean(&|s| s.baseline.accuracy),
        mean_distilled_ccc: mean(&|s| s.distilled.mean_ccc),
        mean_baseline_ccc: mean(&|s| s.baseline.mean_ccc),
        fraction_of_teacher_accuracy: mean_distilled_accuracy / teacher.accuracy,
        mean_distilled_accuracy,
        options: opts.clone(),
        teacher,
        seeds,
    })
}
