//! `distillery quickstart`: the main job on an embedded default, with no services to install.
//!
//! 1. synthesise labelled faces into a Lance faces dataset;
//! 2. train a teacher with the trainer on every label (α = 0: plain supervised);
//! 3. start a coordinator and two teacher workers as real gRPC servers on loopback and label the
//!    faces with that teacher into a Lance cache;
//! 4. distil a student with KD + teacher-bounded regression, and train the same student without
//!    the teacher as a baseline — both see the labels of only a fraction of the faces, which is
//!    where a teacher's soft labels pay;
//! 5. evaluate all three on the held-out test split and write `report.md` with plots.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use distillery_cache::{FaceStore, TeacherCache};
use distillery_data::Split;
use distillery_data::synth::SynthConfig;
use distillery_models::zoo;
use distillery_teacher::TeacherSpec;
use distillery_trainer::TrainConfig;
use distillery_trainer::eval::{EvalOptions, EvalReport, EvalSamples, Predictor};
use distillery_trainer::run::{RunOptions, RunReport, StudentPredictor, evaluate, resolve_teacher};
use serde::Serialize;

use crate::cluster::{LocalCluster, LocalClusterConfig};
use crate::error::{Error, Result};
use crate::label::{LabelRequest, submit_and_wait};

/// How big a quickstart to run.
#[derive(Clone, Debug)]
pub struct QuickstartOptions {
    /// Everything is written here (created if missing).
    pub dir: PathBuf,
    /// The small variant (under two minutes on two cores), used by the tests.
    pub quick: bool,
    pub seed: u64,
    pub workers: usize,
}

/// Sizes of one quickstart variant.
#[derive(Clone, Copy, Debug, Serialize)]
struct Plan {
    faces: u64,
    side: u32,
    teacher_steps: u64,
    student_steps: u64,
    /// Fraction of faces whose labels the students may see.
    labelled_fraction: f64,
    views: u32,
}

impl Plan {
    fn of(quick: bool) -> Self {
        if quick {
            Plan {
                faces: 4000,
                side: 48,
                teacher_steps: 300,
                student_steps: 150,
                labelled_fraction: 0.1,
                views: 1,
            }
        } else {
            Plan {
                faces: 6000,
                side: 48,
                teacher_steps: 1200,
                student_steps: 600,
                labelled_fraction: 0.1,
                views: 2,
            }
        }
    }
}

/// One row of the report's table.
#[derive(Clone, Debug, Serialize)]
pub struct ModelRow {
    pub name: String,
    pub role: String,
    pub model: String,
    pub parameters: u64,
    pub macs: u64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub valence_ccc: f64,
    pub arousal_ccc: f64,
    pub valence_rmse: f64,
    pub arousal_rmse: f64,
    /// Top-1 agreement with the teacher on the test split.
    pub teacher_agreement: Option<f64>,
    /// Inference throughput on this machine's CPU (batch 64).
    pub images_per_second: f64,
}

/// What the quickstart did; also written to `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct QuickstartSummary {
    pub dir: String,
    pub faces: u64,
    pub labelled_rows: u64,
    pub rows: Vec<ModelRow>,
    pub report: String,
    pub seconds: f64,
}

pub(crate) fn base_config(side: u32, faces: &str, seed: u64) -> TrainConfig {
    let mut c = TrainConfig { seed, ..TrainConfig::default() };
    c.data.faces = Some(faces.to_owned());
    c.data.train_split = "train".into();
    c.data.eval_split = "val".into();
    c.data.batch_size = 64;
    c.data.workers = 2;
    c.data.shuffle_buffer = 1024;
    c.student.spec = format!("tiny@{side}");
    c.student.num_classes = 8;
    c.loss.temperature = 4.0;
    c.loss.margin = 0.05;
    c.optim.lr = 3e-3;
    c.optim.weight_decay = 1e-4;
    c.optim.warmup_steps = 10;
    c.optim.min_lr_ratio = 0.05;
    c.checkpoint.every_n_steps = 0;
    c.log.every_n_steps = 20;
    c
}

