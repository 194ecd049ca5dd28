//! [`Metrics`]: what `GET /metrics` reports, in Prometheus's text format.
//!
//! Names follow vLLM's (`num_requests_running`, `gpu_cache_usage`...) under the prefix
//! `kv_serve_`, so a dashboard made for one reads the other with a rename. Counters end in
//! `_total`, times are in seconds.
//!
//! The gauges a Kubernetes inference gateway's endpoint picker routes by (the Gateway API
//! Inference Extension's model server protocol, which llm-d's router implements) are also
//! kept under vLLM's own names, as that protocol names them: `vllm:num_requests_waiting`,
//! `vllm:num_requests_running` and `vllm:kv_cache_usage_perc` (0 to 1), each labelled with
//! `model_name`, and `vllm:cache_config_info` with `block_size`, `cache_dtype` and `num_gpu_blocks` labels
//! (value 1) for its prefix-cache scorer.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use kv_generate::engine::PoolSummary;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Every metric the server keeps, shared by the HTTP side and the engine's thread.
pub struct Metrics {
    registry: Registry,
    /// Requests (choices) holding blocks in the engine.
    pub running: Gauge,
    /// Requests (choices) waiting to be admitted or readmitted.
    pub waiting: Gauge,
    /// Blocks of the KV pool referenced by a sequence.
    pub kv_blocks_used: Gauge,
    /// Blocks in the KV pool.
    pub kv_blocks_total: Gauge,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: Counter,
    /// Prompt tokens found there.
    pub prefix_cache_hits: Counter,
    /// Times a running request gave its blocks back to make room.
    pub preemptions: Counter,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generation_tokens: Counter,
    /// Requests (choices) that finished.
    pub requests_finished: Counter,
    /// Requests (choices) cancelled, most by a client that went away.
    pub requests_cancelled: Counter,
    /// Speculative pieces: a request's token fed with guesses after it.
    pub spec_drafts: Counter,
    /// Guesses fed to the model.
    pub spec_draft_tokens: Counter,
    /// Guesses the model kept.
    pub spec_accepted_tokens: Counter,
    /// Seconds from a request's arrival to its first token.
    pub time_to_first_token: Histogram,
    /// Seconds between a request's consecutive tokens.
    pub inter_token_latency: Histogram,
    /// Seconds per engine step (one forward pass).
    pub step_time: Histogram,
    /// The process's resident memory, read when the metrics are rendered (Linux).
    resident_memory: Gauge,
    /// The gauges under vLLM's names (see the module docs).
    vllm: VllmGauges,
}

/// A metric's labels, as prometheus-client encodes them.
type Labels = Vec<(String, String)>;

