//! Matrices on the host, multiplied by kv-kernels (`WeightPlacement::Host`): in f32 the
//! fixtures still match transformers; `Native` keeps a GGUF's own blocks; each quantized format
//! stays within a bound of the f32 model it was made from.

use crate::common::*;
use kv_model::{
    kv_kernels::Format, load_model_placed, Logits, Transformer, WeightFormat, WeightPlacement,
};

const TOLERANCE: f32 = 1e-4;

fn load_placed(name: &str, format: WeightFormat) -> Transformer<B> {
    load_model_placed::<B>(
        &fixtures().join(name),
        WeightPlacement::Host(format),
        &device(),
    )
    .unwrap()
    .model
}

/// Host f32 products reorder the sums, nothing else: transformers' logits and tokens hold on
/// every fixture, through every exact cache kind and a padded batch (decode steps take the
/// host path of `kv_model`'s position-wise work; prompts take kv-kernels' batched products).
#[test]
fn host_f32_matches_transformers_on_every_fixture() {
    for name in ["gpt2", "llama", "qwen2"] {
        let model = load_placed(name, WeightFormat::F32);
        reference::check_all(&model, &expected(name), TOLERANCE);
    }
}

fn last_logits(model: &Transformer<B>, prompt: &[u32]) -> Vec<f32> {
    let logits = model
        .forward_uncached(&[prompt.to_vec()], None, Logits::Last)
        .unwrap();
    host_logits(logits)[0][0].clone()
}

/// The tiny GGUF holds F32, F16, Q8_0, Q4_0 and Q4_1 tensors. `Native` keeps the ones with a
/// kernel in their bytes (so the model is smaller than in f32) and computes what the
/// dequantized f32 model computes, up to the 8-bit rounding of activations met by Q8_0 and
/// Q4_1 blocks.
#[test]
fn native_gguf_keeps_its_blocks_and_tracks_the_f32_model() {
    let expected = read_json("tiny-llama-gguf.json");
    let prompt = ids(&expected["prompt"]);
    let f32_model = load_placed("tiny-llama.gguf", WeightFormat::F32);
    let native = load_placed("tiny-llama.gguf", WeightFormat::Native);
    assert!(
        native.weight_bytes() < f32_model.weight_bytes(),
        "native {} vs f32 {}",
        native.weight_bytes(),
        f32_model.weight_bytes()
    );
    let want = floats(&expected["last_logits"]);
    let exact = last_logits(&f32_model, &prompt);
    assert!(max_abs_diff(&exact, &want) < TOLERANCE);
    let approx = last_logits(&native, &prompt);
    let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let diff = max_abs_diff(&approx, &want);
    assert!(
        diff < 0.05 * scale,
        "native differs by {diff} (logits up to {scale})"
    );
}

/// A two-layer Llama config with grouped-query attention, for models of random weights.
fn random_llama_config() -> kv_model::ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128
    });
    kv_model::ModelConfig::from_hf_json(&json, "random").unwrap()
}

/// Each format on a model of random weights: f16 stays within half-precision rounding of
/// f32; Q8_0 and Q4_1 within their step sizes, in that order of closeness; decode steps
/// through a cache equal the uncached pass of the same model.
#[test]
fn each_format_stays_near_f32_and_its_cache_matches_its_own_uncached_pass() {
    let config = random_llama_config();
    let prompt: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
    let reference = {
        let model = Transformer::<B>::random(&config, 11, &device()).unwrap();
        last_logits(&model, &prompt)
    };
    let mut diffs = Vec::new();
    for format in [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_1,
    ] {
        let model =
            Transformer::<B>::random_placed(&config, 11, WeightPlacement::Host(format), &device())
                .unwrap();
        let logits = last_logits(&model, &prompt);
        diffs.push(max_abs_diff(&logits, &reference));

        // Prefill all but the last token, then decode it: the last step's logits equal the
        // uncached pass's.
        let mut cache = model
            .new_cache(&kv_core::CacheConfig::Dynamic { capacity: 16 })
            .unwrap();
        let (head, last) = prompt.split_at(prompt.len() - 1);
        model
            .forward(&[head.to_vec()], None, Some(&mut cache), Logits::Last)
            .unwrap();
        let step = model
            .forward(&[last.to_vec()], None, Some(&mut cache), Logits::Last)
            .unwrap();
        let diff = max_abs_diff(&host_logits(step)[0][0], &logits);
        assert!(diff < 1e-3, "{format}: cached step differs by {diff}");
    }
    assert!(diffs[0] < 1e-4, "f32 {diffs:?}");
    assert!(diffs[1] < 5e-3, "f16 {diffs:?}");
    assert!(diffs[2] < 3e-2 && diffs[3] < 0.2, "q8_0, q4_1 {diffs:?}");
    assert!(
        diffs[1] < diffs[2] && diffs[2] < diffs[3],
        "closeness order {diffs:?}"
    );
}