/// Runs the quickstart; `stage` is told each step as it starts.
pub async fn quickstart(opts: &QuickstartOptions, mut stage: impl FnMut(&str)) -> Result<QuickstartSummary> {
    let t0 = Instant::now();
    let plan = Plan::of(opts.quick);
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).map_err(|e| step("create directory", format!("{}: {e}", dir.display())))?;
    let faces_uri = dir.join("faces.lance").to_string_lossy().into_owned();
    let cache_uri = dir.join("cache.lance").to_string_lossy().into_owned();

    stage(&format!("synthesising {} faces at {}px", plan.faces, plan.side));
    let faces = synthesise(&faces_uri, plan.faces, plan.side, opts.seed).await?;

    stage("training the teacher (supervised, every label)");
    let tcfg = teacher_config(plan.side, &faces_uri, opts.seed + 1, plan.teacher_steps);
    let teacher_dir = dir.join("teacher");
    train(&tcfg, &teacher_dir).await?;

    stage(&format!("labelling with {} teacher workers over gRPC on loopback", opts.workers));
    label_locally(dir, &faces_uri, &cache_uri, &teacher_dir, plan.views, opts.workers, opts.seed).await?;

    stage("distilling the student (KD + teacher-bounded regression)");
    let (kcfg, bcfg) = student_configs(
        plan.side,
        &faces_uri,
        &cache_uri,
        opts.seed + 2,
        plan.labelled_fraction,
        plan.views,
        plan.student_steps,
    );
    let kd_dir = dir.join("student-kd");
    train(&kcfg, &kd_dir).await?;

    stage("training the baseline student (no teacher)");
    let base_dir = dir.join("student-baseline");
    train(&bcfg, &base_dir).await?;

    stage("evaluating teacher, distilled student and baseline on the test split");
    let store = FaceStore::open(&faces_uri).await?;
    let cache = TeacherCache::open(&cache_uri).await?;
    let fp = resolve_teacher(&cache, None)?;
    let labelled_rows = cache.summary().await?.rows;
    let mut rows = Vec::new();
    let mut evals = Vec::new();
    for (name, role, run_dir) in [
        ("teacher", "teacher (supervised, all labels)", &teacher_dir),
        ("student-kd", "student, KD + teacher bound", &kd_dir),
        ("student-baseline", "student, labels only", &base_dir),
    ] {
        let p = StudentPredictor::load(run_dir, &Device::Cpu)?;
        let opts_eval = EvalOptions { split: "test".into(), ..Default::default() };
        let (report, samples) =
            evaluate(&p, &store, Some((&cache, &fp)), Split::Test, 128, &opts_eval).await?;
        let cost = zoo::student_cost(&p.spec.name(), p.spec.num_classes)
            .map_err(|e| step("model cost", e.to_string()))?;
        let ips = throughput(&p).map_err(|e| step("throughput", e.to_string()))?;
        rows.push(row(name, role, &p, &report, cost.parameters, cost.macs, ips));
        evals.push((name, report, samples));
    }

    stage("writing the report");
    let report_path = write_report(dir, &plan, &rows, &evals, labelled_rows)?;
    let summary = QuickstartSummary {
        dir: dir.display().to_string(),
        faces,
        labelled_rows,
        rows,
        report: report_path.display().to_string(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| step("summary", e.to_string()))?;
    std::fs::write(dir.join("summary.json"), json).map_err(|e| step("summary", e.to_string()))?;
    Ok(summary)
}

/// The teacher's configuration: plain supervised training (α = 0, ν = 0) on every label.
pub(crate) fn teacher_config(side: u32, faces: &str, seed: u64, steps: u64) -> TrainConfig {
    let mut c = base_config(side, faces, seed);
    c.loss.alpha = 0.0;
    c.loss.nu = 0.0;
    c.data.labelled_fraction = 1.0;
    c.optim.steps = Some(steps);
    c
}

/// The distilled student's configuration (KD + teacher-bounded regression from the cache, labels
/// on `labelled_fraction` of the faces) and the baseline's (the same without the teacher).
pub(crate) fn student_configs(
    side: u32,
    faces: &str,
    cache: &str,
    seed: u64,
    labelled_fraction: f64,
    views: u32,
    steps: u64,
) -> (TrainConfig, TrainConfig) {
    use distillery_trainer::config::ViewsMode;
    let mut kd = base_config(side, faces, seed);
    kd.data.cache = Some(cache.to_owned());
    kd.data.views = if views > 0 { ViewsMode::Random } else { ViewsMode::Plain };
    kd.data.labelled_fraction = labelled_fraction;
    kd.loss.alpha = 0.9;
    kd.loss.nu = 0.5;
    kd.optim.steps = Some(steps);
    let mut base = kd.clone();
    base.data.cache = None;
    base.data.views = ViewsMode::Plain;
    base.loss.alpha = 0.0;
    base.loss.nu = 0.0;
    (kd, base)
}

/// Labels `faces_uri` into `cache_uri` with the student in `teacher_dir` as the teacher, through a
/// coordinator and `workers` teacher workers started as gRPC servers on loopback.
pub(crate) async fn label_locally(
    dir: &Path,
    faces_uri: &str,
    cache_uri: &str,
    teacher_dir: &Path,
    views: u32,
    workers: usize,
    seed: u64,
) -> Result<()> {
    let mut ccfg = LocalClusterConfig::new(dir.join("coordinator"), workers);
    ccfg.decode_threads = 1;
    let cluster = LocalCluster::start(&ccfg).await?;
    let req = LabelRequest {
        faces_uri: faces_uri.to_owned(),
        cache_uri: cache_uri.to_owned(),
        teacher: TeacherSpec::Student(teacher_dir.to_path_buf()),
        views,
        shard_size: 256,
        view_seed: seed,
        storage_options: Default::default(),
    };
    let job = submit_and_wait(&cluster.endpoint(), None, &req, |p| {
        tracing::debug!(done = p.images_done, total = p.images_total, "labelling")
    })
    .await;
    cluster.shutdown().await?;
    let job = job?;
    if !job.poisoned.is_empty() {
        return Err(step("labelling", format!("{} shards failed: {:?}", job.poisoned.len(), job.poisoned)));
    }
    Ok(())
}

