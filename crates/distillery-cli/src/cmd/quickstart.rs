//! `distillery quickstart`: the whole system end to end on synthetic faces, embedded.

use std::path::PathBuf;
use std::process::ExitCode;

use distillery_local::{QuickstartOptions, quickstart};

use crate::output::{Format, print_json, print_line};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Synthesises faces, trains a teacher, labels the faces with it through a coordinator and
two teacher workers (real gRPC on loopback) into a Lance cache, distils a student and trains a
baseline, evaluates all three on the held-out split and writes DIR/report.md with plots.

Examples:
  distillery quickstart                 # about 5 minutes on 2 cores (under 10)
  distillery quickstart --quick --dir /tmp/qs"
)]
pub struct QuickstartArgs {
    /// Output directory (created if missing).
    #[arg(long, default_value = "quickstart")]
    dir: PathBuf,
    /// Small variant: under two minutes on two cores.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Teacher workers to start.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

pub async fn run(args: QuickstartArgs) -> anyhow::Result<ExitCode> {
    let opts = QuickstartOptions {
        dir: args.dir.clone(),
        quick: args.quick,
        seed: args.seed,
        workers: args.workers,
    };
    let mut n = 0;
    let summary = quickstart(&opts, |stage| {
        n += 1;
        tracing::info!("[{n}/7] {stage}");
    })
    .await?;
    match args.format {
        Format::Json | Format::Jsonl => print_json(&summary)?,
        Format::Text => {
            print_line(format!(
                "{:<18} {:<10} {:>9} {:>9} {:>8} {:>8} {:>8}",
                "model", "spec", "accuracy", "macro-F1", "V-CCC", "A-CCC", "img/s"
            ))?;
            for r in &summary.rows {
                print_line(format!(
                    "{:<18} {:<10} {:>9.3} {:>9.3} {:>8.3} {:>8.3} {:>8.0}",
                    r.name,
                    r.model,
                    r.accuracy,
                    r.macro_f1,
                    r.valence_ccc,
                    r.arousal_ccc,
                    r.images_per_second
                ))?;
            }
            print_line(format!("report: {} ({:.0} s)", summary.report, summary.seconds))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
