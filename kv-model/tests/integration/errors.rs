//! Bad input is a typed error that names the file, tensor or value at fault, never a panic.

use std::path::{Path, PathBuf};

use crate::common::*;
use kv_core::{AttentionMask, CacheConfig};
use kv_model::{load_model, Logits, ModelConfig, ModelError, Transformer, Weights};
use proptest::prelude::*;

/// A scratch copy of a fixture directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(name: &str, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kv-model-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
        Self(dir)
    }

    fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = self.0.join("config.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(&path, json.to_string()).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_err(path: &Path) -> ModelError {
    load_model::<B>(path, &device()).unwrap_err()
}

#[test]
fn a_shape_that_disagrees_with_the_config_names_the_tensor() {
    let scratch = Scratch::copy_of("llama", "shape");
    scratch.edit_config(|c| c["intermediate_size"] = 48.into());
    let err = load_err(&scratch.0);
    match &err {
        ModelError::TensorShape {
            tensor,
            expected,
            found,
            ..
        } => {
            assert_eq!(tensor, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(
                (expected.as_slice(), found.as_slice()),
                (&[48, 32][..], &[64, 32][..])
            );
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("gate_proj"));
}

#[test]
fn a_missing_tensor_is_named() {
    let scratch = Scratch::copy_of("llama", "missing");
    scratch.edit_config(|c| c["tie_word_embeddings"] = false.into());
    // The llama fixture is untied; pretend an extra layer exists instead.
    scratch.edit_config(|c| c["num_hidden_layers"] = 3.into());
    let err = load_err(&scratch.0);
    assert!(
        matches!(&err, ModelError::MissingTensor { tensor, .. } if tensor.starts_with("model.layers.2.")),
        "{err}"
    );
}

#[test]
fn unknown_architectures_and_bad_configs_are_refused() {
    let scratch = Scratch::copy_of("gpt2", "arch");
    scratch.edit_config(|c| c["model_type"] = "bert".into());
    let err = load_err(&scratch.0);
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture { architecture, .. } if architecture == "bert")
    );
    // The message names what is supported.
    for name in ["llama", "qwen3", "gemma2", "gemma3_text", "phi3"] {
        assert!(err.to_string().contains(name), "{err}");
    }

    scratch.edit_config(|c| {
        c["model_type"] = "llama".into();
    });
    let err = load_err(&scratch.0);
    assert!(err.to_string().contains("hidden_size"), "{err}");

    std::fs::write(scratch.0.join("config.json"), "{ not json").unwrap();
    assert!(matches!(load_err(&scratch.0), ModelError::Json { .. }));

    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 3, "intermediate_size": 8
    });
    let err = ModelConfig::from_hf_json(&json, "inline").unwrap_err();
    assert!(err.to_string().contains("num_kv_heads (3)"), "{err}");
}

#[test]
fn missing_weights_and_unsupported_dtypes_name_the_file() {
    let scratch = Scratch::copy_of("gpt2", "weights");
    std::fs::remove_file(scratch.0.join("model.safetensors")).unwrap();
    let err = load_err(&scratch.0);
    assert!(matches!(err, ModelError::Io { .. }) && err.to_string().contains("model.safetensors"));

    let data = vec![0u8; 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1], &data).unwrap();
    let bytes = safetensors::serialize([("ids", view)], None).unwrap();
    let mut weights = Weights::new("ints");
    let err = kv_model::read_safetensors_bytes(&bytes, Path::new("ints.safetensors"), &mut weights)
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedDtype { tensor, .. } if tensor == "ids"),
        "{err}"
    );
}

#[test]
fn forward_rejects_bad_input_with_the_numbers() {
    let model = load("gpt2");
    let forward = |tokens: &[Vec<u32>], mask: Option<&AttentionMask>| {
        model.forward_uncached(tokens, mask, Logits::Last)
    };

    let err = forward(&[vec![1, 2, 96]], None).unwrap_err();
    assert!(matches!(
        err,
        ModelError::TokenOutOfRange {
            id: 96,
            row: 0,
            position: 2,
            vocab: 96
        }
    ));

    let err = forward(&[vec![1, 2], vec![3]], None).unwrap_err();
    assert!(err.to_string().contains("row 1 has 1 tokens"), "{err}");

    assert!(matches!(
        forward(&[vec![]], None),
        Err(ModelError::NoTokens)
    ));
    assert!(matches!(forward(&[], None), Err(ModelError::NoTokens)));

    let mask = AttentionMask::ones(1, 5);
    let err = forward(&[vec![1, 2, 3]], Some(&mask)).unwrap_err();
    assert!(err.to_string().contains("1x5"), "{err}");

    // GPT-2 has 64 learned positions: the 65th is an error, not a wrap.
    let err = forward(&[vec![5; 65]], None).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::SequenceTooLong {
                position: 64,
                max: 64
            }
        ),
        "{err}"
    );
    let mut cache = model
        .new_cache(&CacheConfig::SlidingWindow { window: 8 })
        .unwrap();
    model
        .forward(&[vec![5; 64]], None, Some(&mut cache), Logits::Last)
        .unwrap();
    let err = model
        .forward(&[vec![5]], None, Some(&mut cache), Logits::Last)
        .unwrap_err();
    assert!(
        matches!(err, ModelError::SequenceTooLong { position: 64, .. }),
        "{err}"
    );
}

#[test]
fn cache_errors_surface_through_the_model() {
    let model = load("llama");
    let mut cache = model
        .new_cache(&CacheConfig::Static {
            max_batch: 1,
            max_len: 4,
        })
        .unwrap();
    model
        .forward(&[vec![1, 2, 3]], None, Some(&mut cache), Logits::Last)
        .unwrap();
    let err = model
        .forward(&[vec![4, 5]], None, Some(&mut cache), Logits::Last)
        .unwrap_err();
    assert!(matches!(err, ModelError::Cache(_)), "{err}");
}

#[test]
fn random_models_build_from_any_valid_config() {
    let json = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 50, "hidden_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 40,
        "tie_word_embeddings": true
    });
    let config = ModelConfig::from_hf_json(&json, "inline").unwrap();
    let model = Transformer::<B>::random(&config, 3, &device()).unwrap();
    let logits = model
        .forward_uncached(&[vec![1, 2, 3]], None, Logits::All)
        .unwrap();
    assert_eq!(logits.dims(), [1, 3, 50]);
    let values = logits.to_data().to_vec::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    assert!(
        values.iter().any(|&v| v != values[0]),
        "random weights give varied logits"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Mutated safetensors files: an error or tensors, never a panic.
    #[test]
    fn mutated_safetensors_never_panic(
        edits in proptest::collection::vec((0usize..2048, any::<u8>()), 1..8),
        cut in 0usize..4096,
    ) {
        let mut bytes = std::fs::read(fixtures().join("qwen2/model.safetensors")).unwrap();
        for (at, value) in edits {
            let at = at % bytes.len();
            bytes[at] = value;
        }
        bytes.truncate(bytes.len().saturating_sub(cut));
        let mut weights = Weights::new("fuzz");
        let _ = kv_model::read_safetensors_bytes(&bytes, Path::new("fuzz.safetensors"), &mut weights);
    }
}
