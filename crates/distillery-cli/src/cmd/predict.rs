//! `distillery predict`: run a teacher (or a trained student) on images or a preprocessed array.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use distillery_teacher::predict::{predict_images, predict_tensor};
use distillery_teacher::{TeacherSpec, load_teacher, parse_device};

use crate::output::{Format, print_json, print_jsonl, print_line};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  distillery predict --teacher configs/teachers/faceapi.toml --image face.jpg --format jsonl
  distillery predict --teacher emonet-8 --weights emonet_8.pth --image a.png --image b.png
  distillery predict --model runs/student --npy inputs.npy --format jsonl")]
pub struct PredictArgs {
    /// Teacher: emonet-8, emonet-5, an ONNX teacher .toml, a student run dir, or tiny[:SEED[:SIDE]].
    #[arg(long, value_name = "SPEC", required_unless_present = "model", conflicts_with = "model")]
    teacher: Option<String>,
    /// Weights file for EmoNet (.pth or .safetensors).
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// A trained student's run directory.
    #[arg(long, value_name = "RUN_DIR")]
    model: Option<PathBuf>,
    /// Image file(s); each is taken as the face crop and gets the model's own preprocessing.
    #[arg(long, value_name = "PATH", required_unless_present = "npy", conflicts_with = "npy")]
    image: Vec<PathBuf>,
    /// Already preprocessed float32 [N,C,H,W] array (no preprocessing applied).
    #[arg(long, value_name = "PATH")]
    npy: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    format: Format,
}

pub async fn run(args: PredictArgs) -> anyhow::Result<ExitCode> {
    let spec = match (&args.model, &args.teacher) {
        (Some(dir), _) => TeacherSpec::Student(dir.clone()),
        (None, Some(t)) => {
            let mut spec = TeacherSpec::parse(t)?;
            if let Some(w) = &args.weights {
                match &mut spec {
                    TeacherSpec::Emonet { weights, .. } => *weights = Some(w.clone()),
                    _ => bail!("--weights applies to emonet-8/emonet-5 only (got teacher `{t}`)"),
                }
            }
            spec
        }
        (None, None) => bail!("give --teacher SPEC or --model RUN_DIR"),
    };
    let device = parse_device(&args.device)?;
    let teacher = tokio::task::spawn_blocking(move || load_teacher(&spec, &device)).await??;
    let predictions = match &args.npy {
        Some(npy) => {
            let x =
                candle_core::Tensor::read_npy(npy).with_context(|| format!("reading {}", npy.display()))?;
            if x.rank() != 4 {
                bail!("{}: expected a [N,C,H,W] array, got shape {:?}", npy.display(), x.dims());
            }
            let names: Vec<String> = (0..x.dim(0)?).map(|i| format!("npy[{i}]")).collect();
            let t = teacher.clone();
            tokio::task::spawn_blocking(move || predict_tensor(t.as_ref(), &x, &names)).await??
        }
        None => {
            let mut images = Vec::with_capacity(args.image.len());
            for p in &args.image {
                let bytes = std::fs::read(p).with_context(|| format!("reading image {}", p.display()))?;
                images.push((p.display().to_string(), bytes));
            }
            let t = teacher.clone();
            tokio::task::spawn_blocking(move || predict_images(t.as_ref(), &images)).await??
        }
    };
    match args.format {
        Format::Jsonl => predictions.iter().try_for_each(print_jsonl)?,
        Format::Json => print_json(&predictions)?,
        Format::Text => {
            for p in &predictions {
                let va = match (p.valence, p.arousal) {
                    (Some(v), Some(a)) => format!("  valence {v:+.3} arousal {a:+.3}"),
                    _ => String::new(),
                };
                let best = p.probs.iter().cloned().fold(0f32, f32::max);
                print_line(format!("{}: {} ({:.1} %){va}", p.input, p.top, best * 100.0))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