/// A two-layer Llama config 256 wide, so every matrix's rows are whole k-quant super-blocks.
fn k_quant_sized_config() -> kv_model::ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 96, "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512
    });
    kv_model::ModelConfig::from_hf_json(&json, "random-256").unwrap()
}

/// Every weight format, the legacy blocks and the k-quants included, on a model whose rows
/// every format can hold: each stays near f32 by its bits (the 8- and 6-bit formats closer
/// than the 4-bit ones), its weights take the bytes its blocks say, decode steps through a
/// cache equal its own uncached pass, and a prompt (`gemm` over rows widened in cache for the
/// row-major block formats) computes what decode-sized chunks (8-bit activations) compute.
#[test]
fn every_format_on_a_model_k_quants_fit_tracks_f32_and_its_own_cache() {
    let config = k_quant_sized_config();
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 96).collect();
    let reference = {
        let model = Transformer::<B>::random(&config, 7, &device()).unwrap();
        last_logits(&model, &prompt)
    };
    let scale = reference.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let f32_bytes = Transformer::<B>::random_placed(
        &config,
        7,
        WeightPlacement::Host(WeightFormat::F32),
        &device(),
    )
    .unwrap()
    .weight_bytes() as f64;
    let mut diff_of = std::collections::HashMap::new();
    for format in WeightFormat::ALL {
        if format == WeightFormat::Native {
            continue;
        }
        let model =
            Transformer::<B>::random_placed(&config, 7, WeightPlacement::Host(format), &device())
                .unwrap();
        let bits = format.kernel_format().unwrap().bits_per_value();
        let ratio = model.weight_bytes() as f64 / f32_bytes;
        assert!(
            (ratio - bits / 32.0).abs() < 1e-9,
            "{format}: {ratio} of f32's bytes"
        );
        let logits = last_logits(&model, &prompt);
        let diff = max_abs_diff(&logits, &reference);
        diff_of.insert(format, diff);
        assert!(
            diff < 0.25 * (1.0 + scale),
            "{format}: {diff} off f32 (logits up to {scale})"
        );

        let mut cache = model
            .new_cache(&kv_core::CacheConfig::Dynamic { capacity: 32 })
            .unwrap();
        let mut last = None;
        for chunk in prompt.chunks(8) {
            last = Some(
                model
                    .forward(&[chunk.to_vec()], None, Some(&mut cache), Logits::Last)
                    .unwrap(),
            );
        }
        let chunked = host_logits(last.unwrap())[0][0].clone();
        let diff = max_abs_diff(&chunked, &logits);
        assert!(
            diff <= 2e-2 * (1.0 + scale),
            "{format}: prompt and cached chunks differ by {diff}"
        );
    }
    let d = |f| diff_of[&f];
    assert!(d(WeightFormat::F32) < 1e-4, "{diff_of:?}");
    for fine in [WeightFormat::Q8_0, WeightFormat::Q6K] {
        for coarse in [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q4K] {
            assert!(d(fine) < d(coarse), "{fine} vs {coarse}: {diff_of:?}");
        }
    }
}

