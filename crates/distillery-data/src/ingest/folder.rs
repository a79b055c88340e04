//! Class-folder datasets: `root/<class>/*.png`, or with a split level `root/<split>/<class>/*.png`
//! (FER2013, RAF-DB and most image-classification dumps).
//!
//! Class folder names are matched to the class set case-insensitively, with common aliases
//! (`angry` → anger, `fearful` → fear, `surprised` → surprise, `disgusted` → disgust,
//! `happiness` → happy, `sadness` → sad). The split level is detected when every sub-folder of the
//! root is a split name (`train`, `val`/`valid`/`validation`, `test`). Files are visited in sorted
//! order (recursively under each class folder) so an ingest is reproducible. Hidden files and files
//! without an image extension are skipped; files with an image extension are validated.

use std::path::{Path, PathBuf};

use distillery_core::ClassSet;

use super::{Candidate, Ingest, IngestError, Row, canonical_class, is_image_name};
use crate::{Reject, Split};

/// How to read a class-folder dataset.
#[derive(Clone, Debug)]
pub struct FolderOptions {
    /// Class set the folder names are matched against (labels are indices into it).
    pub classes: ClassSet,
    /// Split of every face when the tree has no split level.
    pub split: Split,
    /// Skip (and count) files in folders that are not a class of `classes` instead of failing.
    pub skip_unknown_classes: bool,
}

impl Default for FolderOptions {
    fn default() -> Self {
        Self { classes: ClassSet::emonet8(), split: Split::Train, skip_unknown_classes: false }
    }
}

/// One class folder to walk, with its label (`None`: unknown class, files are skipped).
struct ClassDir {
    dir: PathBuf,
    label: Option<u32>,
    split: Split,
}

/// Opens the dataset at `root`. Fails when `root` cannot be listed, mixes split and class folders,
/// or (unless `skip_unknown_classes`) has a folder that names no class.
pub fn open(root: &Path, opts: &FolderOptions) -> Result<Ingest, IngestError> {
    let (top, loose) = list(root)?;
    if top.is_empty() {
        return Err(IngestError::invalid(root, "has no sub-folders (expected one per class)"));
    }
    let splits: Vec<Option<Split>> = top.iter().map(|d| Split::parse(&name_of(d))).collect();
    let mut dirs = Vec::new();
    let mut skipped = loose;
    if splits.iter().all(Option::is_some) {
        for (d, split) in top.iter().zip(splits) {
            let (classes, loose) = list(d)?;
            skipped += loose;
            for c in classes {
                dirs.push(class_dir(c, split.expect("checked"), opts)?);
            }
        }
    } else if splits.iter().any(Option::is_some) {
        let names: Vec<String> = top.iter().map(|d| name_of(d)).collect();
        return Err(IngestError::invalid(
            root,
            format!("mixes split folders and class folders: [{}]", names.join(", ")),
        ));
    } else {
        for d in top {
            dirs.push(class_dir(d, opts.split, opts)?);
        }
    }
    let rows = std::iter::repeat_with(|| Row::Skip)
        .take(skipped)
        .chain(dirs.into_iter().flat_map(|cd| walk(&cd.dir).into_iter().map(move |f| file_row(f, &cd))));
    Ok(Ingest::new(rows))
}

fn class_dir(dir: PathBuf, split: Split, opts: &FolderOptions) -> Result<ClassDir, IngestError> {
    let name = name_of(&dir);
    let label = opts.classes.index_of(&canonical_class(&name)).map(|i| i as u32);
    if label.is_none() && !opts.skip_unknown_classes {
        return Err(IngestError::invalid(
            &dir,
            format!("folder `{name}` is not one of the classes [{}]", opts.classes.names().join(", ")),
        ));
    }
    Ok(ClassDir { dir, label, split })
}

fn file_row(f: Result<PathBuf, Reject>, cd: &ClassDir) -> Row {
    match f {
        Err(r) => Row::Reject(r),
        Ok(path) => {
            let hidden = name_of(&path).starts_with('.');
            match cd.label {
                Some(label) if !hidden && is_image_name(&path) => Row::Face(Candidate {
                    path,
                    row: None,
                    box_xywh: None,
                    label: Some(label),
                    valence: None,
                    arousal: None,
                    split: cd.split,
                }),
                _ => Row::Skip,
            }
        }
    }
}

fn name_of(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Sorted non-hidden sub-folders of `dir`, and the number of other entries (loose files).
fn list(dir: &Path) -> Result<(Vec<PathBuf>, usize), IngestError> {
    let mut dirs = Vec::new();
    let mut loose = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| IngestError::io(dir, e))? {
        let entry = entry.map_err(|e| IngestError::io(dir, e))?;
        let path = entry.path();
        if path.is_dir() {
            if !name_of(&path).starts_with('.') {
                dirs.push(path);
            }
        } else {
            loose += 1;
        }
    }
    dirs.sort();
    Ok((dirs, loose))
}

/// Every file under `dir`, sorted, depth first; an unreadable folder becomes a reject.
fn walk(dir: &Path) -> Vec<Result<PathBuf, Reject>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>(),
        Err(e) => Err(e),
    };
    match entries {
        Err(e) => out.push(Err(Reject {
            source: dir.display().to_string(),
            row: None,
            reason: format!("cannot list folder: {e}"),
        })),
        Ok(mut paths) => {
            paths.sort();
            for p in paths {
                if p.is_dir() {
                    out.extend(walk(&p));
                } else {
                    out.push(Ok(p));
                }
            }
        }
    }
    out
}