/// The gauges an inference gateway scrapes, under vLLM's names.
struct VllmGauges {
    waiting: Family<Labels, Gauge>,
    running: Family<Labels, Gauge>,
    kv_cache_usage: Family<Labels, Gauge<f64, AtomicU64>>,
    cache_config: Family<Labels, Gauge>,
    /// `model_name`, once the model has loaded.
    model: OnceLock<Labels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under `kv_serve_`.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let vllm = VllmGauges {
            waiting: Family::default(),
            running: Family::default(),
            kv_cache_usage: Family::default(),
            cache_config: Family::default(),
            model: OnceLock::new(),
        };
        root.register(
            "vllm:num_requests_waiting",
            "Requests waiting to be processed",
            vllm.waiting.clone(),
        );
        root.register(
            "vllm:num_requests_running",
            "Requests running in the engine",
            vllm.running.clone(),
        );
        root.register(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage: 1 is every block in use",
            vllm.kv_cache_usage.clone(),
        );
        root.register(
            "vllm:cache_config_info",
            "The KV cache's block size and blocks",
            vllm.cache_config.clone(),
        );
        let registry = root.sub_registry_with_prefix("kv_serve");
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        // 1 ms to about 65 s, doubling.
        let histogram = |registry: &mut Registry, name: &str, help: &str| {
            let h = Histogram::new(exponential_buckets(0.001, 2.0, 17));
            registry.register(name, help, h.clone());
            h
        };
        let r = registry;
        Self {
            running: gauge(r, "num_requests_running", "Requests running in the engine"),
            waiting: gauge(r, "num_requests_waiting", "Requests waiting for the engine"),
            kv_blocks_used: gauge(r, "kv_cache_blocks_used", "KV pool blocks in use"),
            kv_blocks_total: gauge(r, "kv_cache_blocks_total", "KV pool blocks"),
            prefix_cache_queries: counter(
                r,
                "prefix_cache_queries",
                "Positions looked up in the prefix cache, at each admission of a request",
            ),
            prefix_cache_hits: counter(
                r,
                "prefix_cache_hits",
                "Positions found in the prefix cache, at each admission of a request",
            ),
            preemptions: counter(r, "num_preemptions", "Requests preempted to free blocks"),
            prompt_tokens: counter(r, "prompt_tokens", "Prompt tokens of accepted requests"),
            generation_tokens: counter(r, "generation_tokens", "Tokens generated"),
            requests_finished: counter(r, "requests_finished", "Requests finished"),
            requests_cancelled: counter(r, "requests_cancelled", "Requests cancelled"),
            spec_drafts: counter(
                r,
                "spec_decode_num_drafts",
                "Decode steps of a request that carried guesses",
            ),
            spec_draft_tokens: counter(
                r,
                "spec_decode_num_draft_tokens",
                "Guessed tokens fed to the model",
            ),
            spec_accepted_tokens: counter(
                r,
                "spec_decode_num_accepted_tokens",
                "Guessed tokens the model accepted",
            ),
            time_to_first_token: histogram(
                r,
                "time_to_first_token_seconds",
                "Seconds from arrival to the first token",
            ),
            inter_token_latency: histogram(
                r,
                "inter_token_latency_seconds",
                "Seconds between consecutive tokens of a request",
            ),
            step_time: histogram(r, "step_seconds", "Seconds per engine step"),
            resident_memory: gauge(
                r,
                "process_resident_memory_bytes",
                "Resident memory of the server process",
            ),
            registry: root,
            vllm,
        }
    }

    /// Names the model and the pool in the vLLM-named gauges, once it has loaded.
    pub fn set_model(&self, model_name: &str, pool: &PoolSummary) {
        let labels = vec![("model_name".to_string(), model_name.to_string())];
        let _ = self.vllm.model.set(labels);
        let config = vec![
            ("block_size".to_string(), pool.block_size.to_string()),
            ("cache_dtype".to_string(), pool.dtype.to_string()),
            ("num_gpu_blocks".to_string(), pool.blocks.to_string()),
        ];
        self.vllm.cache_config.get_or_create(&config).set(1);
        self.set_load(0, 0, 0.0);
    }

    /// Requests running and waiting, and the share of the pool's blocks in use, into the
    /// vLLM-named gauges (nothing before [`Metrics::set_model`]).
    pub fn set_load(&self, running: usize, waiting: usize, kv_cache_usage: f64) {
        if let Some(labels) = self.vllm.model.get() {
            self.vllm.running.get_or_create(labels).set(running as i64);
            self.vllm.waiting.get_or_create(labels).set(waiting as i64);
            self.vllm
                .kv_cache_usage
                .get_or_create(labels)
                .set(kv_cache_usage);
        }
    }

    /// The metrics in Prometheus's text exposition format.
    pub fn render(&self) -> String {
        if let Some(bytes) = resident_bytes() {
            self.resident_memory.set(bytes as i64);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// This process's resident memory (`VmRSS` in `/proc/self/status`), where Linux reports it.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::new();
        m.prefix_cache_hits.inc_by(32);
        m.kv_blocks_used.set(5);
        m.time_to_first_token.observe(0.25);
        let text = m.render();
        assert!(
            text.contains("kv_serve_prefix_cache_hits_total 32"),
            "{text}"
        );
        assert!(text.contains("kv_serve_kv_cache_blocks_used 5"), "{text}");
        assert!(
            text.contains("kv_serve_time_to_first_token_seconds_count 1"),
            "{text}"
        );
        if cfg!(target_os = "linux") {
            assert!(
                !text.contains("kv_serve_process_resident_memory_bytes 0\n"),
                "{text}"
            );
        }
    }
}
