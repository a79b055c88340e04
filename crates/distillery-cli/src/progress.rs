//! Progress display: a bar on a terminal, plain periodic lines otherwise (logs, CI).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// One long operation's progress on stderr.
pub struct Progress {
    what: &'static str,
    bar: Option<ProgressBar>,
    last_line: Mutex<Option<Instant>>,
}

impl Progress {
    pub fn new(what: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(what);
            bar
        });
        Self { what, bar, last_line: Mutex::new(None) }
    }

    /// Reports `done` of `total` with a short message.
    pub fn update(&self, done: u64, total: u64, msg: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(msg.to_owned());
            }
            None => {
                let mut last = self.last_line.lock().expect("progress lock");
                let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) || done >= total;
                if due {
                    *last = Some(Instant::now());
                    tracing::info!("{}: {done}/{total} {msg}", self.what);
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
