//! `kv-bench serve-load`: streamed completions against a running OpenAI-compatible server.

use std::time::Duration;

use kv_bench::serve_load::{self, LoadSpec};

use super::*;

#[derive(Debug, Args)]
pub(crate) struct ServeLoadArgs {
    /// The server's base URL (kv-serve, llama-server, vLLM...).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// The `model` field of each request (default: left out).
    #[arg(long)]
    pub(crate) model_name: Option<String>,
    /// Bearer key, if the server needs one.
    #[arg(long, env = "KV_SERVE_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Requests in all.
    #[arg(long, default_value_t = 64)]
    pub(crate) requests: usize,
    /// Most requests in flight.
    #[arg(long, default_value_t = 8)]
    pub(crate) concurrency: usize,
    /// Mean arrivals per second, Poisson (default: all at once, held back by --concurrency).
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Prompt length in tokens (random ids, so every server sees the same tokens).
    #[arg(long, default_value_t = 128)]
    pub(crate) prompt_tokens: usize,
    /// Tokens every prompt shares at its start.
    #[arg(long, default_value_t = 0)]
    pub(crate) shared_prefix: usize,
    /// Tokens generated per request (`ignore_eos`, so every request generates them all).
    #[arg(long, default_value_t = 128)]
    pub(crate) new_tokens: usize,
    /// Share of requests that hang up mid-stream, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    pub(crate) disconnect: f64,
    /// Prompt ids are drawn from [100, VOCAB).
    #[arg(long, default_value_t = 40_000)]
    pub(crate) vocab: u32,
    /// Goodput's time-to-first-token limit, in ms.
    #[arg(long, default_value_t = 2000.0)]
    pub(crate) ttft_limit_ms: f64,
    /// Goodput's limit on a request's mean inter-token latency, in ms.
    #[arg(long, default_value_t = 200.0)]
    pub(crate) itl_limit_ms: f64,
    /// Seed of prompts, arrivals and hang-ups.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Write every number here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

pub(crate) fn serve_load(args: &ServeLoadArgs) -> Result<(), BenchError> {
    if args.requests == 0 || args.concurrency == 0 || args.new_tokens == 0 {
        return Err(BenchError::Usage(
            "--requests, --concurrency and --new-tokens must be at least 1".into(),
        ));
    }
    if !(0.0..=1.0).contains(&args.disconnect) {
        return Err(BenchError::Usage(format!(
            "--disconnect is a share in [0, 1], got {}",
            args.disconnect
        )));
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(BenchError::Usage("--rate must be positive".into()));
    }
    let spec = LoadSpec {
        url: args.url.clone(),
        model: args.model_name.clone(),
        api_key: args.api_key.clone(),
        requests: args.requests,
        concurrency: args.concurrency,
        rate: args.rate,
        prompt_tokens: args.prompt_tokens,
        shared_prefix: args.shared_prefix,
        new_tokens: args.new_tokens,
        disconnect: args.disconnect,
        vocab: args.vocab,
        ttft_limit: Duration::from_secs_f64(args.ttft_limit_ms / 1e3),
        itl_limit: Duration::from_secs_f64(args.itl_limit_ms / 1e3),
        seed: args.seed,
    };
    let rss = "kv_serve_process_resident_memory_bytes";
    let blocks = "kv_serve_kv_cache_blocks_used";
    let rss_before = serve_load::scrape(&args.url, rss);
    let report = serve_load::run(&spec);
    let mut json = report.to_json(&spec);
    // kv-serve's own view after the load: blocks still held, resident memory.
    json["server"] = json!({
        "rss_bytes_before": rss_before,
        "rss_bytes_after": serve_load::scrape(&args.url, rss),
        "kv_blocks_used_after": serve_load::scrape(&args.url, blocks),
    });
    let ms = |key: &str, p: &str| json[key][p].as_f64().unwrap_or(0.0);
    println!(
        "{} requests to {} at concurrency {}{}: {} completed, {} hung up, {} failed in {:.1} s",
        args.requests,
        args.url,
        args.concurrency,
        args.rate.map_or(String::new(), |r| format!(", {r}/s")),
        json["completed"],
        json["disconnected"],
        json["failed"],
        json["duration_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "output {:.1} tok/s; {:.2} req/s; goodput {:.2} req/s (TTFT <= {} ms, mean ITL <= {} ms)",
        json["output_tokens_per_s"].as_f64().unwrap_or(0.0),
        json["requests_per_s"].as_f64().unwrap_or(0.0),
        json["goodput_requests_per_s"].as_f64().unwrap_or(0.0),
        args.ttft_limit_ms,
        args.itl_limit_ms
    );
    for (name, key) in [
        ("TTFT", "ttft_ms"),
        ("ITL", "itl_ms"),
        ("end to end", "e2e_ms"),
    ] {
        println!(
            "{name:>10} ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  mean {:.1}",
            ms(key, "p50"),
            ms(key, "p90"),
            ms(key, "p99"),
            ms(key, "mean")
        );
    }
    if let Some(errors) = json["errors"].as_array().filter(|e| !e.is_empty()) {
        println!("first errors: {errors:?}");
    }
    if let (Some(before), Some(after)) = (
        json["server"]["rss_bytes_before"].as_f64(),
        json["server"]["rss_bytes_after"].as_f64(),
    ) {
        println!(
            "server: resident {:.1} MB before, {:.1} MB after; KV blocks in use after: {}",
            before / 1e6,
            after / 1e6,
            json["server"]["kv_blocks_used_after"]
        );
    }
    if let Some(path) = &args.json {
        write(path, &serde_json::to_string_pretty(&json).expect("JSON"))?;
    }
    Ok(())
}
