//! The training loop: batches in, optimiser steps, checkpoints, metrics and a report out.
//!
//! One step: forward in training mode → [`objective::terms`] → `backward` → clip the global gradient
//! norm → AdamW with the scheduled learning rate. Everything that influences a step (weights,
//! optimiser moments, data position, label subsampling) is either derived from the seed or stored
//! in the checkpoint, so a resumed run takes the very same steps as an uninterrupted one on CPU.
//!
//! Files written in the run directory: `config.toml`, `checkpoint/` (see [`crate::checkpoint`]),
//! `metrics.jsonl` (one JSON object per epoch and per `log.every_n_steps`) and `report.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use distillery_core::FaceId;
use distillery_data::Batch;
use distillery_models::nn::on_pool;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainState};
use crate::config::TrainConfig;
use crate::error::TensorContext;
use crate::objective::{self, ModelOutput, Terms};
use crate::optim::{AdamW, AdamWParams, LrSchedule, clip_grad_norm};
use crate::source::BatchSource;
use crate::{Error, Result};

/// What the loop needs from a model: a forward pass in training or inference mode (`Sync`: the
/// loop runs it on a rayon worker, see `distillery_models::nn::on_pool`).
pub trait TrainModel: Sync {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<ModelOutput>;
}

/// Running sums of per-step loss values (each step's terms are batch means).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossSums {
    pub steps: u64,
    pub rows: u64,
    pub hard: f64,
    pub soft: f64,
    pub smooth_l1: f64,
    pub bound: f64,
    pub pseudo_va: f64,
    pub feature: f64,
    pub total: f64,
    pub grad_norm: f64,
}

/// Scalar loss values of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepLosses {
    pub hard: f64,
    pub soft: f64,
    pub smooth_l1: f64,
    pub bound: f64,
    pub pseudo_va: f64,
    pub feature: f64,
    pub total: f64,
    pub grad_norm: f64,
}

impl LossSums {
    fn add(&mut self, l: &StepLosses, rows: usize) {
        self.steps += 1;
        self.rows += rows as u64;
        self.hard += l.hard;
        self.soft += l.soft;
        self.smooth_l1 += l.smooth_l1;
        self.bound += l.bound;
        self.pseudo_va += l.pseudo_va;
        self.feature += l.feature;
        self.total += l.total;
        self.grad_norm += l.grad_norm;
    }

    /// Means over the summed steps.
    pub fn mean(&self) -> StepLosses {
        let n = self.steps.max(1) as f64;
        StepLosses {
            hard: self.hard / n,
            soft: self.soft / n,
            smooth_l1: self.smooth_l1 / n,
            bound: self.bound / n,
            pseudo_va: self.pseudo_va / n,
            feature: self.feature / n,
            total: self.total / n,
            grad_norm: self.grad_norm / n,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    /// `step` (a periodic line), `epoch` (a finished epoch) or `final` (the partial last epoch).
    pub kind: String,
    /// Steps completed when the line was written.
    pub step: u64,
    pub epoch: usize,
    pub lr: f64,
    /// Steps averaged in this line.
    pub steps: u64,
    pub rows: u64,
    #[serde(flatten)]
    pub losses: StepLosses,
}

/// Progress of a run, handed to the progress callback after every step.
#[derive(Clone, Debug)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: usize,
    pub lr: f64,
    pub losses: StepLosses,
}

/// Outcome of [`train`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    /// Steps of the whole run (equal to `steps` when it finished).
    pub total_steps: u64,
    pub epochs_completed: usize,
    /// Step at which this invocation started (non-zero after a resume).
    pub resumed_from: u64,
    /// Mean losses over the last epoch (or the partial epoch at the end).
    pub last: StepLosses,
    pub seconds: f64,
}

/// Inputs of one training run.
pub struct TrainRun<'a> {
    pub config: &'a TrainConfig,
    pub run_dir: &'a Path,
    pub model: &'a dyn TrainModel,
    /// Every variable of the model (name → var), running statistics included.
    pub vars: Vec<(String, Var)>,
    pub source: &'a mut dyn BatchSource,
    /// Continue from the run directory's last checkpoint (a fresh start when there is none).
    pub resume: bool,
    /// Stop after this many steps even if the run is longer (the checkpoint then allows resuming).
    pub stop_after: Option<u64>,
    pub progress: Option<&'a mut (dyn FnMut(&Progress) + Send)>,
    pub cancel: Option<Arc<AtomicBool>>,
}