/// A prompt longer than a decode step's rows takes kv-kernels' batched products (`gemm` on the
/// stored f32/f16 rows; the batch kernels, with activations rounded to 8 bits, for the block
/// formats), whose outputs equal the matrix-vector kernels' bit for bit. So the prompt's last
/// logits equal those of feeding the same tokens in decode-sized chunks up to the float
/// rounding of the ops around the products (f32, f16), or up to that rounding moving an
/// activation across an 8-bit step (Q8_0, Q4_1).
#[test]
fn a_prompt_computes_what_decode_sized_chunks_compute_in_every_format() {
    let config = random_llama_config();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 96).collect();
    for format in [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_1,
    ] {
        let model =
            Transformer::<B>::random_placed(&config, 5, WeightPlacement::Host(format), &device())
                .unwrap();
        let whole = last_logits(&model, &prompt);
        let mut cache = model
            .new_cache(&kv_core::CacheConfig::Dynamic { capacity: 64 })
            .unwrap();
        let mut last = None;
        for chunk in prompt.chunks(8) {
            last = Some(
                model
                    .forward(&[chunk.to_vec()], None, Some(&mut cache), Logits::Last)
                    .unwrap(),
            );
        }
        let chunked = host_logits(last.unwrap())[0][0].clone();
        let scale = whole.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let diff = max_abs_diff(&whole, &chunked);
        let allowed = match format {
            WeightFormat::F32 | WeightFormat::F16 => 1e-4,
            _ => 2e-2,
        } * (1.0 + scale);
        assert!(
            diff <= allowed,
            "{format}: prompt and chunks differ by {diff} (logits up to {scale})"
        );
    }
}

/// A prompt's attention on a model whose matrices live on the host runs in kv-kernels
/// (`gemm` products, vectorized softmax) instead of the backend's blocked attention. Both
/// compute the same logits at every position: with no cache, after a cached prefix, and
/// through a sliding window smaller than the prompt, in blocks of a few sizes, on one thread
/// and on several.
#[test]
fn host_attention_for_prompts_equals_the_backend_attention() {
    use kv_core::{CacheConfig, Execution};
    use kv_model::PromptSplit;

    let config = random_llama_config();
    let prompt: Vec<u32> = (0..70).map(|i| (i * 37 + 5) % 96).collect();
    let (prefix, rest) = prompt.split_at(23);
    let backend = Transformer::<B>::random(&config, 3, &device()).unwrap();
    let host = |block: usize, execution: Execution| {
        Transformer::<B>::random_placed(
            &config,
            3,
            WeightPlacement::Host(WeightFormat::F32),
            &device(),
        )
        .unwrap()
        .with_prompt_split(PromptSplit {
            queries_per_block: block,
            min_positions_per_run: 16,
        })
        .with_execution(execution)
    };
    // All logits of `rest`, after `prefix` went through the cache if there is one.
    let all_logits = |model: &Transformer<B>, cache: Option<CacheConfig>| {
        let out = match cache {
            None => model.forward_uncached(std::slice::from_ref(&prompt), None, Logits::All),
            Some(kind) => {
                let mut cache = model.new_cache(&kind).unwrap();
                model
                    .forward(&[prefix.to_vec()], None, Some(&mut cache), Logits::Last)
                    .unwrap();
                model.forward(&[rest.to_vec()], None, Some(&mut cache), Logits::All)
            }
        };
        host_logits(out.unwrap())[0].concat()
    };
    for cache in [
        None,
        Some(CacheConfig::Dynamic { capacity: 128 }),
        Some(CacheConfig::SlidingWindow { window: 24 }),
    ] {
        let want = all_logits(&backend, cache.clone());
        for (block, execution) in [(16, Execution::Parallel), (64, Execution::Sequential)] {
            let got = all_logits(&host(block, execution), cache.clone());
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff < TOLERANCE,
                "{cache:?}, blocks of {block}: host attention differs by {diff}"
            );
        }
    }
}

