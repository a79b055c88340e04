//! `distillery eval`: scores a trained student (a run directory) or a teacher on a split of a faces
//! dataset — expression accuracy/F1/confusion, valence/arousal RMSE/PCC/CCC/SAGR — and, given a
//! teacher cache, agreement with the cached teacher.

use crate::output::outln;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use distillery_cache::{FaceStore, TeacherCache};
use distillery_core::TeacherFingerprint;
use distillery_data::Split;
use distillery_teacher::load::{TeacherSpec, load_teacher, parse_device};
use distillery_trainer::eval::{EvalOptions, Predictor, TeacherPredictor};
use distillery_trainer::run::{StudentPredictor, evaluate, resolve_teacher};

/// Output format of `eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalFormat {
    /// One JSON object.
    Json,
    /// A short human-readable summary.
    Text,
}

/// Options of `eval`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("model_source").required(true).args(["model", "teacher"])))]
pub struct EvalArgs {
    /// Faces dataset URI.
    #[arg(long)]
    pub faces: String,
    /// Teacher cache URI: also measure agreement with the cached teacher.
    #[arg(long)]
    pub cache: Option<String>,
    /// Fingerprint of the cached teacher to compare with (default: the only one in the cache).
    #[arg(long, requires = "cache")]
    pub cache_teacher: Option<String>,
    /// A trained student's run directory.
    #[arg(long, value_name = "RUN_DIR")]
    pub model: Option<PathBuf>,
    /// A teacher spec (as for the teacher worker), e.g. `emonet8:weights.pt` or an ONNX TOML.
    #[arg(long, value_name = "SPEC")]
    pub teacher: Option<String>,
    /// Split to evaluate: train, val or test.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Average valence/arousal over each face and its mirror image.
    #[arg(long)]
    pub flip: bool,
    #[arg(long, value_enum, default_value = "json")]
    pub format: EvalFormat,
    /// Faces per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write the confusion matrix and valence/arousal scatter PNGs into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
}

/// Runs `distillery eval`.
pub async fn run(args: EvalArgs) -> anyhow::Result<()> {
    let split = Split::parse(&args.split)
        .with_context(|| format!("--split `{}` is not one of train, val, test", args.split))?;
    let device = parse_device(&args.device)?;
    let model: Box<dyn Predictor> = match (&args.model, &args.teacher) {
        (Some(dir), _) => Box::new(StudentPredictor::load(dir, &device)?),
        (None, Some(spec)) => {
            let spec = TeacherSpec::parse(spec)?;
            let teacher = load_teacher(&spec, &device)?;
            Box::new(TeacherPredictor(Arc::clone(&teacher)))
        }
        (None, None) => anyhow::bail!("give --model RUN_DIR or --teacher SPEC"),
    };
    let faces =
        FaceStore::open(&args.faces).await.with_context(|| format!("opening faces {}", args.faces))?;
    let cache = match &args.cache {
        Some(uri) => {
            let c = TeacherCache::open(uri).await.with_context(|| format!("opening cache {uri}"))?;
            let wanted = args
                .cache_teacher
                .as_deref()
                .map(TeacherFingerprint::parse)
                .transpose()
                .context("--cache-teacher")?;
            let fp = resolve_teacher(&c, wanted)?;
            Some((c, fp))
        }
        None => None,
    };
    let opts = EvalOptions { flip: args.flip, split: split.as_str().to_string(), ..Default::default() };
    let (report, samples) =
        evaluate(model.as_ref(), &faces, cache.as_ref().map(|(c, f)| (c, f)), split, args.batch_size, &opts)
            .await?;
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        distillery_trainer::plots::confusion_heatmap(
            &report.expression.confusion,
            &report.expression.classes,
            &dir.join("confusion.png"),
        )?;
        if !samples.valence.is_empty() {
            distillery_trainer::plots::va_scatter(
                &samples.valence,
                &samples.arousal,
                &dir.join("valence_arousal.png"),
            )?;
        }
    }
    match args.format {
        EvalFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
        EvalFormat::Text => {
            outln!("{} on {} ({} faces)", report.model, report.split, report.n);
            let e = &report.expression;
            outln!(
                "  expression: accuracy {:.4}  macro-F1 {:.4}  ({} labelled)",
                e.accuracy,
                e.macro_f1,
                e.n
            );
            if let Some(a) = &report.affect {
                for (name, m) in [("valence", &a.valence), ("arousal", &a.arousal)] {
                    outln!(
                        "  {name}: RMSE {:.4}  PCC {:.4}  CCC {:.4}  SAGR {:.4}  ({} labelled)",
                        m.rmse,
                        m.pcc,
                        m.ccc,
                        m.sagr,
                        m.n
                    );
                }
            }
            if let Some(t) = &report.teacher {
                outln!("  vs teacher: top-1 agreement {:.4}  mean KL {:.4}", t.top1_agreement, t.mean_kl);
            }
        }
    }
    Ok(())
}
