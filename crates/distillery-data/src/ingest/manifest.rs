//! Generic manifests: one face per CSV row or JSONL line.
//!
//! Fields: `path` (required; relative to the manifest's folder unless absolute), the face box
//! `x, y, w, h` (all four or none; JSONL may instead give `"box": [x, y, w, h]`), `label` (class name,
//! alias or index into the class set), `valence`, `arousal` (in [−1, 1]) and `split`. Empty CSV
//! fields and JSON `null` mean "not given". The format follows the extension: `.csv`, or `.jsonl` /
//! `.ndjson`. Unknown CSV columns fail the open (a misspelt `valence` column would otherwise drop
//! every value silently); unknown JSONL keys reject their row.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use distillery_core::ClassSet;
use serde_json::Value;

use super::{Candidate, Ingest, IngestError, Row, parse_label, parse_num, parse_va};
use crate::{Reject, Split};

/// The fields a manifest row may have.
pub const FIELDS: [&str; 9] = ["path", "x", "y", "w", "h", "label", "valence", "arousal", "split"];

/// How to read a manifest.
#[derive(Clone, Debug)]
pub struct ManifestOptions {
    /// Class set labels refer to.
    pub classes: ClassSet,
    /// Split of rows that give none.
    pub split: Split,
}

impl Default for ManifestOptions {
    fn default() -> Self {
        Self { classes: ClassSet::emonet8(), split: Split::Train }
    }
}

/// One row's fields as text (`None`: absent or empty).
#[derive(Default)]
struct Fields {
    path: Option<String>,
    bx: [Option<String>; 4],
    label: Option<String>,
    valence: Option<String>,
    arousal: Option<String>,
    split: Option<String>,
}

/// Opens the manifest at `path` for streaming.
pub fn open(path: &Path, opts: &ManifestOptions) -> Result<Ingest, IngestError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let source = path.display().to_string();
    let opts = opts.clone();
    match ext.as_str() {
        "csv" => {
            let mut reader =
                csv::ReaderBuilder::new().flexible(true).trim(csv::Trim::All).from_path(path).map_err(
                    |e| match e.into_kind() {
                        csv::ErrorKind::Io(io) => IngestError::io(path, io),
                        other => IngestError::invalid(path, format!("{other:?}")),
                    },
                )?;
            let header: Vec<String> = reader
                .headers()
                .map_err(|e| IngestError::invalid(path, format!("cannot read the header: {e}")))?
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect();
            let mut cols = Vec::with_capacity(header.len());
            for h in &header {
                let Some(i) = FIELDS.iter().position(|f| f == h) else {
                    return Err(IngestError::invalid(
                        path,
                        format!("unknown column `{h}` (known: {})", FIELDS.join(", ")),
                    ));
                };
                cols.push(i);
            }
            if !cols.contains(&0) {
                return Err(IngestError::invalid(path, "has no `path` column"));
            }
            let n_box = cols.iter().filter(|c| (1..=4).contains(*c)).count();
            if n_box != 0 && n_box != 4 {
                return Err(IngestError::invalid(
                    path,
                    "box columns x, y, w, h must all be present or all absent",
                ));
            }
            let rows = reader.into_records().map(move |rec| {
                let (line, res) = match rec {
                    Ok(rec) => {
                        let line = rec.position().map(|p| p.line());
                        (line, csv_fields(&rec, &cols).and_then(|f| to_candidate(f, &base, &opts)))
                    }
                    Err(e) => (e.position().map(|p| p.line()), Err(format!("malformed CSV: {e}"))),
                };
                finish(res, line, &source)
            });
            Ok(Ingest::new(rows))
        }
        "jsonl" | "ndjson" => {
            let file = std::fs::File::open(path).map_err(|e| IngestError::io(path, e))?;
            let rows = BufReader::new(file)
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.as_ref().is_ok_and(|l| l.trim().is_empty()))
                .map(move |(i, line)| {
                    let res = line
                        .map_err(|e| format!("cannot read line: {e}"))
                        .and_then(|l| json_fields(&l))
                        .and_then(|f| to_candidate(f, &base, &opts));
                    finish(res, Some(i as u64 + 1), &source)
                });
            Ok(Ingest::new(rows))
        }
        _ => Err(IngestError::invalid(path, "manifest must end in .csv, .jsonl or .ndjson")),
    }
}

