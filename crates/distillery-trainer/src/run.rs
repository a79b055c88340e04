//! A whole run from a configuration: open the faces and the teacher cache, build the student,
//! train (or resume), save the final model, evaluate it on the evaluation split, and write the
//! report and figures.
//!
//! Run directory after a finished run:
//! `config.toml`, `checkpoint/`, `metrics.jsonl`, `student.json` + `model.safetensors` (loadable
//! with `distillery_models::student::load_student`), `eval.json`, `report.json` and `plots/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use distillery_cache::{
    BatchStream, FaceStore, StreamConfig, StreamPosition, TeacherCache, ViewSelection, open_stream,
};
use distillery_core::{ClassSet, Preprocess, TeacherFingerprint};
use distillery_data::{Batch, Split};
use distillery_models::student::{
    Student, StudentSpec, build_student, load_student, parameter_count, save_student,
};
use serde::{Deserialize, Serialize};

use crate::config::{TrainConfig, ViewsMode};
use crate::eval::{EvalOptions, EvalReport, EvalSamples, Prediction, Predictor, evaluate_batches};
use crate::init::{named_vars, seeded_var_builder};
use crate::objective::ModelOutput;
use crate::source::BatchSource;
use crate::train::{Progress, TrainModel, TrainRun, TrainSummary, train};
use crate::{Error, Result, checkpoint, plots};

/// A student under training, seen by the loop.
pub struct StudentModel(pub Box<dyn Student>);

impl TrainModel for StudentModel {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<ModelOutput> {
        let o = self.0.forward_t(x, train)?;
        Ok(ModelOutput { logits: o.logits, va: o.va, projected: o.projected })
    }
}

/// A trained student, seen by the evaluation.
pub struct StudentPredictor {
    pub name: String,
    pub spec: StudentSpec,
    pub model: Box<dyn Student>,
}

impl StudentPredictor {
    /// Loads the student saved in a run directory (`student.json` + `model.safetensors`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (spec, _, model) = load_student(dir, device).map_err(|e| Error::format(dir, e.to_string()))?;
        Ok(Self { name: format!("student:{}", spec.name()), spec, model })
    }
}

impl Predictor for StudentPredictor {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn preprocess(&self) -> Preprocess {
        self.spec.preprocess()
    }
    fn num_classes(&self) -> usize {
        self.spec.num_classes
    }
    fn predict(&self, x: &Tensor) -> candle_core::Result<Prediction> {
        let o = self.model.forward_t(x, false)?;
        Ok(Prediction { logits: o.logits, va: Some(o.va) })
    }
}

fn cache_err(e: distillery_cache::Error) -> Error {
    Error::Data(e.to_string())
}

/// Training batches from the cache's streaming reader.
pub struct StreamSource {
    stream: BatchStream,
    position: StreamPosition,
    per_epoch: usize,
    peeked: Option<Batch>,
}

impl StreamSource {
    /// Wraps a stream opened at `start` (the position in its config).
    pub fn new(stream: BatchStream, start: StreamPosition) -> Self {
        let per_epoch = stream.batches_per_epoch();
        Self { stream, position: start, per_epoch, peeked: None }
    }

    /// The next batch without consuming it.
    pub fn peek(&mut self) -> Result<&Batch> {
        if self.peeked.is_none() {
            let b = self.pull()?;
            self.peeked = Some(b);
        }
        Ok(self.peeked.as_ref().expect("peeked"))
    }

    fn pull(&mut self) -> Result<Batch> {
        match self.stream.next() {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => Err(cache_err(e)),
            None => Err(Error::Data("the training stream ended".into())),
        }
    }
}

impl BatchSource for StreamSource {
    fn next_batch(&mut self) -> Result<Batch> {
        let b = match self.peeked.take() {
            Some(b) => b,
            None => self.pull()?,
        };
        self.position = if self.position.batch + 1 >= self.per_epoch {
            StreamPosition { epoch: self.position.epoch + 1, batch: 0 }
        } else {
            StreamPosition { epoch: self.position.epoch, batch: self.position.batch + 1 }
        };
        Ok(b)
    }

