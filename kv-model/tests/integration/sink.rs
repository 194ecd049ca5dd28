//! Attention sinks done as StreamingLLM defines them, for every rotary scheme, and the model's
//! position limit: a sink cache that re-rotates its keys runs past it, every other cache is
//! refused there with an error naming it.
//!
//! StreamingLLM's definition: once tokens are evicted, the model attends over the sinks and
//! the window placed at positions `0..kept`, as if the kept tokens were the whole text. For a
//! one-layer model that is exactly a no-cache forward pass over the kept tokens (its keys and
//! values depend only on each token), which the first property checks. Deeper layers' keys
//! and values carry the context each token had when it was computed, in StreamingLLM's own
//! implementation as here, so no recomputation reproduces them; for those the properties are
//! that chunking never changes the logits and that nothing changes before the first eviction.

use crate::common::*;
use kv_core::{AttentionMask, CacheConfig, SinkPositions};
use kv_model::{Logits, ModelConfig, ModelError, Transformer};
use proptest::prelude::*;

const VOCAB: usize = 40;

/// A random Llama with `layers` layers and the given rope settings (JSON fields merged in).
fn llama(layers: usize, rope: &serde_json::Value, max_positions: usize) -> Transformer<B> {
    let mut json = serde_json::json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 16,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 24, "rope_theta": 10000.0,
        "max_position_embeddings": max_positions
    });
    for (key, value) in rope.as_object().unwrap() {
        json[key] = value.clone();
    }
    let config = ModelConfig::from_hf_json(&json, "sink test").unwrap();
    Transformer::random(&config, 7, &device()).unwrap()
}

/// Default RoPE, linear scaling and Llama 3.1's scaling.
fn ropes() -> Vec<serde_json::Value> {
    vec![
        serde_json::json!({}),
        serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
        serde_json::json!({"rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16
        }}),
    ]
}

fn sink(sinks: usize, window: usize) -> CacheConfig {
    CacheConfig::Sink {
        sinks,
        window,
        positions: SinkPositions::CacheRanks,
    }
}

/// Logits of every position of `tokens` fed through `cache` in chunks of the given sizes.
fn chunked(
    model: &Transformer<B>,
    cache: &CacheConfig,
    tokens: &[u32],
    cuts: &[usize],
) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(cache).unwrap();
    let mut rows = Vec::new();
    let mut start = 0;
    let mut cuts = cuts.iter().cycle();
    while start < tokens.len() {
        let end = (start + cuts.next().unwrap()).min(tokens.len());
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
    rows
}

/// Last-position logits of `tokens` with no cache, at positions `0..tokens.len()`.
fn uncached_last(model: &Transformer<B>, tokens: &[u32]) -> Vec<f32> {
    let logits = model
        .forward_uncached(&[tokens.to_vec()], None, Logits::Last)
        .unwrap();
    host_logits(logits).remove(0).remove(0)
}

/// The tokens a sink cache holds once it has seen `tokens`: the first `sinks` and the last
/// `window`.
fn kept(tokens: &[u32], sinks: usize, window: usize) -> Vec<u32> {
    let seen = tokens.len();
    let window_start = seen.saturating_sub(window).max(sinks.min(seen));
    tokens[..sinks.min(seen)]
        .iter()
        .chain(&tokens[window_start..])
        .copied()
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// After any number of evictions, each position's logits through the sink cache equal a
    /// no-cache pass over exactly the tokens kept at that point, placed at `0..kept`, with
    /// default, linear and llama3 rope, however the text is cut into chunks.
    #[test]
    fn sink_cache_is_streaming_llm_over_the_kept_tokens(
        tokens in proptest::collection::vec(0..VOCAB as u32, 1..40),
        cuts in proptest::collection::vec(1usize..9, 1..5),
        sinks in 0usize..4,
        window in 1usize..8,
    ) {
        for rope in ropes() {
            let model = llama(1, &rope, 64);
            let rows = chunked(&model, &sink(sinks, window), &tokens, &cuts);
            for (t, row) in rows.iter().enumerate() {
                let want = uncached_last(&model, &kept(&tokens[..=t], sinks, window));
                let diff = max_abs_diff(row, &want);
                prop_assert!(diff < 1e-4, "{rope}, position {t}: {diff}");
            }
        }
    }

    /// In a deeper model, a sink cache gives the same logits however the text is cut into
    /// chunks (token by token is StreamingLLM's own loop), and before it first evicts it is
    /// exactly the model without a cache.
    #[test]
    fn deep_sink_cache_is_independent_of_chunking(
        tokens in proptest::collection::vec(0..VOCAB as u32, 1..32),
        cuts in proptest::collection::vec(1usize..12, 1..5),
        sinks in 0usize..4,
        window in 1usize..10,
        rope in 0usize..3,
    ) {
        let model = llama(2, &ropes()[rope], 64);
        let kind = sink(sinks, window);
        let one_by_one = chunked(&model, &kind, &tokens, &[1]);
        let diff = worst(&chunked(&model, &kind, &tokens, &cuts), &one_by_one);
        prop_assert!(diff < 1e-4, "chunked: {diff}");
        let before_eviction = tokens.len().min(sinks + window);
        let exact = chunked(&model, &CacheConfig::Dynamic { capacity: 4 }, &tokens[..before_eviction], &[before_eviction]);
        let diff = worst(&one_by_one[..before_eviction], &exact);
        prop_assert!(diff < 1e-4, "before eviction: {diff}");
    }
}

