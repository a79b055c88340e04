//! `distillery`: the one binary. Parses arguments, sets up logging, and hands each subcommand to
//! the library crate that implements it. No logic of its own lives here.
//!
//! Output contract: results go to stdout (`--format json` where a script reads them), logs and
//! progress to stderr. Exit codes: 0 success, 1 failure, 2 usage error (clap), 3 nothing usable
//! (e.g. an ingest where every row was rejected), 4 a labelling job that ended with poisoned shards.

mod cmd;
mod output;
mod progress;

use std::process::ExitCode;

/// Training and inference allocate and free many large tensors per step; mimalloc with purging
/// off keeps and reuses their pages (see `distillery_models::alloc`).
#[global_allocator]
static GLOBAL: distillery_models::alloc::Allocator = distillery_models::alloc::Allocator;

use clap::{Parser, Subcommand};

/// Distil small, fast facial-expression models from a big teacher.
#[derive(Parser, Debug)]
#[command(name = "distillery", version, about, long_about = None, propagate_version = true)]
#[command(
    after_help = "Start with `distillery quickstart --quick`; every subcommand has --help with examples.\n\nExit codes: 0 success, 1 failure, 2 usage error, 3 nothing usable in the input, 4 a labelling job\nfinished with poisoned shards."
)]
struct Cli {
    /// Log filter for stderr (tracing EnvFilter syntax, e.g. `info`, `distillery_trainer=debug`).
    #[arg(long, global = true, env = "DISTILLERY_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The whole pipeline on synthetic faces, embedded: synth, teacher, labelling, distillation, report.
    Quickstart(cmd::quickstart::QuickstartArgs),
    /// Generate labelled synthetic faces into a faces dataset.
    Synth(cmd::faces::SynthArgs),
    /// Bring faces in: AffectNet CSV, class folders, or a manifest.
    Ingest(cmd::faces::IngestArgs),
    /// Look at a faces dataset.
    Faces(cmd::faces::FacesArgs),
    /// Label a faces dataset with a teacher into a Lance cache (via a coordinator or embedded).
    Label(cmd::label::LabelArgs),
    /// Inspect and maintain teacher caches.
    Cache(cmd::cache::CacheArgs),
    /// Distil a student from a teacher cache (or train one without a teacher).
    Train(cmd::train::TrainArgs),
    /// Evaluate a student run or a teacher on a split: accuracy, macro-F1, CCC, agreement.
    Eval(cmd::eval::EvalArgs),
    /// List every model with parameters, MACs and input shape.
    Models(cmd::models::ModelsArgs),
    /// Run a teacher or a trained student on images or a preprocessed array.
    Predict(cmd::predict::PredictArgs),
    /// Run a service: coordinator, teacher worker or trainer.
    Serve(ServeArgs),
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions(cmd::completions::CompletionsArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[command(subcommand)]
    service: Service,
}

#[derive(Subcommand, Debug)]
enum Service {
    /// The coordinator: splits labelling jobs into shards, leases them, commits results once.
    #[command(
        after_help = "Example: distillery serve coordinator --listen 0.0.0.0:50051 --state-dir /var/lib/distillery"
    )]
    Coordinator(cmd::serve_coordinator::ServeCoordinatorArgs),
    /// A teacher worker: leases shards from a coordinator, labels them, serves its teacher.
    #[command(
        after_help = "Example: distillery serve teacher --coordinator http://coordinator:50051 --teacher configs/teachers/faceapi.toml"
    )]
    Teacher(cmd::serve_teacher::ServeTeacherArgs),
    /// The trainer: queues distillation runs submitted with `distillery train --trainer`, trains them.
    #[command(
        after_help = "Example: distillery serve trainer --listen 0.0.0.0:50053 --state-dir /var/lib/distillery/trainer"
    )]
    Trainer(cmd::serve_trainer::ServeTrainerArgs),
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`, before any other thread starts.
    unsafe { distillery_models::process::prepare() };
    let cli = Cli::parse();
    output::init_logging(&cli.log);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return output::fail(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Quickstart(a) => cmd::quickstart::run(a).await,
            Command::Synth(a) => cmd::faces::synth(a).await,
            Command::Ingest(a) => cmd::faces::ingest(a).await,
            Command::Faces(a) => cmd::faces::faces(a).await,
            Command::Train(a) => cmd::train::run(a).await.map(|()| ExitCode::SUCCESS),
            Command::Eval(a) => cmd::eval::run(a).await.map(|()| ExitCode::SUCCESS),
            Command::Models(a) => cmd::models::run(a).await,
            Command::Label(a) => cmd::label::run(a).await,
            Command::Cache(a) => cmd::cache::run(a).await,
            Command::Predict(a) => cmd::predict::run(a).await,
            Command::Serve(ServeArgs { service: Service::Coordinator(a) }) => {
                cmd::serve_coordinator::run(a).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Serve(ServeArgs { service: Service::Teacher(a) }) => {
                cmd::serve_teacher::run(a).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Serve(ServeArgs { service: Service::Trainer(a) }) => {
                cmd::serve_trainer::run(a).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Completions(a) => cmd::completions::run::<Cli>(a),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => output::fail(e),
    }
}
