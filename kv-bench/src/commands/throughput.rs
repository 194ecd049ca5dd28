//! `kv-bench throughput`: requests through the continuous-batching engine, at each
//! concurrency asked, beside one request alone through a dynamic cache.

use kv_bench::throughput::{self, ThroughputReport, Workload};
use kv_core::BlockOrder;
use kv_generate::engine::{EngineConfig, PoolSize};

use super::*;

#[derive(Debug, Args)]
pub(crate) struct ThroughputArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Requests per run.
    #[arg(long, default_value_t = 16)]
    pub(crate) requests: usize,
    /// Requests in flight at once; one run per value.
    #[arg(long, num_args = 1.., default_values_t = vec![1, 8])]
    pub(crate) concurrency: Vec<usize>,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 128)]
    pub(crate) prompt_tokens: usize,
    /// Tokens each request generates (EOS ignored).
    #[arg(long, default_value_t = 128)]
    pub(crate) new_tokens: usize,
    /// Leading tokens every prompt shares (the prefix cache serves them after the first).
    #[arg(long, default_value_t = 0)]
    pub(crate) shared_prefix: usize,
    /// Mean arrivals per second (Poisson); without it every request is ready at once and only
    /// the concurrency holds them back.
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Positions per KV block.
    #[arg(long, default_value_t = kv_core::DEFAULT_BLOCK_SIZE)]
    pub(crate) block_size: usize,
    /// Positions the KV pool holds (default: every request in flight at full length, twice).
    #[arg(long)]
    pub(crate) pool_tokens: Option<usize>,
    /// What the pool stores keys and values as: f32, f16 or int8 (host models only).
    #[arg(long, default_value_t = kv_core::KvDtype::F32)]
    pub(crate) kv_cache_dtype: kv_core::KvDtype,
    /// Most tokens one step feeds (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = kv_generate::engine::DEFAULT_TOKEN_BUDGET)]
    pub(crate) token_budget: usize,
    /// Seed of the prompts and arrivals.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Skip the run of one request alone through a dynamic cache.
    #[arg(long)]
    pub(crate) no_baseline: bool,
    /// Write the report here (JSON).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

/// `kv-bench throughput` on the backend chosen.
pub(crate) struct Throughput<'a>(pub(crate) &'a ThroughputArgs);

