//! `distillery label`: run a teacher over a faces dataset into a teacher cache, through a
//! coordinator (`--coordinator URL`) or an embedded one with K workers (`--local --workers K`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use distillery_local::{JobProgress, LabelRequest, LocalCluster, LocalClusterConfig, submit_and_wait};
use distillery_proto::transport::Target;
use distillery_teacher::TeacherSpec;

use crate::output::{Format, print_json, print_line};
use crate::progress::Progress;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  distillery label --faces data/faces.lance --cache data/cache.lance \\
      --teacher configs/teachers/faceapi.toml --local --workers 2
  distillery label --faces s3://bucket/faces.lance --cache s3://bucket/cache.lance \\
      --teacher emonet-8 --weights /models/emonet_8.pth --views 4 --coordinator http://coordinator:50051
  distillery label ... --coordinator https://coordinator:50051 --tls-ca /etc/distillery/tls/ca.pem")]
pub struct LabelArgs {
    /// Faces dataset URI (local path or s3://).
    #[arg(long)]
    faces: String,
    /// Teacher cache URI; created on the first commit.
    #[arg(long)]
    cache: String,
    /// emonet-8, emonet-5, an ONNX teacher .toml, or a student run directory.
    #[arg(long, value_name = "SPEC")]
    teacher: String,
    /// EmoNet weights (.pth or .safetensors), as seen by the workers.
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// Augmented views per face besides the plain one.
    #[arg(long, default_value_t = 0)]
    views: u32,
    /// Seed of the augmented views.
    #[arg(long, default_value_t = 0)]
    view_seed: u64,
    /// Faces per shard (the unit leased to a worker).
    #[arg(long, default_value_t = 256)]
    shard_size: u64,
    /// Coordinator URL to submit to: http://HOST:PORT, or https://HOST:PORT with --tls-ca.
    #[arg(long, env = "DISTILLERY_COORDINATOR", conflicts_with = "local", required_unless_present = "local")]
    coordinator: Option<String>,
    /// PEM certificate of the CA that signed the coordinator's certificate (for an https://
    /// --coordinator; not used with --local).
    #[arg(long, env = "DISTILLERY_TLS_CA", value_name = "PATH")]
    tls_ca: Option<PathBuf>,
    /// Run a coordinator and --workers teacher workers in this process (real gRPC on loopback).
    #[arg(long)]
    local: bool,
    /// Workers for --local.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// State directory of the --local coordinator (default: a fresh temporary directory).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Bearer token for the coordinator.
    #[arg(long, env = "DISTILLERY_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Device of the --local workers.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

pub async fn run(args: LabelArgs) -> anyhow::Result<ExitCode> {
    let mut teacher = TeacherSpec::parse(&args.teacher)?;
    if let Some(w) = &args.weights {
        match &mut teacher {
            TeacherSpec::Emonet { weights, .. } => *weights = Some(w.clone()),
            _ => bail!("--weights applies to emonet-8/emonet-5 only"),
        }
    }
    let req = LabelRequest {
        faces_uri: args.faces.clone(),
        cache_uri: args.cache.clone(),
        teacher,
        views: args.views,
        shard_size: args.shard_size,
        view_seed: args.view_seed,
        storage_options: Default::default(),
    };
    let progress = Progress::new("labelling");
    let on_event = |p: &JobProgress| {
        progress.update(
            p.images_done + p.images_skipped,
            p.images_total,
            &format!(
                "{} shards {}/{} {:.1} img/s",
                p.state, p.shards_done, p.shards_total, p.images_per_second
            ),
        )
    };
    let job = if args.local {
        let tmp;
        let state_dir = match &args.state_dir {
            Some(d) => d.clone(),
            None => {
                tmp = tempfile::tempdir().context("creating a state directory")?;
                tmp.path().to_path_buf()
            }
        };
        let mut cfg = LocalClusterConfig::new(state_dir, args.workers);
        cfg.device = args.device.clone();
        cfg.auth_token = args.auth_token.clone();
        let cluster = LocalCluster::start(&cfg).await?;
        let result = submit_and_wait(&cluster.endpoint(), args.auth_token.as_deref(), &req, on_event).await;
        cluster.shutdown().await?;
        result?
    } else {
        let url = args.coordinator.clone().context("--coordinator URL or --local is required")?;
        let coordinator = Target::new(url).with_tls_ca(args.tls_ca.clone());
        submit_and_wait(&coordinator, args.auth_token.as_deref(), &req, on_event).await?
    };
    progress.finish();
    match args.format {
        Format::Json | Format::Jsonl => print_json(&serde_json::json!({
            "job_id": job.job_id,
            "teacher_fingerprint": job.teacher_fingerprint,
            "images_total": job.images_total,
            "images_done": job.images_done,
            "images_skipped": job.images_skipped,
            "rows_written": job.rows_written,
            "poisoned": job.poisoned.iter().map(|p| serde_json::json!({
                "shard_id": p.shard_id, "attempts": p.attempts, "error": p.last_error,
            })).collect::<Vec<_>>(),
        }))?,
        Format::Text => {
            print_line(format!(
                "job {}: {} faces labelled, {} already cached, {} rows written (teacher {})",
                job.job_id, job.images_done, job.images_skipped, job.rows_written, job.teacher_fingerprint
            ))?;
            for p in &job.poisoned {
                print_line(format!(
                    "poisoned shard {} after {} attempts: {}",
                    p.shard_id, p.attempts, p.last_error
                ))?;
            }
        }
    }
    Ok(if job.poisoned.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(4) })
}
