//! Logging set-up, result printing and error reporting shared by every subcommand.

use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;

/// Exit code when the inputs held nothing usable.
pub const EXIT_NOTHING_USABLE: u8 = 3;

/// Logs to stderr, never stdout (stdout carries results).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Output format of commands whose result a script may read.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Aligned text for people.
    #[default]
    Text,
    /// One JSON document.
    Json,
    /// One JSON object per line.
    Jsonl,
}

/// Prints one JSON value (pretty) followed by a newline.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Prints one compact JSON object per line.
pub fn print_jsonl<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// `println!` for results: formats a line to stdout and returns early on a write error (a closed pipe).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::print_line(format_args!($($arg)*))?
    };
}
pub(crate) use outln;

/// Prints a line of text to stdout.
pub fn print_line(line: impl std::fmt::Display) -> anyhow::Result<()> {
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}

/// Reports `err` (with its causes) on stderr and returns the failure exit code.
#[allow(clippy::print_stderr)]
pub fn fail(err: anyhow::Error) -> ExitCode {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::FAILURE
}