impl OnBackend for Throughput<'_> {
    type Output = Result<(), BenchError>;

    fn run<B: Backend>(self, kind: BackendKind, device: B::Device) -> Self::Output {
        let args = self.0;
        if args.shared_prefix > args.prompt_tokens || args.prompt_tokens == 0 {
            return Err(BenchError::Usage(format!(
                "--shared-prefix ({}) must be at most --prompt-tokens ({}), which must be at \
                 least 1",
                args.shared_prefix, args.prompt_tokens
            )));
        }
        let path = model_path(&args.model.model)?;
        eprintln!("kv-bench: loading {}", path.display());
        let placement = kind.placement(args.model.weights)?;
        let model = load_model_placed::<B>(&path, placement, &device)?
            .model
            .with_execution(kind.execution());
        let per_request = args.prompt_tokens + args.new_tokens;
        let most = args.concurrency.iter().copied().max().unwrap_or(1);
        let config = EngineConfig {
            pool: PoolSize::Tokens(args.pool_tokens.unwrap_or(2 * most * per_request)),
            block_size: args.block_size,
            max_running: most,
            token_budget: args.token_budget,
            block_order: BlockOrder::Ascending,
            kv_dtype: args.kv_cache_dtype,
            ..EngineConfig::default()
        };
        let workload = |concurrency| Workload {
            requests: args.requests,
            concurrency,
            prompt_tokens: args.prompt_tokens,
            shared_prefix: args.shared_prefix,
            new_tokens: args.new_tokens,
            rate: args.rate,
            seed: args.seed,
        };

        // One request alone through the single-sequence path, for the ratios.
        let baseline = if args.no_baseline {
            None
        } else {
            let prompt = workload(1).prompts(model.config().vocab_size).remove(0);
            let generation = GenerationConfig {
                max_new_tokens: args.new_tokens,
                eos: EosPolicy::Ignore,
                cache: CacheChoice::Cache(CacheConfig::Dynamic {
                    capacity: per_request,
                }),
                ..GenerationConfig::default()
            };
            let out =
                Generator::new(&model, None).generate(&[prompt], &generation, &mut |_, _| {})?;
            let t = &out.timings;
            let decode_tokens_per_s =
                (t.generated.saturating_sub(1)) as f64 / t.decode.as_secs_f64().max(1e-9);
            let total = (t.prefill + t.decode).as_secs_f64();
            eprintln!(
                "kv-bench: alone, dynamic cache: first token {:.1} ms, decode {decode_tokens_per_s:.1} tok/s",
                t.prefill.as_secs_f64() * 1e3
            );
            Some(json!({
                "ttft_ms": t.prefill.as_secs_f64() * 1e3,
                "decode_tokens_per_s": decode_tokens_per_s,
                "tokens_per_s": t.generated as f64 / total,
            }))
        };

        let summary =
            kv_generate::engine::Engine::new(&model, None, config.clone())?.pool_summary();
        eprintln!("kv-bench: {summary}");
        let mut runs: Vec<ThroughputReport> = Vec::new();
        for &concurrency in &args.concurrency {
            eprintln!(
                "kv-bench: {} requests, {concurrency} at a time, {} prompt tokens ({} shared), {} new",
                args.requests, args.prompt_tokens, args.shared_prefix, args.new_tokens
            );
            runs.push(throughput::run(
                &model,
                config.clone(),
                &workload(concurrency),
            )?);
        }

        println!(
            "{:>11} {:>9} {:>10} {:>22} {:>22} {:>9} {:>11} {:>8}",
            "concurrency",
            "tok/s",
            "x first",
            "TTFT ms p50/p90/p99",
            "ITL ms p50/p90/p99",
            "step ms",
            "prefix hit",
            "preempt"
        );
        let first = runs.first().map_or(1.0, |r| r.aggregate_tokens_per_s);
        for r in &runs {
            let p = |p: &throughput::Percentiles| format!("{:.0}/{:.0}/{:.0}", p.p50, p.p90, p.p99);
            println!(
                "{:>11} {:>9.1} {:>10.2} {:>22} {:>22} {:>9.1} {:>11} {:>8}",
                r.concurrency,
                r.aggregate_tokens_per_s,
                r.aggregate_tokens_per_s / first,
                p(&r.ttft_ms),
                p(&r.itl_ms),
                r.step_ms,
                r.prefix_hit_tokens,
                r.preemptions
            );
            if args.shared_prefix > 0 && r.ttft_hit_ms.p50 > 0.0 && r.ttft_miss_ms.p50 > 0.0 {
                println!(
                    "{:>11} time to first token: {:.1} ms on a prefix miss, {:.1} ms on a hit (p50), {:.1}x",
                    "",
                    r.ttft_miss_ms.p50,
                    r.ttft_hit_ms.p50,
                    r.ttft_miss_ms.p50 / r.ttft_hit_ms.p50
                );
            }
        }
        if let Some(out) = &args.json {
            let report = json!({
                "model": path.display().to_string(),
                "backend": kind.name(),
                "weights": weight_name(placement),
                "machine": kv_bench::machine::describe(),
                "git_commit": kv_bench::machine::git_commit(),
                "date": kv_bench::machine::now(),
                "threads": threads(),
                "pool": {
                    "blocks": summary.blocks,
                    "block_size": summary.block_size,
                    "bytes": summary.bytes,
                },
                "token_budget": args.token_budget,
                "requests": args.requests,
                "prompt_tokens": args.prompt_tokens,
                "shared_prefix": args.shared_prefix,
                "new_tokens": args.new_tokens,
                "rate": args.rate,
                "alone_dynamic": baseline,
                "runs": runs,
            });
            write(
                out,
                &serde_json::to_string_pretty(&report).unwrap_or_default(),
            )?;
        }
        Ok(())
    }
}