fn finish(res: Result<Candidate, String>, row: Option<u64>, source: &str) -> Row {
    match res {
        Ok(mut c) => {
            c.row = row;
            Row::Face(c)
        }
        Err(reason) => Row::Reject(Reject { source: source.to_string(), row, reason }),
    }
}

fn csv_fields(rec: &csv::StringRecord, cols: &[usize]) -> Result<Fields, String> {
    if rec.len() != cols.len() {
        return Err(format!("expected {} fields, found {}", cols.len(), rec.len()));
    }
    let mut f = Fields::default();
    for (value, &col) in rec.iter().zip(cols) {
        let v = (!value.is_empty()).then(|| value.to_string());
        match col {
            0 => f.path = v,
            1..=4 => f.bx[col - 1] = v,
            5 => f.label = v,
            6 => f.valence = v,
            7 => f.arousal = v,
            _ => f.split = v,
        }
    }
    Ok(f)
}

fn json_fields(line: &str) -> Result<Fields, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let Value::Object(map) = v else {
        return Err("expected a JSON object".into());
    };
    let mut f = Fields::default();
    let text = |key: &str, v: &Value| -> Result<Option<String>, String> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s.is_empty() => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            Value::Number(n) => Ok(Some(n.to_string())),
            other => Err(format!("field `{key}`: expected a string or number, found {other}")),
        }
    };
    for (key, v) in &map {
        match key.as_str() {
            "path" => f.path = text(key, v)?,
            "x" => f.bx[0] = text(key, v)?,
            "y" => f.bx[1] = text(key, v)?,
            "w" => f.bx[2] = text(key, v)?,
            "h" => f.bx[3] = text(key, v)?,
            "box" => match v {
                Value::Null => {}
                Value::Array(a) if a.len() == 4 => {
                    for (k, x) in a.iter().enumerate() {
                        f.bx[k] = text("box", x)?;
                    }
                }
                other => return Err(format!("field `box`: expected [x, y, w, h], found {other}")),
            },
            "label" => f.label = text(key, v)?,
            "valence" => f.valence = text(key, v)?,
            "arousal" => f.arousal = text(key, v)?,
            "split" => f.split = text(key, v)?,
            other => return Err(format!("unknown field `{other}` (known: {}, box)", FIELDS.join(", "))),
        }
    }
    Ok(f)
}

fn to_candidate(f: Fields, base: &Path, opts: &ManifestOptions) -> Result<Candidate, String> {
    let path = f.path.ok_or("field `path` is missing or empty")?;
    let path = PathBuf::from(path);
    let box_xywh = match &f.bx {
        [None, None, None, None] => None,
        [Some(x), Some(y), Some(w), Some(h)] => {
            Some([parse_num("x", x)?, parse_num("y", y)?, parse_num("w", w)?, parse_num("h", h)?])
        }
        _ => return Err("fields `x, y, w, h` must be all given or all empty".into()),
    };
    let label = f.label.map(|l| parse_label(&l, &opts.classes)).transpose()?;
    let valence = f.valence.map(|v| parse_va("valence", &v)).transpose()?;
    let arousal = f.arousal.map(|v| parse_va("arousal", &v)).transpose()?;
    let split = match f.split {
        None => opts.split,
        Some(s) => {
            Split::parse(&s).ok_or_else(|| format!("field `split`: `{s}` is not train, val or test"))?
        }
    };
    Ok(Candidate {
        path: if path.is_absolute() { path } else { base.join(path) },
        row: None,
        box_xywh,
        label,
        valence,
        arousal,
        split,
    })
}