/// Total optimiser steps of a run: `optim.steps`, or `optim.epochs` × batches per epoch.
pub fn total_steps(cfg: &TrainConfig, source: &dyn BatchSource) -> Result<u64> {
    match cfg.optim.steps {
        Some(s) => Ok(s),
        None => {
            let per = source.batches_per_epoch().ok_or_else(|| {
                Error::config("optim.epochs", "the data source cannot tell its epoch length; set optim.steps")
            })?;
            if per == 0 {
                return Err(Error::Data("the training split yields no full batch".into()));
            }
            Ok(cfg.optim.epochs as u64 * per as u64)
        }
    }
}

/// Whether the label of `face` is used when only `fraction` of the faces keep theirs.
pub fn keeps_label(face: &FaceId, seed: u64, fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let mut h = blake3_like(face.as_str().as_bytes(), seed);
    h >>= 11;
    (h as f64 / (1u64 << 53) as f64) < fraction
}

/// A stable 64-bit hash of `bytes` and `seed` (FNV-1a followed by a SplitMix64 finaliser).
fn blake3_like(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Label and valence/arousal masks of `batch` after label subsampling.
fn masks(batch: &Batch, cfg: &TrainConfig) -> Result<(Tensor, Tensor)> {
    let f = cfg.data.labelled_fraction;
    if f >= 1.0 {
        return Ok((batch.label_mask.to_dtype(DType::F32)?, batch.va_mask.to_dtype(DType::F32)?));
    }
    let keep: Vec<f32> =
        batch.face_ids.iter().map(|id| if keeps_label(id, cfg.seed, f) { 1.0 } else { 0.0 }).collect();
    let keep = Tensor::from_vec(keep, batch.len(), batch.images.device())?;
    Ok(((batch.label_mask.to_dtype(DType::F32)? * &keep)?, (batch.va_mask.to_dtype(DType::F32)? * &keep)?))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn losses_of(t: &Terms, grad_norm: f64) -> Result<StepLosses> {
    Ok(StepLosses {
        hard: scalar(&t.hard)?,
        soft: scalar(&t.soft)?,
        smooth_l1: scalar(&t.smooth_l1)?,
        bound: scalar(&t.bound)?,
        pseudo_va: scalar(&t.pseudo_va)?,
        feature: scalar(&t.feature)?,
        total: scalar(&t.total)?,
        grad_norm,
    })
}

fn metrics_path(run_dir: &Path) -> PathBuf {
    run_dir.join("metrics.jsonl")
}

fn append_line(run_dir: &Path, line: &MetricsLine) -> Result<()> {
    let path = metrics_path(run_dir);
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
    let text = serde_json::to_string(line).expect("metrics serialise");
    writeln!(f, "{text}").map_err(|e| Error::io(&path, e))
}

/// Keeps only the lines of `metrics.jsonl` written up to `step` (the checkpoint a run resumes from).
fn truncate_metrics(run_dir: &Path, step: u64) -> Result<()> {
    let path = metrics_path(run_dir);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<MetricsLine>(l)
                .map(|m| m.step <= step && m.kind != "final")
                .unwrap_or(false)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(&path, out).map_err(|e| Error::io(&path, e))
}

/// Reads `metrics.jsonl` of a run directory.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<MetricsLine>> {
    let path = metrics_path(run_dir);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::format(&path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Runs (or resumes) training; see the module docs for what is written where.
pub fn train(run: TrainRun<'_>) -> Result<TrainSummary> {
    let TrainRun { config: cfg, run_dir, model, vars, source, resume, stop_after, mut progress, cancel } =
        run;
    let started = Instant::now();
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let total = total_steps(cfg, source)?;
    let o = &cfg.optim;
    let hp = AdamWParams {
        lr: o.lr,
        beta1: o.betas[0],
        beta2: o.betas[1],
        eps: o.eps,
        weight_decay: o.weight_decay,
    };
    let mut opt = AdamW::new(vars.iter().cloned(), hp)?;
    let opt_vars = opt.vars();
    let schedule = LrSchedule { peak: o.lr, warmup: o.warmup_steps, total, min_ratio: o.min_lr_ratio };

    let restored = if resume { checkpoint::load(run_dir, &vars, &mut opt)? } else { None };
    let (mut step, mut epoch_sums, mut window_sums) = match restored {
        Some(state) => {
            source.seek(&state.data_position)?;
            truncate_metrics(run_dir, state.step)?;
            tracing::info!(step = state.step, run_dir = %run_dir.display(), "resuming from checkpoint");
            (state.step, state.epoch_sums, state.window_sums)
        }
        None => {
            let cpath = run_dir.join("config.toml");
            std::fs::write(&cpath, cfg.to_toml()).map_err(|e| Error::io(&cpath, e))?;
            let mpath = metrics_path(run_dir);
            if mpath.exists() {
                std::fs::remove_file(&mpath).map_err(|e| Error::io(&mpath, e))?;
            }
            (0, LossSums::default(), LossSums::default())
        }
    };
    let resumed_from = step;
    let mut epochs_completed = source.epoch();
    let mut last = epoch_sums.mean();
    let end = stop_after.map_or(total, |s| s.min(total));
    tracing::info!(total_steps = total, start = step, "training");

    let save = |step: u64, source: &dyn BatchSource, opt: &AdamW, e: &LossSums, w: &LossSums| {
        let state = TrainState {
            step,
            epoch: source.epoch(),
            data_position: source.position(),
            epoch_sums: e.clone(),
            window_sums: w.clone(),
        };
        checkpoint::save(run_dir, &vars, opt, &state)
    };

    while step < end {
        if cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            save(step, source, &opt, &epoch_sums, &window_sums)?;
            return Err(Error::Cancelled);
        }
        let epoch = source.epoch();
        let batch = source.next_batch()?;
        let lr = schedule.at(step);
        opt.set_lr(lr);
        let (label_mask, va_mask) = masks(&batch, cfg)?;
        // Forward and backward on a rayon worker, so the kernels' parallel loops start there
        // without a hand-off per op (`on_pool`).
        let out = on_pool(|| model.forward_t(&batch.images, true)).op("student forward")?;
        let terms = objective::terms(&out, &batch, &label_mask, &va_mask, &cfg.loss)?;
        let total_loss = scalar(&terms.total)?;
        if !total_loss.is_finite() {
            return Err(Error::NonFinite { what: "loss".into(), step });
        }
        let mut grads = on_pool(|| terms.total.backward()).op("backward")?;
        let norm = clip_grad_norm(&mut grads, &opt_vars, o.grad_clip)?;
        if !norm.is_finite() {
            return Err(Error::NonFinite { what: "gradient norm".into(), step });
        }
        opt.step(&grads)?;
        step += 1;
        let l = losses_of(&terms, norm)?;
        epoch_sums.add(&l, batch.len());
        window_sums.add(&l, batch.len());
        if let Some(cb) = progress.as_mut() {
            cb(&Progress { step, total_steps: total, epoch, lr, losses: l });
        }
        let every = cfg.log.every_n_steps;
        if every > 0 && step.is_multiple_of(every) {
            let line = MetricsLine {
                kind: "step".into(),
                step,
                epoch,
                lr,
                steps: window_sums.steps,
                rows: window_sums.rows,
                losses: window_sums.mean(),
            };
            tracing::info!(
                step,
                epoch,
                lr,
                loss = line.losses.total,
                hard = line.losses.hard,
                soft = line.losses.soft,
                smooth_l1 = line.losses.smooth_l1,
                bound = line.losses.bound,
                feature = line.losses.feature,
                "train"
            );
            append_line(run_dir, &line)?;
            window_sums = LossSums::default();
        }
        if source.epoch() != epoch {
            last = epoch_sums.mean();
            let line = MetricsLine {
                kind: "epoch".into(),
                step,
                epoch,
                lr,
                steps: epoch_sums.steps,
                rows: epoch_sums.rows,
                losses: last,
            };
            tracing::info!(epoch, step, loss = last.total, "epoch done");
            append_line(run_dir, &line)?;
            epoch_sums = LossSums::default();
            epochs_completed = source.epoch();
        }
        let ck = cfg.checkpoint.every_n_steps;
        if ck > 0 && step.is_multiple_of(ck) && step < end {
            save(step, source, &opt, &epoch_sums, &window_sums)?;
        }
    }
    save(step, source, &opt, &epoch_sums, &window_sums)?;
    if step == total && epoch_sums.steps > 0 {
        last = epoch_sums.mean();
        let line = MetricsLine {
            kind: "final".into(),
            step,
            epoch: source.epoch(),
            lr: schedule.at(step.saturating_sub(1)),
            steps: epoch_sums.steps,
            rows: epoch_sums.rows,
            losses: last,
        };
        append_line(run_dir, &line)?;
    }
    Ok(TrainSummary {
        steps: step,
        total_steps: total,
        epochs_completed,
        resumed_from,
        last,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemorySource;
    use candle_core::{Device, Module};
    use candle_nn::{VarBuilder, VarMap};

    /// A linear "student" on flattened images: logits, tanh(va) and a projection.
    pub(crate) struct Linear {
        head: candle_nn::Linear,
        proj: candle_nn::Linear,
        classes: usize,
    }

    impl Linear {
        pub(crate) fn new(vb: VarBuilder<'_>, d_in: usize, classes: usize) -> Self {
            Self {
                head: candle_nn::linear(d_in, classes + 2, vb.pp("head")).unwrap(),
                proj: candle_nn::linear(d_in, 4, vb.pp("proj")).unwrap(),
                classes,
            }
        }
    }

    impl TrainModel for Linear {
        fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<ModelOutput> {
            let f = x.flatten_from(1)?;
            let y = self.head.forward(&f)?;
            Ok(ModelOutput {
                logits: y.narrow(1, 0, self.classes)?,
                va: y.narrow(1, self.classes, 2)?.tanh()?,
                projected: Some(self.proj.forward(&f)?),
            })
        }
    }

    /// Random-but-fixed data where the class is decided by which image quadrant is bright.
    pub(crate) fn data(n: usize, seed: u64, teacher: bool) -> Batch {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let dev = Device::Cpu;
        let (mut img, mut lab, mut va, mut tl, mut tva) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..n {
            let c = rng.random_range(0..4u32);
            for q in 0..4u32 {
                let base = if q == c { 1.0 } else { 0.0 };
                for _ in 0..4 {
                    img.push(base + rng.random_range(-0.3f32..0.3));
                }
            }
            lab.push(c);
            let v = [(c as f32 - 1.5) / 2.0, if c % 2 == 0 { 0.5 } else { -0.5 }];
            va.extend(v);
            tl.extend((0..4).map(|k| if k == c { 2.0f32 } else { 0.0 }));
            tva.extend(v.map(|x| x * 0.9));
        }
        Batch {
            face_ids: (0..n).map(|i| FaceId::of(&(i as u64 ^ seed).to_le_bytes(), None)).collect(),
            views: vec![0; n],
            images: Tensor::from_vec(img, (n, 1, 4, 4), &dev).unwrap(),
            labels: Tensor::from_vec(lab, n, &dev).unwrap(),
            label_mask: Tensor::ones(n, DType::F32, &dev).unwrap(),
            va: Tensor::from_vec(va, (n, 2), &dev).unwrap(),
            va_mask: Tensor::ones(n, DType::F32, &dev).unwrap(),
            teacher_logits: teacher.then(|| Tensor::from_vec(tl, (n, 4), &dev).unwrap()),
            teacher_va: teacher.then(|| Tensor::from_vec(tva, (n, 2), &dev).unwrap()),
            teacher_embedding: teacher.then(|| Tensor::ones((n, 4), DType::F32, &dev).unwrap()),
        }
    }

    fn config(steps: u64) -> TrainConfig {
        let mut c = TrainConfig { seed: 11, ..TrainConfig::default() };
        c.data.batch_size = 8;
        c.student.num_classes = 4;
        c.optim.steps = Some(steps);
        c.optim.warmup_steps = 3;
        c.optim.lr = 0.05;
        c.loss.feature = crate::config::FeatureKind::Mse;
        c.loss.feature_weight = 0.1;
        c.checkpoint.every_n_steps = 0;
        c.log.every_n_steps = 2;
        c
    }

    fn named(vm: &VarMap) -> Vec<(String, Var)> {
        crate::init::named_vars(vm)
    }

    fn weights(vars: &[(String, Var)]) -> Vec<Vec<f32>> {
        vars.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    }

    fn run(
        cfg: &TrainConfig,
        dir: &Path,
        resume: bool,
        stop_after: Option<u64>,
    ) -> (Vec<Vec<f32>>, TrainSummary) {
        let vm = VarMap::new();
        let model =
            Linear::new(crate::init::seeded_var_builder(&vm, cfg.seed, DType::F32, &Device::Cpu), 16, 4);
        let mut src = MemorySource::new(data(40, 1, true), cfg.data.batch_size, cfg.seed, true).unwrap();
        let vars = named(&vm);
        let s = train(TrainRun {
            config: cfg,
            run_dir: dir,
            model: &model,
            vars: vars.clone(),
            source: &mut src,
            resume,
            stop_after,
            progress: None,
            cancel: None,
        })
        .unwrap();
        (weights(&vars), s)
    }

    #[test]
    fn resume_continues_exactly() {
        let cfg = config(12);
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (straight, s) = run(&cfg, a.path(), false, None);
        assert_eq!(s.steps, 12);
        // 40 rows / 8 = 5 batches per epoch: the stop at 7 falls inside epoch 1.
        let (_, half) = run(&cfg, b.path(), false, Some(7));
        assert_eq!(half.steps, 7);
        let (resumed, s2) = run(&cfg, b.path(), true, None);
        assert_eq!(s2.resumed_from, 7);
        assert_eq!(s2.steps, 12);
        assert_eq!(straight, resumed, "resumed weights differ from an uninterrupted run");
        // Loss sums restored from a checkpoint are re-accumulated in another order: equal to the
        // last bits of an f64, not bitwise.
        let (la, lb) = (read_metrics(a.path()).unwrap(), read_metrics(b.path()).unwrap());
        assert_eq!(la.len(), lb.len(), "metrics of the resumed run differ in length");
        for (x, y) in la.iter().zip(&lb) {
            assert_eq!((x.kind.as_str(), x.step), (y.kind.as_str(), y.step));
            let (p, q) = (x.losses.total, y.losses.total);
            assert!((p - q).abs() <= 1e-12 * p.abs().max(1.0), "step {}: {p} vs {q}", x.step);
            let (p, q) = (x.losses.hard, y.losses.hard);
            assert!((p - q).abs() <= 1e-12 * p.abs().max(1.0), "step {}: {p} vs {q}", x.step);
        }
        let lines = la;
        assert_eq!(lines.iter().filter(|l| l.kind == "epoch").count(), 2);
        assert_eq!(lines.iter().filter(|l| l.kind == "step").count(), 6);
        assert_eq!(lines.last().unwrap().kind, "final");
    }

    #[test]
    fn same_seed_same_weights_and_loss_decreases() {
        let cfg = config(25);
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (wa, _) = run(&cfg, a.path(), false, None);
        let (wb, _) = run(&cfg, b.path(), false, None);
        assert_eq!(wa, wb);
        let lines = read_metrics(a.path()).unwrap();
        // The soft term is a cross-entropy against the teacher, bounded below by the teacher's
        // entropy; the hard cross-entropy against the labels can fall towards zero.
        let first = lines.first().unwrap().losses.hard;
        let last = lines.iter().rev().find(|l| l.kind == "step").unwrap().losses.hard;
        assert!(last < 0.5 * first, "hard loss did not fall: {first} → {last}");
        let mut cfg2 = cfg.clone();
        cfg2.seed = 12;
        let c = tempfile::tempdir().unwrap();
        let (wc, _) = run(&cfg2, c.path(), false, None);
        assert_ne!(wa, wc);
    }

    #[test]
    fn labelled_fraction_hides_labels_deterministically() {
        let ids: Vec<FaceId> = (0..2000u32).map(|i| FaceId::of(&i.to_le_bytes(), None)).collect();
        let kept = ids.iter().filter(|id| keeps_label(id, 3, 0.25)).count();
        assert!((400..600).contains(&kept), "{kept}");
        let again = ids.iter().filter(|id| keeps_label(id, 3, 0.25)).count();
        assert_eq!(kept, again);
        assert!(ids.iter().all(|id| keeps_label(id, 3, 1.0)));
    }

    #[test]
    fn cancel_saves_a_checkpoint() {
        let cfg = config(12);
        let dir = tempfile::tempdir().unwrap();
        let vm = VarMap::new();
        let model =
            Linear::new(crate::init::seeded_var_builder(&vm, cfg.seed, DType::F32, &Device::Cpu), 16, 4);
        let mut src = MemorySource::new(data(40, 1, true), 8, cfg.seed, true).unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let mut cb = move |p: &Progress| {
            if p.step == 4 {
                f2.store(true, Ordering::Relaxed);
            }
        };
        let e = train(TrainRun {
            config: &cfg,
            run_dir: dir.path(),
            model: &model,
            vars: named(&vm),
            source: &mut src,
            resume: false,
            stop_after: None,
            progress: Some(&mut cb),
            cancel: Some(flag),
        })
        .unwrap_err();
        assert!(matches!(e, Error::Cancelled));
        let state: TrainState =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("checkpoint/state.json")).unwrap())
                .unwrap();
        assert_eq!(state.step, 4);
    }
}