/// Converting to a format quantizes every matrix: the model's bytes follow the format.
#[test]
fn weight_bytes_follow_the_format() {
    let sizes: Vec<usize> = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_1,
    ]
    .into_iter()
    .map(|f| load_placed("llama", f).weight_bytes())
    .collect();
    let f32_bytes = sizes[0] as f64;
    for (size, per_weight) in sizes.iter().zip([4.0, 2.0, 34.0 / 32.0, 20.0 / 32.0]) {
        let ratio = *size as f64 / f32_bytes;
        assert!((ratio - per_weight / 4.0).abs() < 1e-9, "{size}: {ratio}");
    }
    assert_eq!(Format::Q4_1.row_bytes(64), 40);
}

/// Runs `steps` decode steps through a cache of `kind` on the host-matrix model and on the
/// backend one (the same weights), feeding both the backend's greedy token, and asserts their
/// logits agree within [`TOLERANCE`] at every step.
fn assert_host_steps_match_backend(
    host: &Transformer<B>,
    backend: &Transformer<B>,
    kind: &kv_core::CacheConfig,
    prompt: &[u32],
    steps: usize,
    label: &str,
) {
    let (mut host_cache, mut backend_cache) = (
        host.new_cache(kind).unwrap(),
        backend.new_cache(kind).unwrap(),
    );
    let mut input = prompt.to_vec();
    for step in 0..steps {
        let run = |model: &Transformer<B>, cache: &mut _| {
            let logits = model
                .forward(&[input.clone()], None, Some(cache), Logits::Last)
                .unwrap();
            host_logits(logits)[0][0].clone()
        };
        let (a, b) = (run(host, &mut host_cache), run(backend, &mut backend_cache));
        let diff = max_abs_diff(&a, &b);
        assert!(diff < TOLERANCE, "{label}, {kind:?}, step {step}: {diff}");
        input = vec![argmax(&b)];
    }
}

/// A decode step on host matrices keeps its residual stream on the host and lets the backend do
/// only the cache and attention. Its logits equal the backend path's (the same f32 weights on
/// the device) step by step, on every cache kind, including windows that evict and a sink
/// cache that re-rotates its keys.
#[test]
fn host_decode_steps_equal_the_backend_path_on_every_cache_kind() {
    let mut kinds = exact_cache_kinds(24);
    kinds.extend([
        int8_cache(),
        kv_core::CacheConfig::SlidingWindow { window: 5 },
    ]);
    let prompt: Vec<u32> = vec![5, 17, 2, 40];
    for name in ["gpt2", "llama", "qwen2"] {
        let (host, backend) = (load_placed(name, WeightFormat::F32), load(name));
        // Evicting sinks, placed as the model needs (re-rotated for rotary models).
        let sink = kv_core::CacheConfig::Sink {
            sinks: 2,
            window: 4,
            positions: host.config().sink_positions(),
        };
        for kind in kinds.iter().chain([&sink]) {
            assert_host_steps_match_backend(&host, &backend, kind, &prompt, 10, name);
        }
    }
}

/// Past a few hundred cached positions a decode step on host matrices splits its attention by
/// keys over the kernel threads and merges the parts: its logits still equal the backend
/// path's (which attends over all keys at once) at every step.
#[test]
fn long_decode_with_split_attention_equals_the_backend_path() {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 1024
    });
    let config = kv_model::ModelConfig::from_hf_json(&json, "random").unwrap();
    let host = Transformer::<B>::random_placed(
        &config,
        5,
        WeightPlacement::Host(WeightFormat::F32),
        &device(),
    )
    .unwrap();
    let backend = Transformer::<B>::random(&config, 5, &device()).unwrap();
    let kind = kv_core::CacheConfig::Dynamic { capacity: 16 };
    assert_host_steps_match_backend(&host, &backend, &kind, &[1, 2, 3], 400, "random llama");
}
