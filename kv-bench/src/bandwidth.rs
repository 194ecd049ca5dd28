//! The memory-bandwidth floor of decoding on a CPU.
//!
//! One cached decode step multiplies a single row of activations by every weight matrix, so it
//! reads each weight once and does about two flops per weight: far too little arithmetic to
//! hide the reads. Its time is bounded below by *weight bytes / read bandwidth*. This module
//! counts the bytes ([`decode_weight_bytes`]) and measures the bandwidth
//! ([`measure_read_bandwidth`]: a large sequential read, summed by every thread, best of several
//! passes), so that kv-bench can report how close a decode gets to the floor.

use std::time::Instant;

use kv_model::{Architecture, ModelConfig};
use serde_json::{json, Value};

/// Weight bytes one batch-1 decode step reads, at `bytes_per_weight` per stored weight (4 for
/// f32): every projection, bias and norm of every layer, the final norm, the whole LM head
/// (`vocab x hidden`, tied or not), and the one embedding row (plus the one learned-position row
/// for GPT-2) the new token looks up.
///
/// ```
/// use kv_bench::bandwidth::decode_weight_bytes;
/// let json = serde_json::json!({
///     "model_type": "llama", "vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 1,
///     "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 8,
///     "tie_word_embeddings": true
/// });
/// let config = kv_model::ModelConfig::from_hf_json(&json, "example").unwrap();
/// // q 16 + k 8 + v 8 + o 16 + gate/up/down 96 + norms 8 + final norm 4 + head 40 + row 4.
/// assert_eq!(decode_weight_bytes(&config, 1), 200);
/// ```
pub fn decode_weight_bytes(config: &ModelConfig, bytes_per_weight: usize) -> usize {
    let h = config.hidden_size;
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let i = config.intermediate_size;
    let weights = match config.architecture {
        Architecture::Gpt2 => {
            // c_attn, c_proj, c_fc, mlp c_proj with biases; two LayerNorms (weight and bias).
            let layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h;
            config.num_layers * layer + 2 * h + config.vocab_size * h + 2 * h
        }
        _ => {
            let attention = h * (q + 2 * kv) + q * h;
            let bias = if config.qkv_bias { q + 2 * kv } else { 0 };
            let mlp = 3 * h * i;
            let layer = attention + bias + mlp + 2 * h;
            config.num_layers * layer + h + config.vocab_size * h + h
        }
    };
    weights * bytes_per_weight
}

/// One read-bandwidth measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Bandwidth {
    /// Size of the buffer read in each pass.
    pub bytes: usize,
    /// Threads reading it, each a contiguous share.
    pub threads: usize,
    /// Bytes per second of each timed pass.
    pub passes: Vec<f64>,
}

impl Bandwidth {
    /// The best pass, bytes per second: the machine's read bandwidth.
    pub fn best(&self) -> f64 {
        self.passes.iter().copied().fold(0.0, f64::max)
    }

    /// The fastest a decode step reading `weight_bytes` can repeat, steps per second.
    pub fn floor_steps_per_second(&self, weight_bytes: usize) -> f64 {
        self.best() / weight_bytes.max(1) as f64
    }

    /// The measurement as JSON (GB are 1e9 bytes).
    pub fn to_json(&self) -> Value {
        json!({
            "buffer_bytes": self.bytes,
            "threads": self.threads,
            "best_gb_per_s": self.best() / 1e9,
            "passes_gb_per_s": self.passes.iter().map(|p| p / 1e9).collect::<Vec<_>>(),
        })
    }
}

/// Reads a `bytes`-long buffer of f32 `passes` times (after one untimed pass that also pages it
/// in), each pass split across `threads` threads that sum their share with sixteen independent
/// lanes, so the loads, not the additions, are the bottleneck. Pick a buffer far larger than the
/// last-level cache (the default command uses 1 GiB).
///
/// ```
/// let bw = kv_bench::bandwidth::measure_read_bandwidth(1 << 20, 2, 3);
/// assert_eq!(bw.passes.len(), 3);
/// assert!(bw.best() > 0.0);
/// ```
pub fn measure_read_bandwidth(bytes: usize, threads: usize, passes: usize) -> Bandwidth {
    let threads = threads.max(1);
    let floats = (bytes / 4).max(16 * threads);
    // Distinct values everywhere, so no page is shared or compressed.
    let buffer: Vec<f32> = (0..floats).map(|i| (i % 1021) as f32).collect();
    let share = floats.div_ceil(threads);
    let read_once = || {
        std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(share)
                .map(|chunk| scope.spawn(move || sum_lanes(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0.0))
                .sum::<f32>()
        })
    };
    std::hint::black_box(read_once());
    let passes = (0..passes)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(read_once());
            (floats * 4) as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    Bandwidth {
        bytes: floats * 4,
        threads,
        passes,
    }
}

/// Sums `values` in sixteen independent lanes (which the compiler keeps in vector registers).
fn sum_lanes(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/smollm2-135m-instruct.json"
        );
        ModelConfig::from_hf_file(std::path::Path::new(path)).unwrap()
    }

    #[test]
    fn smollm2_reads_its_parameter_count_plus_one_embedding_row() {
        // SmolLM2-135M has 134,515,008 parameters (tied head); a step also reads the new
        // token's embedding row (576 floats).
        assert_eq!(decode_weight_bytes(&smollm2(), 1), 134_515_008 + 576);
        assert_eq!(decode_weight_bytes(&smollm2(), 4), 4 * (134_515_008 + 576));
    }

    #[test]
    fn gpt2_small_reads_its_parameter_count() {
        let json = serde_json::json!({
            "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12,
            "n_head": 12, "n_positions": 1024
        });
        let config = ModelConfig::from_hf_json(&json, "gpt2").unwrap();
        // GPT-2 small: 124,439,808 parameters, of which the 1024 x 768 position table is read
        // one row at a time, like the token embedding (whose full table is the LM head).
        let per_step = 124_439_808 - 1024 * 768 + 768 + 768;
        assert_eq!(decode_weight_bytes(&config, 1), per_step);
    }

    #[test]
    fn lanes_sum_every_value() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(sum_lanes(&values), 499_500.0);
        assert_eq!(sum_lanes(&values[..7]), 21.0);
    }
}
