//! The checked-in seed corpora of the fuzz targets (`fuzz/seeds/<target>/`),
//! so that tests can run every seed through the target's logic.

use std::path::{Path, PathBuf};

/// The repository's `fuzz/seeds` directory.
pub fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds")
}

/// Every seed of a target (file name and bytes), sorted by file name.
///
/// # Errors
/// When the directory or a file cannot be read.
pub fn seeds(target: &str) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(seeds_dir().join(target))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            out.push((name, std::fs::read(entry.path())?));
        }
    }
    out.sort();
    Ok(out)
}
