//! Properties of the model over random inputs: every cache kind gives the logits of the
//! uncached computation, however the sequence is cut into chunks, padding never changes a
//! row's logits, and cutting a prompt into attention blocks and parallel runs changes nothing.

use crate::common::*;
use kv_core::{AttentionMask, CacheConfig, Execution};
use kv_model::{Logits, ModelConfig, PromptSplit, Transformer};
use proptest::prelude::*;

const VOCAB: usize = 40;

fn tiny(model_type: &str, sliding_window: Option<usize>) -> Transformer<B> {
    let mut json = match model_type {
        "gpt2" => serde_json::json!({
            "model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 16, "n_layer": 2, "n_head": 2,
            "n_positions": 64
        }),
        _ => serde_json::json!({
            "model_type": model_type, "vocab_size": VOCAB, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 24, "rope_theta": 10000.0
        }),
    };
    if let Some(window) = sliding_window {
        json["sliding_window"] = window.into();
    }
    let config = ModelConfig::from_hf_json(&json, "property").unwrap();
    Transformer::random(&config, 11, &device()).unwrap()
}

/// All-position logits of `tokens` without a cache.
fn uncached(model: &Transformer<B>, tokens: &[u32]) -> Vec<Vec<f32>> {
    let logits = model
        .forward_uncached(&[tokens.to_vec()], None, Logits::All)
        .unwrap();
    host_logits(logits).remove(0)
}

/// All-position logits of `tokens` fed through `cache` in chunks of the given sizes.
fn chunked(
    model: &Transformer<B>,
    cache: &CacheConfig,
    tokens: &[u32],
    cuts: &[usize],
) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(cache).unwrap();
    let mut rows = Vec::new();
    let mut start = 0;
    for &len in cuts {
        let end = (start + len).min(tokens.len());
        if start == end {
            continue;
        }
        let logits = model
            .forward(
                &[tokens[start..end].to_vec()],
                None,
                Some(&mut cache),
                Logits::All,
            )
            .unwrap();
        rows.extend(host_logits(logits).remove(0));
        start = end;
    }
    if start < tokens.len() {
        let logits = model
            .forward(
                &[tokens[start..].to_vec()],
                None,
                Some(&mut cache),
                Logits::All,
            )
            .unwrap();
        rows.extend(host_logits(logits).remove(0));
    }
    rows
}

