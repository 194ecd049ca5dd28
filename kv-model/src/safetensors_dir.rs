//! Hugging Face model directories: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), `generation_config.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::{token_ids, ModelConfig};
use crate::error::{ModelError, Result};
use crate::weights::{HostTensor, Weights};

/// The safetensors files of a directory: the single file, or every shard of the index.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(ModelError::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor model.safetensors.index.json is in this directory",
            ),
        ));
    }
    let index = read_json(&index_path)?;
    let shards: BTreeSet<&str> = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::Json {
            path: index_path.clone(),
            message: "no `weight_map` object".into(),
        })?
        .values()
        .filter_map(Value::as_str)
        .collect();
    Ok(shards.into_iter().map(|shard| dir.join(shard)).collect())
}

/// Reads every tensor of `files` into f32 host tensors (F32, F16 and BF16 are read).
pub fn read_safetensors(files: &[PathBuf], source_name: &str) -> Result<Weights> {
    let mut weights = Weights::new(source_name);
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        read_safetensors_bytes(&bytes, path, &mut weights)?;
    }
    Ok(weights)
}

/// Parses one safetensors file's bytes into `weights`. Never panics on malformed input.
pub fn read_safetensors_bytes(bytes: &[u8], path: &Path, weights: &mut Weights) -> Result<()> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    for (name, view) in file.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    tensor: name,
                    dtype: format!("{other:?} (F32, F16 and BF16 are read)"),
                })
            }
        };
        let shape = view.shape().to_vec();
        if shape.iter().product::<usize>() != values.len() {
            return Err(ModelError::Safetensors {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: shape {shape:?} does not match its data"),
            });
        }
        weights.insert(name, HostTensor::new(shape, values));
    }
    Ok(())
}

/// A model directory's config, with `generation_config.json`'s EOS ids when present.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let mut config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        let json = read_json(&generation)?;
        if let Some(ids) = token_ids(json.get("eos_token_id")) {
            config.eos_token_ids = ids;
        }
    }
    Ok(config)
}

/// Reads and parses a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
