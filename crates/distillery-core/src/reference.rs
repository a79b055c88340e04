//! Locating the shared reference material (real faces, real teachers) that tests and examples use.
//!
//! The folder lives beside the checkout as `../shared/reference`; `DISTILLERY_REFERENCE` overrides.
//! Tests that need it call [`reference_dir`] and skip with a printed reason when it is `None`.

use std::path::PathBuf;

/// The reference folder, if present: `$DISTILLERY_REFERENCE`, else the first `shared/reference`
/// found beside the current directory or any of its ancestors (or those of `CARGO_MANIFEST_DIR`).
pub fn reference_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DISTILLERY_REFERENCE") {
        let p = PathBuf::from(p);
        return p.is_dir().then_some(p);
    }
    let starts = [std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from), std::env::current_dir().ok()];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let cand = dir.join("shared").join("reference");
            if cand.join("README.md").is_file() {
                return Some(cand);
            }
        }
    }
    None
}

/// `reference_dir()` or a skip message on stderr; use as
/// `let Some(dir) = distillery_core::reference::require("test name") else { return Ok(()) };`
pub fn require(what: &str) -> Option<PathBuf> {
    let dir = reference_dir();
    if dir.is_none() {
        #[allow(clippy::print_stderr)]
        {
            eprintln!("SKIPPED {what}: ../shared/reference not found (set DISTILLERY_REFERENCE)");
        }
    }
    dir
}