/// The reference Llama fixture was built for 128 positions. Through a sink cache it runs on
/// past them; without a cache, or through a cache that keeps text positions, the first
/// position past them is refused with an error that names the limit.
#[test]
fn only_a_re_rotating_sink_cache_runs_past_the_model_context() {
    let model = load("llama");
    let max = model.config().max_positions;
    assert_eq!(max, 128);
    let tokens: Vec<u32> = (0..max as u32 + 40).map(|i| (i * 7 + 3) % 89).collect();

    let mut cache = model.new_cache(&sink(4, 28)).unwrap();
    for chunk in tokens.chunks(50) {
        let logits = model
            .forward(&[chunk.to_vec()], None, Some(&mut cache), Logits::Last)
            .unwrap();
        assert!(host_logits(logits)[0][0].iter().all(|v| v.is_finite()));
    }
    assert_eq!(cache.seq_len(), max + 40);

    let text_positions = CacheConfig::Sink {
        sinks: 4,
        window: 28,
        positions: SinkPositions::TextPositions,
    };
    let refusing = [
        CacheConfig::Dynamic { capacity: 16 },
        CacheConfig::SlidingWindow { window: 32 },
        text_positions,
    ];
    for kind in refusing {
        let mut cache = model.new_cache(&kind).unwrap();
        let err = model
            .forward(
                std::slice::from_ref(&tokens),
                None,
                Some(&mut cache),
                Logits::Last,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::SequenceTooLong {
                    position: 128,
                    max: 128
                }
            ),
            "{kind:?}: {err}"
        );
        assert!(err.to_string().contains("128 positions"), "{err}");
        // Step by step, the refusal comes exactly at the first position past the limit.
        let mut cache = model.new_cache(&kind).unwrap();
        model
            .forward(
                &[tokens[..max].to_vec()],
                None,
                Some(&mut cache),
                Logits::Last,
            )
            .unwrap();
        let err = model
            .forward(&[vec![tokens[max]]], None, Some(&mut cache), Logits::Last)
            .unwrap_err();
        assert!(
            matches!(err, ModelError::SequenceTooLong { position: 128, .. }),
            "{err}"
        );
    }
    let err = model
        .forward_uncached(std::slice::from_ref(&tokens), None, Logits::Last)
        .unwrap_err();
    assert!(matches!(err, ModelError::SequenceTooLong { .. }), "{err}");
}

/// A sink cache cannot re-rotate the keys of a model with learned positions, nor hold more
/// positions than the model has, nor take padded rows: each is a clear error, not a panic.
#[test]
fn sink_caches_that_cannot_work_are_refused() {
    let gpt2 = load("gpt2");
    assert_eq!(gpt2.config().sink_positions(), SinkPositions::TextPositions);
    let err = gpt2.new_cache(&sink(4, 8)).unwrap_err();
    assert!(matches!(err, ModelError::SinkNeedsRotary { .. }), "{err}");
    assert!(err.to_string().contains("learned positions"), "{err}");
    // Keys at text positions work until GPT-2's table ends.
    let n_positions = gpt2.config().max_positions;
    let mut cache = gpt2
        .new_cache(&CacheConfig::Sink {
            sinks: 2,
            window: 6,
            positions: SinkPositions::TextPositions,
        })
        .unwrap();
    let tokens: Vec<u32> = (0..n_positions as u32 + 1).map(|i| i % 50).collect();
    gpt2.forward(
        &[tokens[..n_positions].to_vec()],
        None,
        Some(&mut cache),
        Logits::Last,
    )
    .unwrap();
    let err = gpt2
        .forward(
            &[vec![tokens[n_positions]]],
            None,
            Some(&mut cache),
            Logits::Last,
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::SequenceTooLong { .. }), "{err}");

    let llama = load("llama");
    assert_eq!(llama.config().sink_positions(), SinkPositions::CacheRanks);
    let err = llama.new_cache(&sink(8, 121)).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::CacheLongerThanModel {
                held: 129,
                max: 128
            }
        ),
        "{err}"
    );
    let mut cache = llama.new_cache(&sink(2, 4)).unwrap();
    let mask = AttentionMask::left_padded(&[3, 2], 3).unwrap();
    let err = llama
        .forward(
            &[vec![1, 2, 3], vec![0, 2, 3]],
            Some(&mask),
            Some(&mut cache),
            Logits::Last,
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::PaddedSink), "{err}");
}
