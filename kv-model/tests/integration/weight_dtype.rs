//! Projection weights stored in f16 (`Transformer::with_weight_dtype`).
//!
//! On burn-flex the f16 model stays close to the logits transformers recorded in f32, and every
//! cache kind gives the f16 model's own uncached greedy tokens. On burn-ndarray, which has no
//! f16 arithmetic, asking for f16 weights is a clear error.

use crate::common::*;

#[test]
fn f16_weights_on_a_backend_without_f16_are_a_clear_error() {
    let err = load_on::<Ndarray>("llama")
        .with_weight_dtype(kv_model::WeightDtype::F16)
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("f16 weights need"), "{message}");
    assert!(message.contains("use f32 weights"), "{message}");
}

/// f16 weights on burn-flex ([`B`]).
mod f16_on_flex {
    use super::*;
    use kv_model::{Logits, Transformer, WeightDtype};

    /// f16 keeps 11 significant bits: each product's input row, weights and output are
    /// rounded to about 5e-4 relative, and the fixtures' logits are of order 1.
    const F16_TOLERANCE: f32 = 1e-2;

    const FIXTURES: [&str; 3] = ["gpt2", "llama", "qwen2"];

    fn prompt_logits(model: &Transformer<B>, prompt: &[u32]) -> Vec<Vec<f32>> {
        let logits = model
            .forward_uncached(&[prompt.to_vec()], None, Logits::All)
            .unwrap();
        host_logits(logits).remove(0)
    }

    #[test]
    fn f16_weights_keep_prompt_logits_near_transformers() {
        for name in FIXTURES {
            let expected = expected(name);
            let prompt = ids(&expected["prompt"]);
            let f32_model = load(name);
            let f16_model = f32_model
                .clone()
                .with_weight_dtype(WeightDtype::F16)
                .unwrap();

            let f32_rows = prompt_logits(&f32_model, &prompt);
            let f16_rows = prompt_logits(&f16_model, &prompt);
            reference::check_logit_values(&f16_rows, &expected, F16_TOLERANCE);
            // The weights really are f16: the numbers moved off the f32 model's, by rounding.
            let moved = max_abs_diff(f16_rows.last().unwrap(), f32_rows.last().unwrap());
            assert!(moved > 0.0, "{name}: f16 logits equal f32's exactly");
        }
    }

    #[test]
    fn every_cache_kind_gives_the_f16_models_uncached_tokens() {
        for name in FIXTURES {
            let expected = expected(name);
            let prompt = ids(&expected["prompt"]);
            let steps = ids(&expected["greedy_with_cache"]).len();
            let model = load(name).with_weight_dtype(WeightDtype::F16).unwrap();
            let reference = greedy_uncached(&model, &prompt, steps);
            for kind in exact_cache_kinds(prompt.len() + steps) {
                let mut cache = model.new_cache(&kind).unwrap();
                let tokens = greedy_cached(&model, &mut cache, &prompt, steps);
                assert_eq!(tokens, reference, "{name}: cache {kind:?}");
            }
        }
    }

    #[test]
    fn f32_weights_are_the_model_unchanged() {
        let expected = expected("llama");
        let prompt = ids(&expected["prompt"]);
        let model = load("llama");
        let same = model.clone().with_weight_dtype(WeightDtype::F32).unwrap();
        assert_eq!(
            prompt_logits(&model, &prompt),
            prompt_logits(&same, &prompt)
        );
    }
}
