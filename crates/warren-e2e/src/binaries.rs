//! Finding the real `warren-controller`, `warren-worker` and `warren-sender`
//! executables.
//!
//! Cargo only tells a test where the binaries of its *own* package are
//! (`CARGO_BIN_EXE_*`), so these are found next to the running executable:
//! a test runs from `target/<profile>/deps/`, the bench from
//! `target/<profile>/`, and the workspace binaries sit in `target/<profile>/`.
//! `WARREN_BIN_DIR` overrides the directory.

use std::path::{Path, PathBuf};

use crate::HarnessError;

/// The executables an end-to-end run starts.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub controller: PathBuf,
    pub worker: PathBuf,
    pub sender: PathBuf,
}

/// Overrides where the binaries are looked for.
pub const BIN_DIR_ENV: &str = "WARREN_BIN_DIR";

impl Binaries {
    /// The binaries in `WARREN_BIN_DIR`, else next to the running executable.
    pub fn locate() -> Result<Self, HarnessError> {
        let dir = match std::env::var_os(BIN_DIR_ENV) {
            Some(dir) => PathBuf::from(dir),
            None => default_dir()?,
        };
        Self::in_dir(&dir)
    }

    /// The binaries in `dir`; an error names every one that is missing.
    pub fn in_dir(dir: &Path) -> Result<Self, HarnessError> {
        let binaries = Self {
            controller: dir.join("warren-controller"),
            worker: dir.join("warren-worker"),
            sender: dir.join("warren-sender"),
        };
        let missing: Vec<PathBuf> = [&binaries.controller, &binaries.worker, &binaries.sender]
            .into_iter()
            .filter(|path| !path.is_file())
            .cloned()
            .collect();
        if missing.is_empty() {
            Ok(binaries)
        } else {
            Err(HarnessError::MissingBinaries {
                dir: dir.to_path_buf(),
                missing,
            })
        }
    }
}

/// `target/<profile>/` for an executable in `target/<profile>/{deps,examples}/`
/// or `target/<profile>/`.
fn default_dir() -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe().map_err(|source| HarnessError::Io {
        context: "finding the running executable".into(),
        source,
    })?;
    let parent = exe.parent().unwrap_or(Path::new("."));
    let dir = match parent.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => parent.parent().unwrap_or(parent),
        _ => parent,
    };
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_are_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("warren-worker"), "").unwrap();
        let err = Binaries::in_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("warren-controller"), "{err}");
        assert!(err.contains("warren-sender"), "{err}");
        assert!(!err.contains("warren-worker"), "{err}");
        assert!(err.contains("cargo build --bins"), "{err}");
    }

    #[test]
    fn all_present_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["warren-controller", "warren-worker", "warren-sender"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let found = Binaries::in_dir(dir.path()).unwrap();
        assert_eq!(found.worker, dir.path().join("warren-worker"));
    }
}
