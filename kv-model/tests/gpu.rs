//! The reference checks on a GPU backend: burn-cuda (`cargo test -p kv-model --features cuda
//! --test gpu`) and burn-wgpu (`--features wgpu`: Vulkan, Metal or DX12, Mesa's lavapipe
//! included, which is how CI runs them without a GPU). Logits must stay within 1e-3 of
//! transformers' and greedy tokens must be identical with no cache and with every cache kind;
//! the CPU and the GPU must also agree with each other on a random model, approximate
//! (quantized) caches included.
//!
//! Without a device every test here returns early and says so on stderr (written directly, so
//! the test harness does not swallow it): no NVIDIA driver for cuda, no adapter for wgpu.
#![cfg(any(feature = "cuda", feature = "wgpu"))]

mod common;

use std::io::Write;

use burn::tensor::backend::Backend;
use common::*;
use kv_core::{CacheConfig, QuantBits, QuantizedCacheConfig};
use kv_model::{load_model, Logits, ModelConfig, Transformer};

/// The tolerance the GPU must meet against transformers' f32 CPU logits.
const GPU_TOLERANCE: f32 = 1e-3;

/// One test at a time on the device: the harness runs tests on several threads, and on
/// lavapipe (a Vulkan device on the CPU) two at once only contend for the same cores and
/// memory.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the device for one test (a failed test's poisoned lock is still a lock).
fn hold_device() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Says on stderr that `test` did not run on `backend`, and why.
fn skipped(backend: &str, test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "gpu::{backend}::{test}: SKIPPED: {why}");
}

fn check_fixture<Gpu: Backend>(device: &Gpu::Device, name: &str) {
    let model = load_model::<Gpu>(&fixtures().join(name), device)
        .unwrap()
        .model;
    let expected = read_json(&format!("{name}/expected.json"));
    reference::check_all(&model, &expected, GPU_TOLERANCE);
}

fn check_quantized_gguf<Gpu: Backend>(device: &Gpu::Device) {
    let model = load_model::<Gpu>(&fixtures().join("tiny-llama.gguf"), device)
        .unwrap()
        .model;
    let expected = read_json("tiny-llama-gguf.json");
    let prompt = ids(&expected["prompt"]);
    let logits = model
        .forward_uncached(std::slice::from_ref(&prompt), None, Logits::Last)
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
        positions: kv_core::SinkPositions::CacheRanks,
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

fn check_cpu_and_gpu_agree<Gpu: Backend>(device: &Gpu::Device) {
    let config = small_llama();
    let cpu: Transformer<B> = Transformer::random(&config, 7, &common::device()).unwrap();
    let gpu: Transformer<Gpu> = Transformer::random(&config, 7, device).unwrap();
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

/// The `#[test]`s of one backend module, each calling `device(test)` first and returning when
/// it gives no device.
macro_rules! gpu_tests {
    () => {
        #[test]
        fn gpt2_matches_transformers() {
            let _device = super::hold_device();
            if let Some(device) = device("gpt2_matches_transformers") {
                super::check_fixture::<Gpu>(&device, "gpt2");
            }
        }

        #[test]
        fn llama_matches_transformers() {
            let _device = super::hold_device();
            if let Some(device) = device("llama_matches_transformers") {
                super::check_fixture::<Gpu>(&device, "llama");
            }
        }

        #[test]
        fn qwen2_matches_transformers() {
            let _device = super::hold_device();
            if let Some(device) = device("qwen2_matches_transformers") {
                super::check_fixture::<Gpu>(&device, "qwen2");
            }
        }

        #[test]
        fn qwen3_matches_transformers() {
            let _device = super::hold_device();
            if let Some(device) = device("qwen3_matches_transformers") {
                super::check_fixture::<Gpu>(&device, "qwen3");
            }
        }

        #[test]
        fn gemma3_hybrid_cache_matches_transformers() {
            let _device = super::hold_device();
            if let Some(device) = device("gemma3_hybrid_cache_matches_transformers") {
                super::check_fixture::<Gpu>(&device, "gemma3");
            }
        }

        #[test]
        fn phi3_matches_transformers() {
            let _device = super::hold_device();
            if let Some(device) = device("phi3_matches_transformers") {
                super::check_fixture::<Gpu>(&device, "phi3");
            }
        }

        #[test]
        fn gemma2_soft_capping_matches_transformers() {
            let _device = super::hold_device();
            if let Some(device) = device("gemma2_soft_capping_matches_transformers") {
                super::check_fixture::<Gpu>(&device, "gemma2");
            }
        }

        #[test]
        fn phi3_partial_rotary_matches_transformers() {
            let _device = super::hold_device();
            if let Some(device) = device("phi3_partial_rotary_matches_transformers") {
                super::check_fixture::<Gpu>(&device, "phi4");
            }
        }

        #[test]
        fn quantized_gguf_matches_transformers() {
            let _device = super::hold_device();
            if let Some(device) = device("quantized_gguf_matches_transformers") {
                super::check_quantized_gguf::<Gpu>(&device);
            }
        }

        #[test]
        fn cpu_and_gpu_agree_on_every_cache_kind() {
            let _device = super::hold_device();
            if let Some(device) = device("cpu_and_gpu_agree_on_every_cache_kind") {
                super::check_cpu_and_gpu_agree::<Gpu>(&device);
            }
        }
    };
}

/// burn-cuda, on an NVIDIA GPU.
#[cfg(feature = "cuda")]
mod cuda {
    type Gpu = burn_cuda::Cuda<f32, i32>;

    /// The CUDA device, or `None` (after saying why) when this machine has no NVIDIA driver.
    fn device(test: &str) -> Option<burn_cuda::CudaDevice> {
        let probe = std::path::Path::new("/proc/driver/nvidia/version");
        if cfg!(target_os = "linux") && !probe.exists() {
            let why = format!(
                "no NVIDIA driver ({} is absent); run on a machine with a GPU",
                probe.display()
            );
            super::skipped("cuda", test, &why);
            return None;
        }
        Some(Default::default())
    }

    gpu_tests!();
}

/// burn-wgpu, on whatever adapter wgpu picks (a GPU, or lavapipe on the CPU).
#[cfg(feature = "wgpu")]
mod wgpu {
    use std::sync::OnceLock;

    type Gpu = burn_wgpu::Wgpu<f32, i32>;

    /// The default wgpu device, or `None` (after saying why) when wgpu finds no adapter
    /// (probed once per process: burn-wgpu has no fallible way to start).
    fn device(test: &str) -> Option<burn_wgpu::WgpuDevice> {
        static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
        let device = burn_wgpu::WgpuDevice::default();
        match PROBE.get_or_init(|| kv_model::probe_device::<Gpu>(&device)) {
            Ok(()) => Some(device),
            Err(why) => {
                let why = format!(
                    "wgpu found no adapter ({why}); install a Vulkan driver, e.g. \
                     `apt-get install mesa-vulkan-drivers libvulkan1`"
                );
                super::skipped("wgpu", test, &why);
                None
            }
        }
    }

    gpu_tests!();
}
