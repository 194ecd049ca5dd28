//! The tiny GPT-2, Llama (GQA, llama3 rope scaling) and Qwen2 (qkv bias, bf16, tied head)
//! fixtures against the logits and greedy tokens transformers recorded for them
//! (`scripts/make_fixtures.py`).

mod common;

use common::*;
use kv_core::AnyCache;
use kv_model::{load_model, Logits, ModelConfig, Transformer};
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

fn expected(model: &str) -> Value {
    read_json(&format!("{model}/expected.json"))
}

fn check_prompt_logits(model: &Transformer<B>, expected: &Value) {
    let prompt = ids(&expected["prompt"]);
    let logits = model
        .forward::<AnyCache<B>>(std::slice::from_ref(&prompt), None, None, Logits::All)
        .unwrap();
    let rows = &host_logits(logits)[0];
    assert_eq!(rows.len(), prompt.len());
    let last = floats(&expected["last_logits"]);
    let diff = max_abs_diff(rows.last().unwrap(), &last);
    assert!(diff < TOLERANCE, "last-position logits differ by {diff}");
    for (position, row) in rows.iter().enumerate() {
        let top_ids = ids(&expected["top5_ids"][position]);
        let top_logits = floats(&expected["top5_logits"][position]);
        for (id, logit) in top_ids.iter().zip(&top_logits) {
            let ours = row[*id as usize];
            assert!(
                (ours - logit).abs() < TOLERANCE,
                "position {position}, token {id}: {ours} vs {logit}"
            );
        }
        assert_eq!(argmax(row), top_ids[0], "argmax at position {position}");
    }

    // Last-only logits are the last row of all logits.
    let last_only = model
        .forward::<AnyCache<B>>(&[prompt], None, None, Logits::Last)
        .unwrap();
    assert_eq!(last_only.dims(), [1, 1, last.len()]);
    assert!(max_abs_diff(&host_logits(last_only)[0][0], rows.last().unwrap()) < 1e-6);
}

fn check_greedy(model: &Transformer<B>, expected: &Value) {
    let prompt = ids(&expected["prompt"]);
    let reference = ids(&expected["greedy_with_cache"]);
    assert_eq!(reference, ids(&expected["greedy_without_cache"]));
    let steps = reference.len();
    assert_eq!(
        greedy_uncached(model, &prompt, steps),
        reference,
        "no cache"
    );
    for kind in exact_cache_kinds(prompt.len() + steps) {
        let mut cache = model.new_cache(&kind).unwrap();
        let tokens = greedy_cached(model, &mut cache, &prompt, steps);
        assert_eq!(tokens, reference, "cache {kind:?}");
        assert_eq!(cache.seq_len(), prompt.len() + steps - 1);
    }
}

fn check_padded_batch(model: &Transformer<B>, expected: &Value) {
    let batch = &expected["padded_batch"];
    let tokens: Vec<Vec<u32>> = batch["ids"].as_array().unwrap().iter().map(ids).collect();
    let mask = padding(&batch["attention_mask"]);
    let want: Vec<Vec<f32>> = batch["last_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();

    // Without a cache, and through a cache (prefill, as a generation loop would start).
    let uncached = model
        .forward::<AnyCache<B>>(&tokens, Some(&mask), None, Logits::Last)
        .unwrap();
    let mut cache = model
        .new_cache(&kv_core::CacheConfig::Dynamic { capacity: 16 })
        .unwrap();
    let cached = model
        .forward(&tokens, Some(&mask), Some(&mut cache), Logits::Last)
        .unwrap();
    for logits in [uncached, cached] {
        let rows = host_logits(logits);
        for (row, want) in rows.iter().zip(&want) {
            let diff = max_abs_diff(&row[0], want);
            assert!(diff < TOLERANCE, "padded batch logits differ by {diff}");
        }
    }
}

fn check_all(name: &str) {
    let model = load(name);
    let expected = expected(name);
    check_prompt_logits(&model, &expected);
    check_greedy(&model, &expected);
    check_padded_batch(&model, &expected);
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
            .forward::<AnyCache<B>>(&[sequence.clone()], None, None, Logits::Last)
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
