//! AffectNet's manual-annotation CSVs (`training.csv`, `validation.csv`).
//!
//! Columns: `subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks,
//! expression, valence, arousal`. Expressions 0–7 are EmoNet's classes in EmoNet order; 8 (none),
//! 9 (uncertain) and 10 (no face) are skipped (or, with `keep_unlabelled`, 8 and 9 are kept without
//! a label: the teacher can still label them). Valence/arousal of −2 mean "missing". The face box is
//! stored as annotated; the enlarged crop AffectNet models expect is made when the image is read.
//! The header row is optional (the released `validation.csv` has none).

use std::path::{Path, PathBuf};

use distillery_core::classes::EMONET_8;

use super::{Candidate, Ingest, IngestError, Row, check_va, parse_num};
use crate::{Reject, Split};

/// The columns, in order.
pub const COLUMNS: [&str; 9] = [
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
];

/// How to read an AffectNet CSV.
#[derive(Clone, Debug)]
pub struct AffectNetOptions {
    /// Folder that `subDirectory_filePath` is relative to (`Manually_Annotated_Images`).
    pub images_dir: PathBuf,
    /// Split given to every face (AffectNet's CSVs are one split each).
    pub split: Split,
    /// Keep only expressions 0–4 (EmoNet's 5-class set); 5–7 are then skipped like 8–9.
    pub five_class: bool,
    /// Keep expressions that are skipped otherwise (8, 9 and, with `five_class`, 5–7) without a
    /// label. No-face rows (10) are always skipped.
    pub keep_unlabelled: bool,
}

impl AffectNetOptions {
    pub fn new(images_dir: impl Into<PathBuf>, split: Split) -> Self {
        Self { images_dir: images_dir.into(), split, five_class: false, keep_unlabelled: false }
    }
}

/// Opens `csv_path` for streaming. Fails only when the file cannot be opened or its first row is neither
/// the AffectNet header nor a 9-field data row.
pub fn open(csv_path: &Path, opts: &AffectNetOptions) -> Result<Ingest, IngestError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_path(csv_path)
        .map_err(|e| match e.into_kind() {
            csv::ErrorKind::Io(io) => IngestError::io(csv_path, io),
            other => IngestError::invalid(csv_path, format!("{other:?}")),
        })?;
    // The header is optional; when the first row looks like one (a non-numeric `face_x`) it must be
    // the AffectNet header, otherwise it is data.
    let mut first = csv::StringRecord::new();
    let head = match reader.read_record(&mut first) {
        Ok(false) => None,
        Ok(true) if first.get(1).is_some_and(|f| f.parse::<f32>().is_err()) => {
            let got: Vec<&str> = first.iter().collect();
            if got != COLUMNS {
                return Err(IngestError::invalid(
                    csv_path,
                    format!("header is [{}], expected [{}]", got.join(", "), COLUMNS.join(", ")),
                ));
            }
            None
        }
        Ok(true) => Some(Ok(first)),
        Err(e) => Some(Err(e)),
    };
    let source = csv_path.display().to_string();
    let opts = opts.clone();
    let rows = head.into_iter().chain(reader.into_records()).map(move |rec| match rec {
        Ok(rec) => {
            let line = rec.position().map(|p| p.line());
            match parse_row(&rec, &opts) {
                Ok(row) => row.map_or(Row::Skip, |mut c| {
                    c.row = line;
                    Row::Face(c)
                }),
                Err(reason) => Row::Reject(Reject { source: source.clone(), row: line, reason }),
            }
        }
        Err(e) => Row::Reject(Reject {
            source: source.clone(),
            row: e.position().map(|p| p.line()),
            reason: format!("malformed CSV: {e}"),
        }),
    });
    Ok(Ingest::new(rows))
}

/// One data row: `Ok(None)` to skip it, `Err` names the bad field.
fn parse_row(rec: &csv::StringRecord, opts: &AffectNetOptions) -> Result<Option<Candidate>, String> {
    if rec.len() != COLUMNS.len() {
        return Err(format!("expected {} fields, found {}", COLUMNS.len(), rec.len()));
    }
    let expr_s = &rec[6];
    let expr: i64 =
        expr_s.parse().map_err(|_| format!("field `expression`: `{expr_s}` is not an integer"))?;
    if !(0..=10).contains(&expr) {
        return Err(format!("field `expression`: {expr} is not in 0..=10"));
    }
    let n_classes = if opts.five_class { 5 } else { EMONET_8.len() as i64 };
    let label = if expr < n_classes {
        Some(expr as u32)
    } else if expr <= 9 && opts.keep_unlabelled {
        None
    } else {
        return Ok(None);
    };
    let path = &rec[0];
    if path.is_empty() {
        return Err("field `subDirectory_filePath` is empty".into());
    }
    let mut b = [0f32; 4];
    for (k, v) in b.iter_mut().enumerate() {
        *v = parse_num(COLUMNS[k + 1], &rec[k + 1])?;
    }
    if b[0] < 0.0 || b[1] < 0.0 || b[2] <= 0.0 || b[3] <= 0.0 {
        return Err(format!("face box {b:?} needs non-negative x, y and positive width, height"));
    }
    let va = |k: usize| -> Result<Option<f32>, String> {
        let v = parse_num(COLUMNS[k], &rec[k])?;
        // −2 is AffectNet's "no value".
        if v == -2.0 { Ok(None) } else { check_va(COLUMNS[k], v).map(Some) }
    };
    Ok(Some(Candidate {
        path: opts.images_dir.join(path),
        row: None,
        box_xywh: Some(b),
        label,
        valence: va(7)?,
        arousal: va(8)?,
        split: opts.split,
    }))
}
