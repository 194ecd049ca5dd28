//! Saved prompt caches: a prompt's cached key/value blocks written to a file and read back,
//! as llama.cpp's slot save/restore does, so a long system prompt survives a restart.
//!
//! The file is safetensors (the format Hugging Face stores weights in): per layer
//! `layers.{i}.keys` and `layers.{i}.values`, f32 `[kv_heads, tokens, head_dim]`, and string
//! metadata: the format's name and version, the model's fingerprint (a hash of its files, the
//! weight format and the backend: keys computed by another model or at another precision must
//! not be reused), the dtype, the block size, the token ids, each layer's first held position
//! (past 0 for a sliding-window layer of a prefix longer than its window; zeros before it),
//! and a SHA-256 of the tensors' bytes. Reading checks each of these and says which one failed.
//!
//! Files live in one folder (`--prompt-cache-dir`); a name is a plain file name, so a request
//! cannot reach outside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kv_generate::engine::SavedPrefix;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

/// The format's name, in every file's metadata.
pub const FORMAT: &str = "kv-serve prompt cache";
/// The format's version: files of another version are refused.
pub const VERSION: &str = "1";

/// Why a prompt cache cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum PromptCacheError {
    /// A name with a path separator, a leading dot or other characters.
    #[error(
        "`{0}` is not a plain file name: use letters, digits, '.', '_' and '-' (not first), \
         at most 128 characters"
    )]
    BadName(String),
    /// No such file in the folder.
    #[error("no saved prompt cache `{0}` in the prompt cache folder")]
    NotFound(String),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Not a safetensors file, or not one of ours.
    #[error("`{name}` is not a prompt cache file: {why}")]
    NotACacheFile {
        /// The file's name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A file of another version of the format.
    #[error("`{name}` is a version {found} prompt cache; this server reads version {VERSION}")]
    Version {
        /// The file's name.
        name: String,
        /// Its version.
        found: String,
    },
    /// A file saved from another model, weight format or backend.
    #[error(
        "`{name}` was saved from another model ({found}); this server runs {expected}: its \
         keys and values do not apply here"
    )]
    OtherModel {
        /// The file's name.
        name: String,
        /// The fingerprint in the file.
        found: String,
        /// This server's.
        expected: String,
    },
    /// The tensors do not match their checksum or their stated shapes.
    #[error("`{name}` is corrupt: {why}")]
    Corrupt {
        /// The file's name.
        name: String,
        /// What does not match.
        why: String,
    },
}

/// `name` checked as a plain file name inside `folder`.
pub fn path_in(folder: &Path, name: &str) -> Result<PathBuf, PromptCacheError> {
    let plain = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain {
        return Err(PromptCacheError::BadName(name.to_string()));
    }
    Ok(folder.join(name))
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The file's bytes for `saved`, from the model `fingerprint`.
pub fn encode(saved: &SavedPrefix, fingerprint: &str) -> Vec<u8> {
    let n = saved.tokens.len();
    let shape = vec![saved.kv_heads, n, saved.head_dim];
    let mut tensors: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, (keys, values)) in saved.layers.iter().enumerate() {
        tensors.push((format!("layers.{i}.keys"), le_bytes(keys)));
        tensors.push((format!("layers.{i}.values"), le_bytes(values)));
    }
    let mut hash = Sha256::new();
    for (_, bytes) in &tensors {
        hash.update(bytes);
    }
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        ("model".to_string(), fingerprint.to_string()),
        ("dtype".to_string(), "f32".to_string()),
        ("block_size".to_string(), saved.block_size.to_string()),
        ("kv_heads".to_string(), saved.kv_heads.to_string()),
        ("head_dim".to_string(), saved.head_dim.to_string()),
        ("layers".to_string(), saved.layers.len().to_string()),
        (
            "layer_starts".to_string(),
            serde_json::to_string(&saved.layer_starts).expect("positions serialize"),
        ),
        (
            "tokens".to_string(),
            serde_json::to_string(&saved.tokens).expect("ids serialize"),
        ),
        ("sha256".to_string(), format!("{:x}", hash.finalize())),
    ]);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                .expect("shape and bytes agree by construction");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, Some(metadata)).expect("serializing to memory")
}

