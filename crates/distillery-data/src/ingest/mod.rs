//! Turning face datasets on disk into [`FaceRecord`]s: AffectNet annotation CSVs, one-folder-per-class
//! trees (FER2013, RAF-DB layout) and generic CSV/JSONL manifests.
//!
//! Every parser yields an [`Ingest`]: an iterator of [`IngestChunk`]s. Rows are read lazily, a chunk
//! at a time, and the images of a chunk are read and validated in parallel (rayon), so memory stays
//! at one chunk of encoded images however large the input. Bad rows and bad images never stop an
//! ingest: each becomes a [`Reject`] naming the file, the manifest row and the field or the reason.
//! Rows that are well-formed but not wanted (AffectNet's "none/uncertain/no-face", classes outside a
//! 5-class set, non-image files) are *skipped* and only counted. Faces whose [`FaceId`] (bytes + box)
//! was already produced by the same ingest are dropped as duplicates.
//!
//! Storage is not done here; the caller writes the chunks.

pub mod affectnet;
pub mod folder;
pub mod manifest;

use std::collections::HashSet;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use distillery_core::{ClassSet, FaceId};
use image::{ImageError, ImageFormat, ImageReader, Limits};
use rayon::prelude::*;
use serde::Serialize;

use crate::{FaceRecord, Reject, Split};

/// Largest accepted image side in pixels.
pub const MAX_SIDE: u32 = 8192;
/// Largest accepted image area in pixels (64 MP).
pub const MAX_PIXELS: u64 = 64_000_000;
/// Largest accepted file; bigger files are rejected before being read into memory.
pub const MAX_FILE_BYTES: u64 = 128 * 1024 * 1024;
/// Most bytes a decoder may allocate for one image (a 64 MP 16-bit RGBA image needs 512 MiB).
const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

/// Rows per chunk unless [`Ingest::chunk_size`] says otherwise.
pub const DEFAULT_CHUNK: usize = 256;

/// Errors that stop an ingest before it starts: the input cannot be opened or its overall layout is
/// wrong (bad CSV header, unknown class folder). Row-level problems are [`Reject`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot read `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{path}`: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl IngestError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }
    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Self::Invalid { path: path.to_owned(), reason: reason.into() }
    }
}

/// Counts over one ingest. `accepted + rejected + skipped + duplicates` is the number of inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IngestReport {
    pub accepted: u64,
    pub rejected: u64,
    pub skipped: u64,
    pub duplicates: u64,
}

/// The faces and rejects of one chunk of rows, in input order.
#[derive(Clone, Debug, Default)]
pub struct IngestChunk {
    pub faces: Vec<FaceRecord>,
    pub rejects: Vec<Reject>,
}

/// Everything an ingest produced, for inputs small enough to hold at once.
#[derive(Clone, Debug, Default)]
pub struct IngestOutput {
    pub faces: Vec<FaceRecord>,
    pub rejects: Vec<Reject>,
    pub report: IngestReport,
}

/// A face row whose image still has to be read and validated.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    pub path: PathBuf,
    /// 1-based manifest row (line), if the face came from one.
    pub row: Option<u64>,
    pub box_xywh: Option<[f32; 4]>,
    pub label: Option<u32>,
    pub valence: Option<f32>,
    pub arousal: Option<f32>,
    pub split: Split,
}

/// What a parser makes of one input row or file.
pub(crate) enum Row {
    Face(Candidate),
    Reject(Reject),
    Skip,
}

/// A streaming ingest: iterate for [`IngestChunk`]s, then read [`Ingest::report`].
pub struct Ingest {
    rows: Box<dyn Iterator<Item = Row> + Send>,
    chunk: usize,
    /// First 128 bits of every face id produced so far (16 bytes a face).
    seen: HashSet<u128>,
    report: IngestReport,
}

impl Ingest {
    pub(crate) fn new(rows: impl Iterator<Item = Row> + Send + 'static) -> Self {
        Self {
            rows: Box::new(rows),
            chunk: DEFAULT_CHUNK,
            seen: HashSet::new(),
            report: IngestReport::default(),
        }
    }

    /// Sets how many rows are read (and how many images held) per chunk; at least 1.
    pub fn chunk_size(mut self, rows: usize) -> Self {
        self.chunk = rows.max(1);
        self
    }

    /// Counts so far (final once the iterator is exhausted).
    pub fn report(&self) -> IngestReport {
        self.report
    }

    /// Runs the whole ingest and keeps everything in memory.
    pub fn collect_all(mut self) -> IngestOutput {
        let mut out = IngestOutput::default();
        for chunk in self.by_ref() {
            out.faces.extend(chunk.faces);
            out.rejects.extend(chunk.rejects);
        }
        out.report = self.report;
        out
    }
}

