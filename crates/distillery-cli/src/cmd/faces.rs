//! `distillery synth`, `distillery ingest …` and `distillery faces inspect`: getting faces into a
//! Lance faces dataset and looking at one.

use std::path::PathBuf;
use std::process::ExitCode;

use distillery_cache::{FaceStore, IngestTotals};
use distillery_core::ClassSet;
use distillery_data::Split;
use distillery_data::ingest;
use distillery_data::synth::SynthConfig;
use serde::Serialize;

use crate::output::{EXIT_NOTHING_USABLE, Format, print_json, print_line};
use crate::progress::Progress;

#[derive(clap::Args, Debug)]
#[command(after_help = "Example: distillery synth --count 2000 --out data/faces.lance --size 64 --seed 7")]
pub struct SynthArgs {
    /// Number of faces.
    #[arg(long)]
    count: u64,
    /// Faces dataset URI to create or extend.
    #[arg(long)]
    out: String,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 64)]
    size: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    #[command(subcommand)]
    source: IngestSource,
}

#[derive(clap::Subcommand, Debug)]
enum IngestSource {
    /// The AffectNet manual-annotation CSV (training.csv / validation.csv).
    #[command(after_help = "Example: distillery ingest affectnet --csv training.csv \\
    --images Manually_Annotated_Images --out data/affectnet.lance --split train")]
    Affectnet {
        #[arg(long)]
        csv: PathBuf,
        /// Folder that `subDirectory_filePath` is relative to.
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        out: String,
        #[arg(long, default_value = "train", value_parser = parse_split)]
        split: Split,
        /// 8 (EmoNet-8, default) or 5 (keep expressions 0–4 only).
        #[arg(long, default_value_t = 8, value_parser = parse_class_count)]
        classes: u8,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// One sub-folder per class (FER2013 / RAF-DB layout), optionally under train/val/test.
    #[command(after_help = "Example: distillery ingest folder --root fer2013/ --out data/fer.lance")]
    Folder {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        out: String,
        /// Split of faces when the tree has no split level.
        #[arg(long, default_value = "train", value_parser = parse_split)]
        split: Split,
        /// Skip folders that name no class instead of failing.
        #[arg(long)]
        skip_unknown_classes: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// A CSV or JSONL manifest: path, optional box x,y,w,h, label, valence, arousal, split.
    #[command(after_help = "Example: distillery ingest manifest --file faces.csv --out data/faces.lance")]
    Manifest {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        out: String,
        /// Split of rows that give none.
        #[arg(long, default_value = "train", value_parser = parse_split)]
        split: Split,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(clap::Args, Debug)]
pub struct FacesArgs {
    #[command(subcommand)]
    command: FacesCommand,
}

#[derive(clap::Subcommand, Debug)]
enum FacesCommand {
    /// Counts per split and class, label statistics, rejects, Lance version.
    #[command(after_help = "Example: distillery faces inspect data/faces.lance --format json")]
    Inspect {
        uri: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

fn parse_class_count(s: &str) -> Result<u8, String> {
    match s {
        "8" => Ok(8),
        "5" => Ok(5),
        _ => Err(format!("`{s}` is not 8 or 5")),
    }
}

fn parse_split(s: &str) -> Result<Split, String> {
    Split::parse(s).ok_or_else(|| format!("`{s}` is not train, val or test"))
}

#[derive(Serialize)]
struct IngestSummary {
    uri: String,
    #[serde(flatten)]
    totals: IngestTotals,
}

pub async fn synth(args: SynthArgs) -> anyhow::Result<ExitCode> {
    let cfg = SynthConfig { count: args.count, size: args.size, seed: args.seed, ..SynthConfig::default() };
    cfg.validate()?;
    let mut store = FaceStore::create_or_open(&args.out).await?;
    let progress = Progress::new("synth");
    let totals = store.synthesize(&cfg, |done| progress.update(done, cfg.count, "faces")).await?;
    progress.finish();
    report(&IngestSummary { uri: args.out.clone(), totals }, args.format)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn ingest(args: IngestArgs) -> anyhow::Result<ExitCode> {
    let (ingest, out, format) = match args.source {
        IngestSource::Affectnet { csv, images, out, split, classes, format } => {
            let mut opts = ingest::affectnet::AffectNetOptions::new(images, split);
            opts.five_class = classes == 5;
            (ingest::affectnet::open(&csv, &opts)?, out, format)
        }
        IngestSource::Folder { root, out, split, skip_unknown_classes, format } => {
            let opts =
                ingest::folder::FolderOptions { classes: ClassSet::emonet8(), split, skip_unknown_classes };
            (ingest::folder::open(&root, &opts)?, out, format)
        }
        IngestSource::Manifest { file, out, split, format } => {
            let opts = ingest::manifest::ManifestOptions { classes: ClassSet::emonet8(), split };
            (ingest::manifest::open(&file, &opts)?, out, format)
        }
    };
    let mut store = FaceStore::create_or_open(&out).await?;
    let progress = Progress::new("ingest");
    let totals = store.ingest(ingest, |rows| progress.update(rows, 0, "rows")).await?;
    progress.finish();
    let summary = IngestSummary { uri: out, totals };
    report(&summary, format)?;
    if summary.totals.report.accepted + summary.totals.already_stored == 0 {
        tracing::error!("nothing usable: every row was rejected or skipped (see the rejects table)");
        return Ok(ExitCode::from(EXIT_NOTHING_USABLE));
    }
    Ok(ExitCode::SUCCESS)
}

fn report(s: &IngestSummary, format: Format) -> anyhow::Result<()> {
    let (r, t) = (&s.totals.report, &s.totals);
    match format {
        Format::Json | Format::Jsonl => print_json(s),
        Format::Text => print_line(format!(
            "{}: {} accepted, {} rejected, {} skipped, {} duplicates, {} already stored (version {})",
            s.uri, r.accepted, r.rejected, r.skipped, r.duplicates, t.already_stored, t.version
        )),
    }
}

pub async fn faces(args: FacesArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        FacesCommand::Inspect { uri, format } => {
            let store = FaceStore::open(&uri).await?;
            let stats = store.stats().await?;
            match format {
                Format::Json | Format::Jsonl => print_json(&stats)?,
                Format::Text => {
                    print_line(format!(
                        "{uri}: {} faces, {} rejects, {} unlabelled, version {}",
                        stats.faces, stats.rejects, stats.unlabelled, stats.version
                    ))?;
                    let classes = ClassSet::emonet8();
                    for (split, n) in &stats.splits {
                        let per_class: Vec<String> = stats
                            .classes
                            .get(split)
                            .map(|m| {
                                m.iter()
                                    .map(|(c, k)| {
                                        let name = classes
                                            .names()
                                            .get(*c as usize)
                                            .cloned()
                                            .unwrap_or(c.to_string());
                                        format!("{name}={k}")
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        print_line(format!("  {split:<5} {n:>8}  {}", per_class.join(" ")))?;
                    }
                    for (name, v) in [("valence", stats.valence), ("arousal", stats.arousal)] {
                        if let Some(v) = v {
                            print_line(format!(
                                "  {name}: n={} mean={:+.3} std={:.3}",
                                v.count, v.mean, v.std
                            ))?;
                        }
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