fn tokens() -> impl Strategy<Value = Vec<u32>> {
    proptest::collection::vec(0..VOCAB as u32, 1..28)
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..6, 1..10)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Dynamic, static, and window/sink caches longer than the sequence equal no cache, for
    /// both families.
    #[test]
    fn exact_caches_equal_no_cache(tokens in tokens(), cuts in cuts(), gpt2 in any::<bool>()) {
        let model = tiny(if gpt2 { "gpt2" } else { "llama" }, None);
        let reference = uncached(&model, &tokens);
        for kind in exact_cache_kinds(32) {
            let diff = worst(&chunked(&model, &kind, &tokens, &cuts), &reference);
            prop_assert!(diff < 1e-4, "{kind:?}: {diff}");
        }
    }

    /// A sliding-window cache serving a model that attends over the same window (Mistral)
    /// equals that model without a cache, even once the cache has dropped old positions.
    #[test]
    fn sliding_cache_equals_the_windowed_model(tokens in tokens(), cuts in cuts(), window in 1usize..8) {
        let model = tiny("mistral", Some(window));
        let reference = uncached(&model, &tokens);
        let kinds = [CacheConfig::SlidingWindow { window }, CacheConfig::Dynamic { capacity: 4 }];
        for kind in kinds {
            let diff = worst(&chunked(&model, &kind, &tokens, &cuts), &reference);
            prop_assert!(diff < 1e-4, "{kind:?}: {diff}");
        }
    }

    /// int8 keys and values move logits only a little.
    #[test]
    fn quantized_cache_stays_close(tokens in tokens(), cuts in cuts()) {
        let model = tiny("llama", None);
        let reference = uncached(&model, &tokens);
        let diff = worst(&chunked(&model, &int8_cache(), &tokens, &cuts), &reference);
        prop_assert!(diff < 0.05, "{diff}");
    }

    /// Left padding changes nothing: each row of a padded batch, through a cache and decoded a
    /// few steps, has the logits of that row alone.
    #[test]
    fn left_padding_leaves_each_row_unchanged(
        long in proptest::collection::vec(0..VOCAB as u32, 2..12),
        short_len in 1usize..12,
        next in proptest::collection::vec(0..VOCAB as u32, 1..4),
        gpt2 in any::<bool>(),
    ) {
        let model = tiny(if gpt2 { "gpt2" } else { "llama" }, None);
        let short: Vec<u32> = long.iter().rev().take(short_len.min(long.len())).copied().collect();
        let pad = long.len() - short.len();
        let padded = [long.clone(), [vec![0; pad], short.clone()].concat()];
        let mut mask = AttentionMask::left_padded(&[long.len(), short.len()], long.len()).unwrap();
        let mut cache = model.new_cache(&CacheConfig::Dynamic { capacity: 8 }).unwrap();
        let mut batch_rows = vec![host_logits(model
            .forward(&padded, Some(&mask), Some(&mut cache), Logits::Last)
            .unwrap())];
        for &token in &next {
            mask.extend(1);
            batch_rows.push(host_logits(model
                .forward(&[vec![token], vec![token]], Some(&mask), Some(&mut cache), Logits::Last)
                .unwrap()));
        }
        for (row, alone) in [long, short].into_iter().enumerate() {
            for (step, logits) in batch_rows.iter().enumerate() {
                let sequence = [alone.clone(), next[..step].to_vec()].concat();
                let want = uncached(&model, &sequence);
                let diff = max_abs_diff(&logits[row][0], want.last().unwrap());
                prop_assert!(diff < 1e-4, "row {row}, step {step}: {diff}");
            }
        }
    }

    /// A prompt cut into blocks of attention queries and runs of positions computed on
    /// rayon's threads gives the logits of the whole computed in one piece, through every
    /// exact cache kind and fed in chunks, for both families and a windowed model.
    #[test]
    fn split_prompts_equal_the_whole(
        tokens in proptest::collection::vec(0..VOCAB as u32, 1..48),
        cuts in proptest::collection::vec(1usize..20, 1..4),
        queries_per_block in 1usize..9,
        min_positions_per_run in 1usize..9,
        family in 0usize..3,
    ) {
        let (whole, kinds) = match family {
            0 => (tiny("gpt2", None), exact_cache_kinds(64)),
            1 => (tiny("llama", None), exact_cache_kinds(64)),
            // A model with a window of its own takes window caches, not sinks.
            _ => (
                tiny("mistral", Some(5)),
                vec![CacheConfig::SlidingWindow { window: 5 }, CacheConfig::Dynamic { capacity: 4 }],
            ),
        };
        let split = whole
            .clone()
            .with_execution(Execution::Parallel)
            .with_prompt_split(PromptSplit { queries_per_block, min_positions_per_run });
        let reference = uncached(&whole, &tokens);
        let diff = worst(&uncached(&split, &tokens), &reference);
        prop_assert!(diff < 1e-5, "no cache: {diff}");
        for kind in kinds {
            let diff = worst(&chunked(&split, &kind, &tokens, &cuts), &reference);
            prop_assert!(diff < 1e-4, "{kind:?}: {diff}");
        }
    }

    /// The same for a left-padded batch through a cache.
    #[test]
    fn split_padded_batches_equal_the_whole(
        long in proptest::collection::vec(0..VOCAB as u32, 2..40),
        short_len in 1usize..40,
        queries_per_block in 1usize..9,
        min_positions_per_run in 1usize..9,
        gpt2 in any::<bool>(),
    ) {
        let whole = tiny(if gpt2 { "gpt2" } else { "llama" }, None);
        let split = whole
            .clone()
            .with_execution(Execution::Parallel)
            .with_prompt_split(PromptSplit { queries_per_block, min_positions_per_run });
        let short: Vec<u32> = long.iter().rev().take(short_len.min(long.len())).copied().collect();
        let padded = [long.clone(), [vec![0; long.len() - short.len()], short.clone()].concat()];
        let mask = AttentionMask::left_padded(&[long.len(), short.len()], long.len()).unwrap();
        let logits = |model: &Transformer<B>| {
            let mut cache = model.new_cache(&CacheConfig::Dynamic { capacity: 8 }).unwrap();
            host_logits(model.forward(&padded, Some(&mask), Some(&mut cache), Logits::All).unwrap())
        };
        let (a, b) = (logits(&whole), logits(&split));
        for row in 0..2 {
            let diff = worst(&a[row], &b[row]);
            prop_assert!(diff < 1e-5, "row {row}: {diff}");
        }
    }
}