impl Iterator for Ingest {
    type Item = IngestChunk;

    fn next(&mut self) -> Option<IngestChunk> {
        let mut candidates = Vec::new();
        // Rejects keep input order: (position in chunk, reject).
        let mut rejects = Vec::new();
        let mut pulled = 0;
        for row in self.rows.by_ref().take(self.chunk) {
            pulled += 1;
            match row {
                Row::Face(c) => candidates.push((pulled, c)),
                Row::Reject(r) => rejects.push((pulled, r)),
                Row::Skip => self.report.skipped += 1,
            }
        }
        if pulled == 0 {
            return None;
        }
        let loaded: Vec<(usize, Result<FaceRecord, Reject>)> =
            candidates.into_par_iter().map(|(pos, c)| (pos, load(c))).collect();
        let mut faces = Vec::with_capacity(loaded.len());
        for (pos, res) in loaded {
            match res {
                Ok(face) => {
                    let key = u128::from_str_radix(face.id.as_str(), 16).expect("face ids are hex");
                    if self.seen.insert(key) {
                        faces.push(face);
                    } else {
                        self.report.duplicates += 1;
                    }
                }
                Err(r) => rejects.push((pos, r)),
            }
        }
        rejects.sort_by_key(|(pos, _)| *pos);
        self.report.accepted += faces.len() as u64;
        self.report.rejected += rejects.len() as u64;
        Some(IngestChunk { faces, rejects: rejects.into_iter().map(|(_, r)| r).collect() })
    }
}

/// Reads, validates and labels one candidate face.
fn load(c: Candidate) -> Result<FaceRecord, Reject> {
    let source = c.path.display().to_string();
    let reject = |reason: String| Reject { source: source.clone(), row: c.row, reason };
    let bytes = read_limited(&c.path).map_err(reject)?;
    let (width, height) = validate_image(&bytes).map_err(reject)?;
    if let Some(b) = c.box_xywh {
        check_box(b, width, height).map_err(reject)?;
    }
    Ok(FaceRecord {
        id: FaceId::of(&bytes, c.box_xywh),
        image: bytes,
        width,
        height,
        box_xywh: c.box_xywh,
        label: c.label,
        valence: c.valence,
        arousal: c.arousal,
        split: c.split,
        source,
    })
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read file: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("file is {} bytes, over the {MAX_FILE_BYTES}-byte limit", meta.len()));
    }
    std::fs::read(path).map_err(|e| format!("cannot read file: {e}"))
}

/// A box must have a positive finite size and overlap the image (crops may extend past the edges;
/// preprocessing pads them).
fn check_box(b: [f32; 4], width: u32, height: u32) -> Result<(), String> {
    let [x, y, w, h] = b;
    if b.iter().any(|v| !v.is_finite()) || w <= 0.0 || h <= 0.0 {
        return Err(format!("box {b:?} must be finite with positive width and height"));
    }
    if x >= width as f32 || y >= height as f32 || x + w <= 0.0 || y + h <= 0.0 {
        return Err(format!("box {b:?} lies outside the {width}×{height} image"));
    }
    Ok(())
}

/// Checks that `bytes` are a complete JPEG or PNG of sane size by decoding them under limits, and
/// returns `(width, height)`. The error says what is wrong: empty, not an image, unsupported format,
/// too large (decompression bomb), truncated or corrupt.
pub fn validate_image(bytes: &[u8]) -> Result<(u32, u32), String> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    let reader = |limits: Limits| -> Result<ImageReader<Cursor<&[u8]>>, String> {
        let mut r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot read image: {e}"))?;
        r.limits(limits);
        Ok(r)
    };
    let format = match reader(Limits::default())?.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
        Some(f) => return Err(format!("unsupported image format {f:?} (JPEG and PNG are read)")),
        None => {
            let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(format!("not an image: unrecognised content starting with bytes {}", head.join(" ")));
        }
    };
    let kind = if format == ImageFormat::Png { "PNG" } else { "JPEG" };

    // The header alone first, so a bomb is reported by its claimed size before anything is allocated.
    let (w, h) = reader(Limits::default())?
        .into_dimensions()
        .map_err(|e| format!("corrupt {kind} header: {}", describe(&e)))?;
    if w == 0 || h == 0 {
        return Err(format!("{kind} claims an empty {w}×{h} image"));
    }
    let pixels = w as u64 * h as u64;
    if w > MAX_SIDE || h > MAX_SIDE || pixels > MAX_PIXELS {
        return Err(format!(
            "{kind} claims {w}×{h} pixels, over the limit of {MAX_SIDE} px a side and {} MP \
             (decompression bomb?)",
            MAX_PIXELS / 1_000_000
        ));
    }
    if format == ImageFormat::Jpeg && jpeg_lacks_end(bytes) {
        // The JPEG decoder pads a cut-off scan with grey instead of failing.
        return Err("truncated JPEG: no end-of-image marker after the last scan".into());
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader(limits)?.decode().map_err(|e| format!("cannot decode {kind}: {}", describe(&e)))?;
    Ok((w, h))
}

