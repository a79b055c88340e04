//! `distillery train`: trains (distils) a student from a faces dataset and a teacher cache, locally
//! or by submitting the run to a trainer service.
//!
//! The configuration is `--config` (or the defaults), then the shortcut flags (`--faces`, `--cache`,
//! `--student`), then every `--set key.path=value` in order; an unknown key is an error naming it.

use crate::output::outln;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use distillery_proto::transport::Target;
use distillery_proto::v1::{RunEventKind, RunState, SubmitRunRequest, WatchRunRequest};
use distillery_trainer::TrainConfig;
use distillery_trainer::run::{RunOptions, run as run_training};
use distillery_trainer::train::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Options of `train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Faces dataset URI (sets `data.faces`).
    #[arg(long)]
    pub faces: Option<String>,
    /// Teacher cache URI (sets `data.cache`); without one the run is plain supervised training.
    #[arg(long)]
    pub cache: Option<String>,
    /// Student spec, e.g. `mobilenetv2:0.5@112`, `resnet18`, `tiny@64` (sets `student.spec`).
    #[arg(long)]
    pub student: Option<String>,
    /// Run directory (checkpoints, metrics, final model, report). Required unless --trainer.
    #[arg(long, value_name = "RUN_DIR")]
    pub out: Option<PathBuf>,
    /// Training configuration TOML (see configs/train/).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one configuration key, e.g. `--set optim.lr=3e-4`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the last checkpoint in the run directory.
    #[arg(long)]
    pub resume: bool,
    /// Submit the run to this trainer service (e.g. http://host:50053, or https:// with --tls-ca)
    /// instead of training here.
    #[arg(long, value_name = "URL")]
    pub trainer: Option<String>,
    /// PEM certificate of the CA that signed the trainer's certificate (for an https:// --trainer).
    #[arg(long, env = "DISTILLERY_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// Bearer token sent to the trainer service (with --trainer).
    #[arg(long, env = "DISTILLERY_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

impl TrainArgs {
    /// `--set` assignments implied by the shortcut flags, followed by the explicit ones.
    pub fn overrides(&self) -> Vec<String> {
        let mut o = Vec::new();
        if let Some(f) = &self.faces {
            o.push(format!("data.faces={f}"));
        }
        if let Some(c) = &self.cache {
            o.push(format!("data.cache={c}"));
        }
        if let Some(s) = &self.student {
            o.push(format!("student.spec={s}"));
        }
        o.extend(self.set.iter().cloned());
        o
    }
}

/// Runs `distillery train`.
pub async fn run(args: TrainArgs) -> anyhow::Result<()> {
    let overrides = args.overrides();
    let cfg = TrainConfig::load(args.config.as_deref(), &overrides)?;
    if let Some(url) = &args.trainer {
        let trainer = Target::new(url.as_str()).with_tls_ca(args.tls_ca.clone());
        return submit(&trainer, args.auth_token.as_deref(), &cfg).await;
    }
    let out = args.out.clone().context("--out RUN_DIR is required when training locally")?;
    let mut opts = RunOptions::new(&out);
    opts.resume = args.resume;
    let bar = if args.no_progress {
        None
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps  epoch {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("progress template"),
        );
        Some(b)
    };
    if let Some(b) = bar.clone() {
        opts.progress = Some(Box::new(move |p: &Progress| {
            b.set_length(p.total_steps);
            b.set_position(p.step);
            b.set_message(format!("{}  loss {:.4}  lr {:.2e}", p.epoch, p.losses.total, p.lr));
        }));
    }
    let report =
        run_training(&cfg, opts).await.with_context(|| format!("training into {}", out.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    outln!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Submits the run to a trainer service and follows it until it ends.
async fn submit(trainer: &Target, token: Option<&str>, cfg: &TrainConfig) -> anyhow::Result<()> {
    let url = &trainer.url;
    let mut client = distillery_trainer::server::connect(trainer, token)
        .await
        .with_context(|| format!("connecting to trainer {url}"))?;
    let run = client
        .submit_run(SubmitRunRequest { config_toml: cfg.to_toml(), overrides: vec![] })
        .await
        .with_context(|| format!("SubmitRun on {url}"))?
        .into_inner();
    outln!("submitted run {} (run dir {} on the trainer)", run.run_id, run.run_dir);
    let mut events = client
        .watch_run(WatchRunRequest { run_id: run.run_id.clone() })
        .await
        .with_context(|| format!("WatchRun {}", run.run_id))?
        .into_inner();
    let mut last_state = run.state;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(3600), events.message()).await;
        let Ok(msg) = next else { anyhow::bail!("no news of run {} for an hour", run.run_id) };
        let Some(ev) = msg.with_context(|| format!("watching run {}", run.run_id))? else { break };
        if ev.kind == RunEventKind::Metrics as i32 {
            let m: Vec<String> = ev.metrics.iter().map(|m| format!("{}={:.4}", m.name, m.value)).collect();
            outln!("step {} epoch {}: {}", ev.step, ev.epoch, m.join(" "));
        }
        if let Some(r) = ev.run {
            if r.state != last_state {
                outln!(
                    "run {}: {:?}",
                    r.run_id,
                    RunState::try_from(r.state).unwrap_or(RunState::Unspecified)
                );
                last_state = r.state;
            }
            if r.state == RunState::Failed as i32 {
                anyhow::bail!("run {} failed: {}", r.run_id, r.error);
            }
        }
    }
    Ok(())
}
