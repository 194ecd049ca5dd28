//! The tiny GPT-2, Llama (GQA, llama3 rope scaling), Qwen2 (qkv bias, bf16, tied head), Qwen3
//! (Q/K norms), Gemma 3 (sliding and full layers, a window shorter than the prompt), Phi-3
//! (with full and partial rotary) and Gemma 2 (soft-capped attention scores and logits)
//! fixtures against the logits and greedy tokens transformers recorded for them
//! (`scripts/make_fixtures.py`), on both CPU backends: burn-flex (the default) and
//! burn-ndarray.

use crate::common::*;
use burn::tensor::backend::Backend;
use kv_core::Execution;
use kv_model::{load_model, Logits, ModelConfig, PromptSplit};

const TOLERANCE: f32 = 1e-4;

fn check_all(name: &str) {
    reference::check_all(&load_on::<B>(name), &expected(name), TOLERANCE);
    reference::check_all(&load_on::<Ndarray>(name), &expected(name), TOLERANCE);
}

#[test]
fn gpt2_matches_transformers() {
    check_all("gpt2");
}

#[test]
fn llama_with_gqa_and_llama3_rope_matches_transformers() {
    check_all("llama");
}

#[test]
fn qwen2_with_qkv_bias_from_bf16_matches_transformers() {
    check_all("qwen2");
}

#[test]
fn qwen3_with_qk_norms_matches_transformers() {
    check_all("qwen3");
}

/// Gemma 3: four sliding layers (window 4, under a prompt of 8 and 32 new tokens) and two
/// full ones with their own rotary base, Q/K and sandwich norms, `1 + w` weights, GeGLU,
/// scaled embeddings and a `query_pre_attn_scalar` of 24 for heads of 16. Every exact cache
/// kind gives its sliding layers a ring of 4 slots (the hybrid cache).
#[test]
fn gemma3_with_sliding_and_full_layers_matches_transformers() {
    check_all("gemma3");
    let model = load("gemma3");
    let cache = model
        .new_cache(&kv_core::CacheConfig::Dynamic { capacity: 64 })
        .unwrap();
    let windows: Vec<Option<usize>> = cache
        .layers()
        .iter()
        .map(kv_core::KvCache::max_len)
        .collect();
    assert_eq!(windows, [Some(4), Some(4), None, Some(4), Some(4), None]);
}

/// Phi-3: Q/K/V and gate/up stored fused, LongRoPE's short factors and attention factor, and
/// a window of 6 on every layer (a ring of 6 slots in every exact cache kind).
#[test]
fn phi3_with_longrope_and_fused_projections_matches_transformers() {
    check_all("phi3");
}

/// Phi-4-mini's rotary: 12 of each head's 16 channels rotated, with LongRoPE factors for
/// those 6 frequencies and the attention factor on the rotated channels only; the Q/K
/// channels are reordered at load so the full rotary tables serve.
#[test]
fn phi3_with_partial_rotary_matches_transformers() {
    check_all("phi4");
    assert_eq!(load("phi4").config().variations.rotary_dim, Some(12));
}

/// Gemma 2: sliding (window 4) and full layers alternating, attention scores soft-capped at 2
/// and logits at 4 (caps that bend every value: without the attention cap transformers'
/// logits move by 0.7), sandwich norms, GeGLU and scaled embeddings. Soft-capping runs in
/// every attention path: the host kernels, the blocked plan, split keys, and the quantized
/// cache (which then attends over its widened keys, not in place).
#[test]
fn gemma2_with_soft_capping_matches_transformers() {
    check_all("gemma2");
    let config = load("gemma2").config().clone();
    assert_eq!(config.variations.attn_logit_softcap, Some(2.0));
    assert_eq!(config.variations.final_logit_softcap, Some(4.0));
    assert_eq!(
        config.layer_attention,
        [
            kv_model::LayerAttention::Sliding,
            kv_model::LayerAttention::Full
        ]
        .repeat(2)
    );
    // An int8 cache: the prompt's logits within int8's error of transformers' (attention
    // without the cap would be off by tenths).
    let model = load("gemma2");
    let expected = expected("gemma2");
    let mut cache = model.new_cache(&int8_cache()).unwrap();
    let logits = model
        .forward(
            &[ids(&expected["prompt"])],
            None,
            Some(&mut cache),
            Logits::Last,
        )
        .unwrap();
    let diff = max_abs_diff(
        &host_logits(logits)[0][0],
        &floats(&expected["last_logits"]),
    );
    assert!(diff < 0.05, "int8 cache: logits differ by {diff}");
}

/// The same checks with every prompt cut into attention blocks of 3 queries and runs of 2
/// positions on rayon's threads, as CPU binaries run prompts (in blocks and runs of 64).
#[test]
fn prompts_split_across_threads_match_transformers() {
    fn check_split<Bk: Backend>(name: &str) {
        let split = PromptSplit {
            queries_per_block: 3,
            min_positions_per_run: 2,
        };
        let model = load_on::<Bk>(name)
            .with_execution(Execution::Parallel)
            .with_prompt_split(split);
        reference::check_all(&model, &expected(name), TOLERANCE);
    }
    for name in [
        "gpt2", "llama", "qwen2", "qwen3", "gemma3", "phi3", "gemma2",
    ] {
        check_split::<B>(name);
        check_split::<Ndarray>(name);
    }
}

#[test]
fn v4_and_v5_configs_read_the_same() {
    let dir = fixtures().join("llama");
    let v5 = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let v4 = ModelConfig::from_hf_file(&dir.join("config.v4.json")).unwrap();
    assert_eq!(v4, v5);
    assert!(matches!(
        v5.rope.unwrap().scaling,
        kv_model::RopeScaling::Llama3 { .. }
    ));
    assert_eq!((v5.num_heads, v5.num_kv_heads, v5.head_dim), (4, 2, 8));
}

#[test]
fn generation_config_supplies_eos_ids() {
    let loaded = load_model::<B>(&fixtures().join("gpt2"), &device()).unwrap();
    assert_eq!(loaded.model.config().eos_token_ids, vec![1]);
    assert!(loaded.tokenizer.is_none());
}

#[test]
fn int8_quantized_cache_stays_close_to_the_reference() {
    let model = load("llama");
    let expected = expected("llama");
    let prompt = ids(&expected["prompt"]);
    let reference = ids(&expected["greedy_with_cache"]);
    // Teacher-force the reference tokens and compare each step's logits with no cache.
    let mut cache = model.new_cache(&int8_cache()).unwrap();
    let mut sequence = prompt.clone();
    let mut input = prompt;
    let mut worst = 0.0f32;
    for &next in &reference[..16] {
        let cached = model
            .forward(&[input], None, Some(&mut cache), Logits::Last)
            .unwrap();
        let full = model
            .forward_uncached(&[sequence.clone()], None, Logits::Last)
            .unwrap();
        worst = worst.max(max_abs_diff(
            &host_logits(cached)[0][0],
            &host_logits(full)[0][0],
        ));
        sequence.push(next);
        input = vec![next];
    }
    assert!(worst > 0.0, "int8 should not be bit-exact");
    assert!(worst < 0.05, "int8 cache moved logits by {worst}");
}
