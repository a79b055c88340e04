//! `distillery models`: every model with parameters, MACs and input shape, measured from the layer
//! graph by a forward pass of one image.

use std::path::PathBuf;
use std::process::ExitCode;

use distillery_models::emonet::EmoNetVariant;
use distillery_models::zoo;

use crate::output::{Format, print_json, print_line};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  distillery models
  distillery models --format json --student mobilenetv2:0.75@160 --onnx configs/teachers/faceapi.toml")]
pub struct ModelsArgs {
    /// Extra student specs to list (e.g. mobilenetv2:0.75@160, resnet18@112, tiny@48).
    #[arg(long)]
    student: Vec<String>,
    /// ONNX teacher TOML files to list (default: every file in configs/teachers/ that loads).
    #[arg(long)]
    onnx: Vec<PathBuf>,
    /// Expression classes of the students' heads.
    #[arg(long, default_value_t = 8)]
    classes: usize,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

pub async fn run(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut rows = vec![zoo::emonet_cost(EmoNetVariant::Eight)?, zoo::emonet_cost(EmoNetVariant::Five)?];
        let onnx = if args.onnx.is_empty() { default_onnx_configs() } else { args.onnx.clone() };
        for path in onnx {
            match zoo::onnx_cost(&path) {
                Ok(c) => rows.push(c),
                Err(e) if args.onnx.is_empty() => tracing::warn!("skipping {}: {e}", path.display()),
                Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
            }
        }
        for s in zoo::DEFAULT_STUDENTS.iter().map(|s| s.to_string()).chain(args.student.clone()) {
            let cost = zoo::student_cost(&s, args.classes)?;
            // `--student mobilenetv2@224` names a default model again: list it once.
            if !rows.iter().any(|r| r.name == cost.name) {
                rows.push(cost);
            }
        }
        Ok(rows)
    })
    .await??;
    match args.format {
        Format::Json | Format::Jsonl => print_json(&rows)?,
        Format::Text => {
            print_line(format!(
                "{:<28} {:<13} {:>12} {:>10}  input",
                "model", "kind", "parameters", "GMACs"
            ))?;
            for r in &rows {
                print_line(format!(
                    "{:<28} {:<13} {:>12} {:>10.3}  {}x{}x{}",
                    r.name,
                    r.kind,
                    r.parameters,
                    r.macs as f64 / 1e9,
                    r.input_shape[0],
                    r.input_shape[1],
                    r.input_shape[2]
                ))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `configs/teachers/*.toml` relative to the working directory.
fn default_onnx_configs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("configs/teachers")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