pub(crate) fn step(what: &str, reason: impl Into<String>) -> Error {
    Error::Step { what: what.to_owned(), reason: reason.into() }
}

pub(crate) async fn synthesise(uri: &str, count: u64, side: u32, seed: u64) -> Result<u64> {
    let cfg = SynthConfig { count, size: side, seed, ..SynthConfig::default() };
    let mut store = FaceStore::create_or_open(uri).await?;
    store.synthesize(&cfg, |_| {}).await?;
    Ok(store.count().await?)
}

pub(crate) async fn train(cfg: &TrainConfig, run_dir: &Path) -> Result<RunReport> {
    let mut opts = RunOptions::new(run_dir);
    opts.resume = run_dir.join("report.json").is_file();
    Ok(distillery_trainer::run::run(cfg, opts).await?)
}

/// Images per second of inference at batch 64 (after one warm-up batch).
fn throughput(p: &StudentPredictor) -> candle_core::Result<f64> {
    let [h, w] = p.spec.preprocess().size;
    let x = Tensor::zeros((64, 3, h, w), DType::F32, &Device::Cpu)?;
    p.predict(&x)?;
    let t = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        p.predict(&x)?;
    }
    Ok((64 * reps) as f64 / t.elapsed().as_secs_f64())
}

fn row(
    name: &str,
    role: &str,
    p: &StudentPredictor,
    r: &EvalReport,
    parameters: u64,
    macs: u64,
    ips: f64,
) -> ModelRow {
    let nan = f64::NAN;
    let (vc, ac, vr, ar) = match &r.affect {
        Some(a) => (a.valence.ccc, a.arousal.ccc, a.valence.rmse, a.arousal.rmse),
        None => (nan, nan, nan, nan),
    };
    ModelRow {
        name: name.into(),
        role: role.into(),
        model: p.spec.name(),
        parameters,
        macs,
        accuracy: r.expression.accuracy,
        macro_f1: r.expression.macro_f1,
        valence_ccc: vc,
        arousal_ccc: ac,
        valence_rmse: vr,
        arousal_rmse: ar,
        teacher_agreement: r.teacher.as_ref().map(|t| t.top1_agreement),
        images_per_second: ips,
    }
}

fn write_report(
    dir: &Path,
    plan: &Plan,
    rows: &[ModelRow],
    evals: &[(&str, EvalReport, EvalSamples)],
    labelled_rows: u64,
) -> Result<PathBuf> {
    use std::fmt::Write as _;
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| step("plots", e.to_string()))?;
    for (name, report, samples) in evals {
        let cm = plots.join(format!("confusion-{name}.png"));
        distillery_trainer::plots::confusion_heatmap(
            &report.expression.confusion,
            &report.expression.classes,
            &cm,
        )?;
        if !samples.valence.is_empty() {
            let va = plots.join(format!("valence-arousal-{name}.png"));
            distillery_trainer::plots::va_scatter(&samples.valence, &samples.arousal, &va)?;
        }
    }
    let mut md = String::new();
    let _ = writeln!(md, "# Distillery quickstart report\n");
    let _ = writeln!(
        md,
        "{} synthetic faces at {}px; the teacher saw every training label, the students only {:.0} % of \
         them; {} teacher-cache rows ({} augmented views per face). Metrics on the held-out test split.\n",
        plan.faces,
        plan.side,
        plan.labelled_fraction * 100.0,
        labelled_rows,
        plan.views
    );
    let _ = writeln!(
        md,
        "| model | role | params | MACs | accuracy | macro-F1 | valence CCC | arousal CCC | valence RMSE | arousal RMSE | agreement with teacher | images/s |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} M | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.0} |",
            r.model,
            r.role,
            r.parameters,
            r.macs as f64 / 1e6,
            r.accuracy,
            r.macro_f1,
            r.valence_ccc,
            r.arousal_ccc,
            r.valence_rmse,
            r.arousal_rmse,
            r.teacher_agreement.map_or("–".into(), |a| format!("{a:.3}")),
            r.images_per_second
        );
    }
    let _ = writeln!(md, "\n## Plots\n");
    for (name, _, samples) in evals {
        let _ = writeln!(md, "### {name}\n");
        let _ = writeln!(md, "![confusion matrix](plots/confusion-{name}.png)");
        if !samples.valence.is_empty() {
            let _ = writeln!(md, "![valence and arousal](plots/valence-arousal-{name}.png)");
        }
        let _ = writeln!(md, "![training curves]({name}/plots/training_curves.png)\n");
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|e| step("report", e.to_string()))?;
    Ok(path)
}