/// The prefix in a file's `bytes`, checked against the model `fingerprint`.
pub fn decode(
    name: &str,
    bytes: &[u8],
    fingerprint: &str,
) -> Result<SavedPrefix, PromptCacheError> {
    let not_ours = |why: String| PromptCacheError::NotACacheFile {
        name: name.to_string(),
        why,
    };
    let corrupt = |why: String| PromptCacheError::Corrupt {
        name: name.to_string(),
        why,
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| not_ours(e.to_string()))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| not_ours("no metadata".into()))?;
    let field = |key: &str| -> Result<&String, PromptCacheError> {
        meta.get(key)
            .ok_or_else(|| not_ours(format!("no `{key}` in its metadata")))
    };
    if field("format")? != FORMAT {
        return Err(not_ours(format!("its format is `{}`", field("format")?)));
    }
    if field("version")? != VERSION {
        return Err(PromptCacheError::Version {
            name: name.to_string(),
            found: field("version")?.clone(),
        });
    }
    if field("model")? != fingerprint {
        return Err(PromptCacheError::OtherModel {
            name: name.to_string(),
            found: field("model")?.clone(),
            expected: fingerprint.to_string(),
        });
    }
    if field("dtype")? != "f32" {
        return Err(not_ours(format!("its dtype is `{}`", field("dtype")?)));
    }
    let number = |key: &str| -> Result<usize, PromptCacheError> {
        field(key)?
            .parse()
            .map_err(|_| not_ours(format!("`{key}` is not a number")))
    };
    let (block_size, kv_heads, head_dim, layers) = (
        number("block_size")?,
        number("kv_heads")?,
        number("head_dim")?,
        number("layers")?,
    );
    let tokens: Vec<u32> = serde_json::from_str(field("tokens")?)
        .map_err(|e| not_ours(format!("`tokens` is not a list of ids: {e}")))?;
    // Files written before sliding-window layers were saved apart hold every layer from 0.
    let layer_starts: Vec<usize> = match meta.get("layer_starts") {
        Some(starts) => serde_json::from_str(starts)
            .map_err(|e| not_ours(format!("`layer_starts` is not a list of positions: {e}")))?,
        None => vec![0; layers],
    };
    if layer_starts.len() != layers {
        return Err(not_ours(format!(
            "{} layer starts for {layers} layers",
            layer_starts.len()
        )));
    }
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    let shape = [kv_heads, tokens.len(), head_dim];
    let mut hash = Sha256::new();
    let mut read = |key: String| -> Result<Vec<f32>, PromptCacheError> {
        let view = tensors
            .tensor(&key)
            .map_err(|_| corrupt(format!("no tensor `{key}`")))?;
        if view.dtype() != Dtype::F32 || view.shape() != shape {
            return Err(corrupt(format!(
                "`{key}` is {:?} {:?}, not F32 {shape:?}",
                view.dtype(),
                view.shape()
            )));
        }
        hash.update(view.data());
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let mut saved_layers = Vec::with_capacity(layers);
    for i in 0..layers {
        let keys = read(format!("layers.{i}.keys"))?;
        let values = read(format!("layers.{i}.values"))?;
        saved_layers.push((keys, values));
    }
    let sum = format!("{:x}", hash.finalize());
    if &sum != field("sha256")? {
        return Err(corrupt(format!(
            "its tensors' SHA-256 is {sum}, its metadata says {}",
            field("sha256")?
        )));
    }
    Ok(SavedPrefix {
        tokens,
        block_size,
        kv_heads,
        head_dim,
        layers: saved_layers,
        layer_starts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> SavedPrefix {
        SavedPrefix {
            tokens: vec![1, 2, 3, 4],
            block_size: 4,
            kv_heads: 2,
            head_dim: 3,
            layers: vec![
                ((0..24).map(|i| i as f32).collect(), vec![0.5; 24]),
                (vec![-1.0; 24], (0..24).map(|i| -(i as f32)).collect()),
            ],
            layer_starts: vec![0, 2],
        }
    }

    #[test]
    fn a_file_reads_back_as_written() {
        let bytes = encode(&prefix(), "model-a");
        assert_eq!(decode("a", &bytes, "model-a").unwrap(), prefix());
    }

    #[test]
    fn another_model_a_flipped_byte_and_garbage_are_refused_by_name() {
        let bytes = encode(&prefix(), "model-a");
        let e = decode("a", &bytes, "model-b").unwrap_err();
        assert!(matches!(e, PromptCacheError::OtherModel { .. }), "{e}");
        // The last bytes are the last tensor's data.
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        let e = decode("a", &flipped, "model-a").unwrap_err();
        assert!(e.to_string().contains("SHA-256"), "{e}");
        let e = decode("a", b"not a file at all", "model-a").unwrap_err();
        assert!(matches!(e, PromptCacheError::NotACacheFile { .. }), "{e}");
        let e = decode("a", &bytes[..bytes.len() - 8], "model-a").unwrap_err();
        assert!(
            matches!(
                e,
                PromptCacheError::Corrupt { .. } | PromptCacheError::NotACacheFile { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn names_cannot_leave_the_folder() {
        let folder = Path::new("caches");
        assert_eq!(path_in(folder, "sys.kvc").unwrap(), folder.join("sys.kvc"));
        for bad in [
            "../x",
            "a/b",
            "/etc/passwd",
            "..",
            ".hidden",
            "",
            "a\\b",
            "-rf",
        ] {
            assert!(path_in(folder, bad).is_err(), "{bad}");
        }
    }
}
