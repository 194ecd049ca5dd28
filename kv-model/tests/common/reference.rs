//! The checks against transformers' recorded outputs, generic over the backend so that the CPU
//! tests and the GPU tests (`tests/gpu.rs`) run the same assertions.

use burn::tensor::backend::Backend;
use kv_model::{Logits, Transformer};
use serde_json::Value;

use super::*;

/// Prompt logits (every position's top 5, the whole last row), greedy tokens with no cache and
/// every exact cache kind, and a left-padded batch, against `expected.json`.
pub fn check_all<Bk: Backend>(model: &Transformer<Bk>, expected: &Value, tolerance: f32) {
    check_prompt_logits(model, expected, tolerance);
    check_greedy(model, expected);
    check_padded_batch(model, expected, tolerance);
}

pub fn check_prompt_logits<Bk: Backend>(model: &Transformer<Bk>, expected: &Value, tolerance: f32) {
    let prompt = ids(&expected["prompt"]);
    let logits = model
        .forward_uncached(std::slice::from_ref(&prompt), None, Logits::All)
        .unwrap();
    let rows = &host_logits(logits)[0];
    assert_eq!(rows.len(), prompt.len());
    check_logit_values(rows, expected, tolerance);
    for (position, row) in rows.iter().enumerate() {
        let top_ids = ids(&expected["top5_ids"][position]);
        assert_eq!(argmax(row), top_ids[0], "argmax at position {position}");
    }

    // Last-only logits are the last row of all logits, to float rounding (the head's product
    // of one row and of many may take different kernels).
    let last_only = model
        .forward_uncached(&[prompt], None, Logits::Last)
        .unwrap();
    assert_eq!(last_only.dims(), [1, 1, rows.last().unwrap().len()]);
    let last = rows.last().unwrap();
    let diff = max_abs_diff(&host_logits(last_only)[0][0], last);
    let largest = last.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(
        diff <= 1e-6 * (1.0 + largest),
        "last-only logits differ from the last row by {diff} (largest {largest})"
    );
}

/// The prompt's logit rows against the recorded ones: the whole last row, and every position's
/// top 5, each within `tolerance`.
pub fn check_logit_values(rows: &[Vec<f32>], expected: &Value, tolerance: f32) {
    let last = floats(&expected["last_logits"]);
    let diff = max_abs_diff(rows.last().unwrap(), &last);
    assert!(diff < tolerance, "last-position logits differ by {diff}");
    for (position, row) in rows.iter().enumerate() {
        let top_ids = ids(&expected["top5_ids"][position]);
        let top_logits = floats(&expected["top5_logits"][position]);
        for (id, logit) in top_ids.iter().zip(&top_logits) {
            let ours = row[*id as usize];
            assert!(
                (ours - logit).abs() < tolerance,
                "position {position}, token {id}: {ours} vs {logit}"
            );
        }
    }
}

pub fn check_greedy<Bk: Backend>(model: &Transformer<Bk>, expected: &Value) {
    let prompt = ids(&expected["prompt"]);
    let reference = ids(&expected["greedy_with_cache"]);
    assert_eq!(reference, ids(&expected["greedy_without_cache"]));
    let steps = reference.len();
    assert_eq!(
        greedy_uncached(model, &prompt, steps),
        reference,
        "no cache"
    );
    let windowed = model.config().sliding_window.is_some();
    for kind in exact_cache_kinds(prompt.len() + steps) {
        let mut cache = match model.new_cache(&kind) {
            // A sink cache keeps positions a windowed layer never sees: refused, with a reason.
            Err(kv_model::ModelError::SinkWithModelWindow { .. })
                if windowed && matches!(kind, kv_core::CacheConfig::Sink { .. }) =>
            {
                continue
            }
            cache => cache.unwrap(),
        };
        let tokens = greedy_cached(model, &mut cache, &prompt, steps);
        assert_eq!(tokens, reference, "cache {kind:?}");
        assert_eq!(cache.seq_len(), prompt.len() + steps - 1);
    }
}

pub fn check_padded_batch<Bk: Backend>(model: &Transformer<Bk>, expected: &Value, tolerance: f32) {
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
        .forward_uncached(&tokens, Some(&mask), Logits::Last)
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
            assert!(diff < tolerance, "padded batch logits differ by {diff}");
        }
    }
}