fn describe(e: &ImageError) -> String {
    match e {
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("truncated data ({io})")
        }
        other => other.to_string(),
    }
}

/// True when no EOI marker (`FF D9`) follows the last start-of-scan marker (`FF DA`). Entropy-coded
/// data byte-stuffs `FF`, so neither marker occurs inside a scan; an embedded EXIF thumbnail comes
/// before the main image's scans and cannot satisfy the test for it.
fn jpeg_lacks_end(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        return true;
    };
    !bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// The EmoNet class name a dataset's class name or folder stands for: lower-cased, with common
/// aliases (FER2013, RAF-DB, CK+ spellings) mapped.
pub fn canonical_class(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase();
    let mapped = match n.as_str() {
        "angry" | "anger" => "anger",
        "fearful" | "fear" | "scared" => "fear",
        "surprised" | "surprise" => "surprise",
        "disgusted" | "disgust" => "disgust",
        "happiness" | "happy" | "joy" => "happy",
        "sadness" | "sad" => "sad",
        "contemptuous" | "contempt" => "contempt",
        "neutrality" | "neutral" => "neutral",
        _ => return n,
    };
    mapped.to_string()
}

/// Parses a label given as a class index or a class name (aliases allowed) against `classes`.
pub(crate) fn parse_label(s: &str, classes: &ClassSet) -> Result<u32, String> {
    let s = s.trim();
    if let Ok(i) = s.parse::<i64>() {
        return if (0..classes.len() as i64).contains(&i) {
            Ok(i as u32)
        } else {
            Err(format!("field `label`: {i} is not a class index (0..={})", classes.len() - 1))
        };
    }
    classes.index_of(&canonical_class(s)).map(|i| i as u32).ok_or_else(|| {
        format!("field `label`: `{s}` is not one of the classes [{}]", classes.names().join(", "))
    })
}

/// Parses a valence or arousal value that must lie in [−1, 1].
pub(crate) fn parse_va(field: &str, s: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|_| format!("field `{field}`: `{s}` is not a number"))?;
    check_va(field, v)
}

pub(crate) fn check_va(field: &str, v: f32) -> Result<f32, String> {
    if v.is_finite() && (-1.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("field `{field}`: {v} is outside [-1, 1]"))
    }
}

/// Parses a finite number for field `field`.
pub(crate) fn parse_num(field: &str, s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("field `{field}`: `{s}` is not a finite number")),
    }
}

/// File extensions treated as images when walking folders.
pub(crate) fn is_image_name(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    matches!(ext.as_str(), "jpg" | "jpeg" | "png" | "bmp" | "gif" | "webp" | "tif" | "tiff")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eoi_after_last_scan_is_required() {
        assert!(!jpeg_lacks_end(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0xD9]));
        assert!(jpeg_lacks_end(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3]));
        // A thumbnail's EOI before the main scan does not count.
        assert!(jpeg_lacks_end(&[0xFF, 0xDA, 0xFF, 0xD9, 0xFF, 0xDA, 7]));
    }

    #[test]
    fn labels_by_index_name_and_alias() {
        let c = ClassSet::emonet8();
        assert_eq!(parse_label("3", &c), Ok(3));
        assert_eq!(parse_label("Angry", &c), Ok(6));
        assert_eq!(parse_label(" fearful ", &c), Ok(4));
        assert!(parse_label("8", &c).unwrap_err().contains("0..=7"));
        assert!(parse_label("joyous", &c).unwrap_err().contains("`joyous`"));
        assert!(parse_label("contempt", &ClassSet::emonet5()).is_err());
    }

    #[test]
    fn boxes_must_overlap_the_image() {
        assert!(check_box([-5.0, -5.0, 20.0, 20.0], 10, 10).is_ok());
        assert!(check_box([10.0, 0.0, 5.0, 5.0], 10, 10).unwrap_err().contains("outside"));
        assert!(check_box([0.0, 0.0, 0.0, 5.0], 10, 10).unwrap_err().contains("positive"));
        assert!(check_box([0.0, 0.0, f32::NAN, 5.0], 10, 10).is_err());
    }
}
