//! `distillery cache …`: look into and maintain teacher caches.

use std::process::ExitCode;
use std::time::Duration;

use distillery_cache::{FaceStore, TeacherCache};
use serde::Serialize;

use crate::output::{Format, print_json, print_line};

#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CacheCommand {
    /// One line per teacher in the cache: fingerprint, name, rows.
    #[command(after_help = "Example: distillery cache list runs/cache.lance")]
    List {
        /// Cache URI (local path or s3://bucket/prefix).
        uri: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Teachers, views, rows, versions, and coverage of a faces dataset.
    #[command(
        after_help = "Example: distillery cache inspect runs/cache.lance --faces runs/faces.lance --format json"
    )]
    Inspect {
        uri: String,
        /// Faces dataset to report coverage against (faces still lacking outputs per teacher).
        #[arg(long)]
        faces: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Rewrite small fragments into fewer, larger ones (rows unchanged).
    #[command(after_help = "Example: distillery cache compact runs/cache.lance")]
    Compact {
        uri: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Delete versions older than the given age (the latest version is always kept).
    Cleanup {
        uri: String,
        /// Minimum age of the versions to delete, in hours.
        #[arg(long, default_value_t = 24 * 7)]
        older_than_hours: u64,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Serialize)]
struct Inspection {
    #[serde(flatten)]
    summary: distillery_cache::CacheSummary,
    coverage: Vec<TeacherCoverage>,
}

#[derive(Serialize)]
struct TeacherCoverage {
    fingerprint: String,
    name: String,
    #[serde(flatten)]
    coverage: distillery_cache::Coverage,
}

pub async fn run(args: CacheArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CacheCommand::List { uri, format } => {
            let cache = TeacherCache::open(&uri).await?;
            let teachers = cache.summary().await?.teachers;
            if format != Format::Text {
                print_json(&teachers)?;
            }
            for t in teachers.iter().filter(|_| format == Format::Text) {
                print_line(format!("{}  {:<24} {:>10} rows", t.fingerprint, t.name, t.rows))?;
            }
        }
        CacheCommand::Inspect { uri, faces, format } => {
            let cache = TeacherCache::open(&uri).await?;
            let summary = cache.summary().await?;
            let mut coverage = Vec::new();
            if let Some(faces) = faces {
                let faces = FaceStore::open(&faces).await?;
                for t in &summary.teachers {
                    let c = cache.coverage(&faces, &t.fingerprint).await?;
                    coverage.push(TeacherCoverage {
                        fingerprint: t.fingerprint.to_string(),
                        name: t.name.clone(),
                        coverage: c,
                    });
                }
            }
            let report = Inspection { summary, coverage };
            match format {
                Format::Json | Format::Jsonl => print_json(&report)?,
                Format::Text => print_inspection(&report)?,
            }
        }
        CacheCommand::Compact { uri, format } => {
            let mut cache = TeacherCache::open(&uri).await?;
            let s = cache.compact().await?;
            if format != Format::Text {
                return print_json(&s).map(|()| ExitCode::SUCCESS);
            }
            print_line(format!(
                "compacted {uri}: {} → {} fragments (version {})",
                s.fragments_before, s.fragments_after, s.version
            ))?;
        }
        CacheCommand::Cleanup { uri, older_than_hours, format } => {
            let mut cache = TeacherCache::open(&uri).await?;
            let s = cache.cleanup(Duration::from_secs(older_than_hours * 3600)).await?;
            if format != Format::Text {
                return print_json(&s).map(|()| ExitCode::SUCCESS);
            }
            print_line(format!(
                "removed {} old versions, {} data files, {} bytes",
                s.old_versions, s.data_files_removed, s.bytes_removed
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_inspection(r: &Inspection) -> anyhow::Result<()> {
    let s = &r.summary;
    print_line(format!("cache    {}", s.uri))?;
    print_line(format!(
        "version  {} ({} stored)   rows {}   fragments {}   shards {}   logits {:?}",
        s.version,
        s.versions.len(),
        s.rows,
        s.fragments,
        s.shards,
        s.precision
    ))?;
    for t in &s.teachers {
        print_line(format!(
            "teacher  {} {} rows={} classes={}",
            t.fingerprint,
            t.name,
            t.rows,
            t.classes.join(",")
        ))?;
    }
    for (view, rows) in &s.views {
        print_line(format!("view     {view}: {rows} rows"))?;
    }
    for c in &r.coverage {
        print_line(format!(
            "coverage {} {}: {}/{} faces labelled, {} missing",
            c.fingerprint, c.name, c.coverage.covered, c.coverage.faces, c.coverage.missing
        ))?;
    }
    Ok(())
}
