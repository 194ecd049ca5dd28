//! The reference checks on an NVIDIA GPU (burn-cuda): `cargo test -p kv-model --features cuda
//! --test gpu`. Logits must stay within 1e-3 of transformers' and greedy tokens must be identical
//! with no cache and with every cache kind; the CPU and the GPU must also agree with each other
//! on a random model, approximate (quantized) caches included.
//!
//! Without an NVIDIA driver every test here returns early and says so on stderr (written
//! directly, so the test harness does not swallow it): CI builds these tests but has no GPU.
#![cfg(feature = "cuda")]

mod common;

use std::io::Write;

use burn::tensor::Device;
use common::*;
use kv_core::{AnyCache, CacheConfig, QuantBits, QuantizedCacheConfig};
use kv_model::{load_model, Logits, ModelConfig, Transformer};

/// The GPU backend.
type Gpu = burn_cuda::Cuda<f32, i32>;

/// The tolerance the GPU must meet against transformers' f32 CPU logits.
const GPU_TOLERANCE: f32 = 1e-3;

/// The CUDA device, or `None` (after saying why) when this machine has no NVIDIA driver.
fn gpu(test: &str) -> Option<Device<Gpu>> {
    let probe = std::path::Path::new("/proc/driver/nvidia/version");
    if cfg!(target_os = "linux") && !probe.exists() {
        let _ = writeln!(
            std::io::stderr(),
            "gpu::{test}: SKIPPED: no NVIDIA driver ({} is absent); run on a machine with a GPU",
            probe.display()
        );
        return None;
    }
    Some(Default::default())
}

fn check_fixture(name: &str) {
    let Some(device) = gpu(name) else { return };
    let model = load_model::<Gpu>(&fixtures().join(name), &device)
        .unwrap()
        .model;
    let expected = read_json(&format!("{name}/expected.json"));
    reference::check_all(&model, &expected, GPU_TOLERANCE);
}

#[test]
fn gpt2_matches_transformers_on_gpu() {
    check_fixture("gpt2");
}

#[test]
fn llama_matches_transformers_on_gpu() {
    check_fixture("llama");
}

#[test]
fn qwen2_matches_transformers_on_gpu() {
    check_fixture("qwen2");
}

#[test]
fn quantized_gguf_matches_transformers_on_gpu() {
    let Some(device) = gpu("quantized_gguf") else {
        return;
    };
    let model = load_model::<Gpu>(&fixtures().join("tiny-llama.gguf"), &device)
        .unwrap()
        .model;
    let expected = read_json("tiny-llama-gguf.json");
    let prompt = ids(&expected["prompt"]);
    let logits = model
        .forward::<AnyCache<Gpu>>(std::slice::from_ref(&prompt), None, None, Logits::Last)
        .unwrap();
    let diff = max_abs_diff(
        &host_logits(logits)[0][0],
        &floats(&expected["last_logits"]),
    );
    assert!(diff < GPU_TOLERANCE, "logits differ by {diff}");
    let reference = ids(&expected["greedy_with_cache"]);
    assert_eq!(greedy_uncached(&model, &prompt, reference.len()), reference);
    for kind in exact_cache_kinds(prompt.len() + reference.len()) {
        let mut cache = model.new_cache(&kind).unwrap();
        assert_eq!(
            greedy_cached(&model, &mut cache, &prompt, reference.len()),
            reference,
            "cache {kind:?}"
        );
    }
}

/// A small Llama-shaped config (GQA, tied head) for the CPU/GPU comparison.
fn small_llama() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
        "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    ModelConfig::from_hf_json(&json, "small llama").unwrap()
}

/// Every cache kind, approximate ones included: the GPU must make the same choices as the CPU
/// even where both differ from full attention.
fn every_cache_kind(len: usize) -> Vec<CacheConfig> {
    let mut kinds = exact_cache_kinds(len);
    kinds.push(CacheConfig::SlidingWindow { window: 6 });
    kinds.push(CacheConfig::Sink {
        sinks: 2,
        window: 6,
        rope_theta: None,
    });
    for bits in [QuantBits::Int8, QuantBits::Int4] {
        kinds.push(CacheConfig::Quantized(QuantizedCacheConfig {
            bits,
            group_size: 8,
            residual_len: 4,
        }));
    }
    kinds
}

#[test]
fn cpu_and_gpu_agree_on_every_cache_kind() {
    let Some(device) = gpu("cpu_and_gpu_agree") else {
        return;
    };
    let config = small_llama();
    let cpu: Transformer<B> = Transformer::random(&config, 7, &common::device()).unwrap();
    let gpu: Transformer<Gpu> = Transformer::random(&config, 7, &device).unwrap();
    let prompt: Vec<u32> = (0..9)
        .map(|i| (i * 11 + 3) % config.vocab_size as u32)
        .collect();
    let steps = 12;

    // Teacher-forced logits, step by step, so one early difference cannot hide later ones.
    for kind in every_cache_kind(prompt.len() + steps) {
        let mut cpu_cache = cpu.new_cache(&kind).unwrap();
        let mut gpu_cache = gpu.new_cache(&kind).unwrap();
        let mut input = prompt.clone();
        for step in 0..steps {
            let a = host_logits(
                cpu.forward(&[input.clone()], None, Some(&mut cpu_cache), Logits::Last)
                    .unwrap(),
            );
            let b = host_logits(
                gpu.forward(&[input.clone()], None, Some(&mut gpu_cache), Logits::Last)
                    .unwrap(),
            );
            let diff = max_abs_diff(&a[0][0], &b[0][0]);
            assert!(
                diff < GPU_TOLERANCE,
                "{kind:?}, step {step}: CPU and GPU logits differ by {diff}"
            );
            input = vec![argmax(&a[0][0])];
        }
        assert_eq!(cpu_cache.seq_len(), gpu_cache.seq_len(), "{kind:?}");
    }
}
