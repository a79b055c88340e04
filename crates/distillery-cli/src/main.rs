//! `distillery`: the one binary. Parses arguments, sets up logging, and hands each subcommand to
//! the library crate that implements it. No logic of its own lives here.
//!
//! Output contract: results go to stdout (`--format json` where a script reads them), logs and
//! progress to stderr. Exit codes: 0 success, 1 failure, 2 usage error (clap), 3 nothing usable
//! (e.g. an ingest where every row was rejected).

mod cmd;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Distil small, fast facial-expression models from a big teacher.
#[derive(Parser, Debug)]
#[command(name = "distillery", version, about, long_about = None, propagate_version = true)]
#[command(after_help = "Start with `distillery quickstart --quick`; every subcommand has --help with examples.")]
struct Cli {
    /// Log filter for stderr (tracing EnvFilter syntax, e.g. `info`, `distillery_trainer=debug`).
    #[arg(long, global = true, env = "DISTILLERY_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every model with parameters, MACs and input shape.
    Models(cmd::models::ModelsArgs),
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions(cmd::completions::CompletionsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    output::init_logging(&cli.log);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return output::fail(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Models(a) => cmd::models::run(a).await,
            Command::Completions(a) => cmd::completions::run::<Cli>(a),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => output::fail(e),
    }
}
