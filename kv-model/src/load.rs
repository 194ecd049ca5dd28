//! One entry point for loading a model from disk, whatever its format.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::error::{ModelError, Result};
use crate::gguf::{config_from_gguf, weights_from_gguf, GgufFile};
use crate::placement::WeightPlacement;
use crate::safetensors_dir::{read_config, read_safetensors, safetensors_files};
use crate::tokenizer::Tokenizer;
use crate::transformer::Transformer;

/// A model with its tokenizer, as loaded from disk.
#[derive(Debug, Clone)]
pub struct LoadedModel<B: Backend> {
    /// The network.
    pub model: Transformer<B>,
    /// Its tokenizer, if the files have one (`tokenizer.json` in a directory, or tokenizer
    /// metadata in a GGUF).
    pub tokenizer: Option<Tokenizer>,
    /// Where it came from.
    pub source: PathBuf,
    /// One-line notices about how the files were read (a GGUF type requantized at load), for
    /// the program to show its user.
    pub notes: Vec<String>,
}

/// Loads a Hugging Face model directory or a `.gguf` file onto `device`.
///
/// ```
/// use burn_ndarray::NdArray;
/// use kv_model::{load_model, ModelError};
///
/// let missing = load_model::<NdArray>("no/such/model".as_ref(), &Default::default());
/// assert!(matches!(missing, Err(ModelError::Io { .. })));
/// ```
pub fn load_model<B: Backend>(path: &Path, device: &B::Device) -> Result<LoadedModel<B>> {
    load_model_placed(path, WeightPlacement::default(), device)
}

/// [`load_model`] with the matrices placed as `placement` says: on the device as f32 or f16,
/// or in host memory in a kv-kernels format, where [`WeightFormat::Native`] keeps a GGUF's
/// matrices in the file's own blocks (resident memory about the file's size; the types
/// without a kernel are requantized, and [`LoadedModel::notes`] says so).
///
/// [`WeightFormat::Native`]: crate::WeightFormat::Native
pub fn load_model_placed<B: Backend>(
    path: &Path,
    placement: WeightPlacement,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    if path.is_dir() {
        let config = read_config(path)?;
        let files = safetensors_files(path)?;
        let weights = read_safetensors(&files, &path.display().to_string())?;
        let tokenizer_path = path.join("tokenizer.json");
        let tokenizer = if tokenizer_path.is_file() {
            Some(Tokenizer::from_file(&tokenizer_path)?)
        } else {
            None
        };
        let notes = weights.notes().to_vec();
        return Ok(LoadedModel {
            model: Transformer::from_weights_placed(&config, weights, placement, device)?,
            tokenizer,
            source: path.to_path_buf(),
            notes,
        });
    }
    if !path.exists() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or directory (expected a Hugging Face model directory or a .gguf file)",
            ),
        ));
    }
    let file = GgufFile::open(path)?;
    let config = config_from_gguf(&file)?;
    let weights = weights_from_gguf(&file, &config)?;
    let tokenizer = match file.get("tokenizer.ggml.tokens") {
        Some(_) => Some(Tokenizer::from_gguf(&file)?),
        None => None,
    };
    // The weights hold copies of every tensor they keep: the file's bytes can go before the
    // model is built, so a native load peaks at about twice the file and settles at one.
    drop(file);
    let notes = weights.notes().to_vec();
    Ok(LoadedModel {
        model: Transformer::from_weights_placed(&config, weights, placement, device)?,
        tokenizer,
        source: path.to_path_buf(),
        notes,
    })
}