    fn epoch(&self) -> usize {
        self.position.epoch
    }

    fn batches_per_epoch(&self) -> Option<usize> {
        Some(self.per_epoch)
    }

    fn position(&self) -> serde_json::Value {
        serde_json::to_value(self.position).expect("position serialises")
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<()> {
        let p: StreamPosition = serde_json::from_value(position.clone())
            .map_err(|e| Error::Data(format!("bad stream position {position}: {e}")))?;
        if p != self.position {
            return Err(Error::Data(format!(
                "the stream is at {:?}; open it at {p:?} (StreamConfig::start) to resume",
                self.position
            )));
        }
        Ok(())
    }
}

/// Picks the teacher to train from: `wanted`, or the only teacher in the cache.
pub fn resolve_teacher(
    cache: &TeacherCache,
    wanted: Option<TeacherFingerprint>,
) -> Result<TeacherFingerprint> {
    let teachers = cache.teachers().map_err(cache_err)?;
    match wanted {
        Some(fp) => {
            if teachers.iter().any(|t| t.fingerprint == fp) {
                Ok(fp)
            } else {
                Err(Error::config("data.teacher", format!("teacher {fp} is not in cache `{}`", cache.uri())))
            }
        }
        None => match teachers.as_slice() {
            [one] => Ok(one.fingerprint.clone()),
            [] => {
                Err(Error::config("data.cache", format!("cache `{}` holds no teacher outputs", cache.uri())))
            }
            many => Err(Error::config(
                "data.teacher",
                format!(
                    "cache `{}` holds {} teachers ({}); choose one",
                    cache.uri(),
                    many.len(),
                    many.iter()
                        .map(|t| format!("{} {}", t.fingerprint, t.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        },
    }
}

fn split_of(key: &str, s: &str) -> Result<Split> {
    Split::parse(s).ok_or_else(|| Error::config(key, format!("`{s}` is not one of train, val, test")))
}

fn views(mode: ViewsMode) -> ViewSelection {
    match mode {
        ViewsMode::Plain => ViewSelection::PlainOnly,
        ViewsMode::Random => ViewSelection::Random,
        ViewsMode::All => ViewSelection::All,
    }
}

/// Called with each progress update of a run.
pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// Options of [`run`] besides the configuration.
pub struct RunOptions {
    pub run_dir: PathBuf,
    /// Continue from the last checkpoint in `run_dir`.
    pub resume: bool,
    pub device: Device,
    /// Stop after this many steps (the run can be resumed later).
    pub stop_after: Option<u64>,
    pub progress: Option<ProgressFn>,
    pub cancel: Option<Arc<AtomicBool>>,
    /// Draw `plots/*.png` at the end.
    pub plots: bool,
}

impl RunOptions {
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        Self {
            run_dir: run_dir.into(),
            resume: false,
            device: Device::Cpu,
            stop_after: None,
            progress: None,
            cancel: None,
            plots: true,
        }
    }
}

/// `report.json` of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub run_dir: String,
    pub student: String,
    pub parameters: u64,
    pub faces: String,
    pub cache: Option<String>,
    pub cache_version: Option<u64>,
    pub teacher: Option<String>,
    pub train: TrainSummary,
    /// Evaluation of the final student on `data.eval_split` (absent when the run stopped early).
    pub eval: Option<EvalReport>,
}

/// Opened inputs of a run.
struct Inputs {
    faces: FaceStore,
    cache: Option<(TeacherCache, TeacherFingerprint)>,
}

async fn open_inputs(cfg: &TrainConfig) -> Result<Inputs> {
    let faces_uri = cfg
        .data
        .faces
        .as_deref()
        .ok_or_else(|| Error::config("data.faces", "no faces dataset given (--faces)"))?;
    let faces = FaceStore::open(faces_uri).await.map_err(cache_err)?;
    let cache = match cfg.data.cache.as_deref() {
        Some(uri) => {
            let c = TeacherCache::open(uri).await.map_err(cache_err)?;
            let fp = resolve_teacher(&c, cfg.teacher_fingerprint()?)?;
            Some((c, fp))
        }
        None => None,
    };
    Ok(Inputs { faces, cache })
}

/// Runs a whole training run (see the module docs) and returns its report.
pub async fn run(cfg: &TrainConfig, mut opts: RunOptions) -> Result<RunReport> {
    cfg.validate()?;
    let inputs = open_inputs(cfg).await?;
    let mut spec = StudentSpec::parse(&cfg.student.spec, cfg.student.num_classes)
        .map_err(|e| Error::config("student.spec", e.to_string()))?;
    let start = if opts.resume {
        match checkpoint::latest(&opts.run_dir) {
            Some(d) => {
                let p = d.join("state.json");
                let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                let st: checkpoint::TrainState =
                    serde_json::from_str(&text).map_err(|e| Error::format(&p, e.to_string()))?;
                serde_json::from_value(st.data_position).map_err(|e| Error::format(&p, e.to_string()))?
            }
            None => StreamPosition::default(),
        }
    } else {
        StreamPosition::default()
    };
    let scfg = StreamConfig {
        split: Some(split_of("data.train_split", &cfg.data.train_split)?),
        batch_size: cfg.data.batch_size,
        shuffle_buffer: cfg.data.shuffle_buffer,
        seed: cfg.seed,
        epochs: None,
        rank: 0,
        world: 1,
        views: views(cfg.data.views),
        workers: cfg.data.workers.max(1),
        preprocess: spec.preprocess(),
        drop_last: true,
        start,
    };
    let stream = open_stream(&inputs.faces, inputs.cache.as_ref().map(|(c, f)| (c, f)), scfg)
        .await
        .map_err(cache_err)?;
    let mut source = StreamSource::new(stream, start);
    if cfg.loss.feature != crate::config::FeatureKind::None && inputs.cache.is_some() {
        let dim = source.peek()?.teacher_embedding.as_ref().map(|t| t.dim(1)).transpose()?;
        match dim {
            Some(d) => spec.embed_proj = Some(d),
            None => {
                return Err(Error::config("loss.feature", "the cached teacher has no embedding to match"));
            }
        }
    }

    let device = opts.device.clone();
    let varmap = VarMap::new();
    let model = build_student(&spec, seeded_var_builder(&varmap, cfg.seed, DType::F32, &device))
        .map_err(|e| Error::Tensor { op: format!("build student {}", spec.name()), source: e })?;
    let parameters = parameter_count(&varmap);
    tracing::info!(student = %spec.name(), parameters, "student built");

    // The loop is synchronous and CPU-bound: give it a blocking thread.
    let run_dir = opts.run_dir.clone();
    let cfg2 = cfg.clone();
    let (resume, stop_after, cancel) = (opts.resume, opts.stop_after, opts.cancel.clone());
    let mut progress = opts.progress.take();
    let vm2 = varmap.clone();
    let spec2 = spec.clone();
    let (summary, model) =
        tokio::task::spawn_blocking(move || -> Result<(TrainSummary, Box<dyn Student>)> {
            let student = StudentModel(model);
            let mut report_progress = |p: &Progress| {
                if let Some(f) = progress.as_mut() {
                    f(p)
                }
            };
            let summary = train(TrainRun {
                config: &cfg2,
                run_dir: &run_dir,
                model: &student,
                vars: named_vars(&vm2),
                source: &mut source,
                resume,
                stop_after,
                progress: Some(&mut report_progress),
                cancel,
            })?;
            save_student(&run_dir, &spec2, &vm2).map_err(|e| Error::format(&run_dir, e.to_string()))?;
            Ok((summary, student.0))
        })
        .await
        .map_err(|e| Error::Data(format!("training thread: {e}")))??;

    let finished = summary.steps == summary.total_steps;
    let eval = if finished {
        let predictor =
            StudentPredictor { name: format!("student:{}", spec.name()), spec: spec.clone(), model };
        let split = split_of("data.eval_split", &cfg.data.eval_split)?;
        let eopts = EvalOptions { split: cfg.data.eval_split.clone(), ..Default::default() };
        let cache = inputs.cache.as_ref().map(|(c, f)| (c, f));
        let (report, samples) =
            evaluate(&predictor, &inputs.faces, cache, split, cfg.data.batch_size, &eopts).await?;
        let epath = opts.run_dir.join("eval.json");
        std::fs::write(&epath, serde_json::to_string_pretty(&report).expect("report serialises"))
            .map_err(|e| Error::io(&epath, e))?;
        if opts.plots {
            write_plots(&opts.run_dir, Some((&report, &samples)))?;
        }
        Some(report)
    } else {
        None
    };
    let report = RunReport {
        run_dir: opts.run_dir.display().to_string(),
        student: spec.name(),
        parameters,
        faces: inputs.faces.uri().to_string(),
        cache: inputs.cache.as_ref().map(|(c, _)| c.uri().to_string()),
        cache_version: inputs.cache.as_ref().map(|(c, _)| c.version()),
        teacher: inputs.cache.as_ref().map(|(_, f)| f.to_string()),
        train: summary,
        eval,
    };
    let rpath = opts.run_dir.join("report.json");
    std::fs::write(&rpath, serde_json::to_string_pretty(&report).expect("report serialises"))
        .map_err(|e| Error::io(&rpath, e))?;
    Ok(report)
}

/// Draws `plots/training_curves.png` and, with an evaluation, `plots/confusion.png` and
/// `plots/valence_arousal.png`.
pub fn write_plots(run_dir: &Path, eval: Option<(&EvalReport, &EvalSamples)>) -> Result<()> {
    let dir = run_dir.join("plots");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let lines = crate::train::read_metrics(run_dir)?;
    plots::training_curves(&lines, &dir.join("training_curves.png"))?;
    if let Some((r, s)) = eval {
        plots::confusion_heatmap(&r.expression.confusion, &r.expression.classes, &dir.join("confusion.png"))?;
        if !s.valence.is_empty() {
            plots::va_scatter(&s.valence, &s.arousal, &dir.join("valence_arousal.png"))?;
        }
    }
    Ok(())
}

/// Evaluates `model` on `split` of `faces`; with a cache, also against the cached teacher.
///
/// Faces are preprocessed as the model asks; evaluation reads the plain view of every face once,
/// in storage order.
pub async fn evaluate(
    model: &dyn Predictor,
    faces: &FaceStore,
    cache: Option<(&TeacherCache, &TeacherFingerprint)>,
    split: Split,
    batch_size: usize,
    opts: &EvalOptions,
) -> Result<(EvalReport, EvalSamples)> {
    let scfg = StreamConfig {
        split: Some(split),
        batch_size: batch_size.max(1),
        shuffle_buffer: 0,
        seed: 0,
        epochs: Some(1),
        rank: 0,
        world: 1,
        views: ViewSelection::PlainOnly,
        workers: 2,
        preprocess: model.preprocess(),
        drop_last: false,
        start: StreamPosition::default(),
    };
    let stream = open_stream(faces, cache, scfg).await.map_err(cache_err)?;
    let mut opts = opts.clone();
    if opts.split.is_empty() {
        opts.split = split.as_str().to_string();
    }
    if opts.classes.is_empty() && model.num_classes() == 8 {
        opts.classes = ClassSet::emonet8().names().to_vec();
    }
    let batches = stream.map(|b| b.map_err(cache_err));
    let work = || evaluate_batches(model, batches, &opts);
    // Scoring is CPU-bound: on a multi-threaded runtime, let the other tasks move off this thread.
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
