//! Requests through the continuous-batching engine ([`kv_generate::engine::Engine`]): a
//! workload of prompts that may share a prefix, a concurrency and an arrival pattern, and what
//! users feel (time to first token, inter-token latency, end to end) and what the operator
//! gets (aggregate tokens per second), as serving benchmarks report them (vLLM's
//! `benchmark_serving`, llama.cpp's server bench).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use kv_generate::engine::{Engine, EngineConfig, EngineEvent, Request, RequestId};
use kv_generate::{EosPolicy, GenerateError};
use kv_model::Transformer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// The requests of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Requests in all.
    pub requests: usize,
    /// Most requests in flight at once (a closed loop: a new one starts when one ends).
    pub concurrency: usize,
    /// Tokens per prompt.
    pub prompt_tokens: usize,
    /// The first tokens every prompt shares (at most `prompt_tokens`).
    pub shared_prefix: usize,
    /// Tokens each request generates (EOS ignored, so every request runs its length).
    pub new_tokens: usize,
    /// Mean arrivals per second (Poisson); `None`: every request is ready at the start.
    pub rate: Option<f64>,
    /// Seed of the prompts' tokens and of the arrival times.
    pub seed: u64,
}

impl Workload {
    /// The prompts: `shared_prefix` tokens common to all, then each request's own.
    pub fn prompts(&self, vocab: usize) -> Vec<Vec<u32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let shared: Vec<u32> = (0..self.shared_prefix.min(self.prompt_tokens))
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        (0..self.requests)
            .map(|_| {
                let mut prompt = shared.clone();
                prompt.extend(
                    (prompt.len()..self.prompt_tokens).map(|_| rng.random_range(0..vocab as u32)),
                );
                prompt
            })
            .collect()
    }

    /// When each request arrives, from the start of the run.
    pub fn arrivals(&self) -> Vec<Duration> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed);
        let mut at = 0.0f64;
        (0..self.requests)
            .map(|_| match self.rate {
                Some(rate) if rate > 0.0 => {
                    // Exponential gaps: a Poisson process of `rate` arrivals per second.
                    at += -(1.0 - rng.random::<f64>()).ln() / rate;
                    Duration::from_secs_f64(at)
                }
                _ => Duration::ZERO,
            })
            .collect()
    }
}

/// The 50th, 90th and 99th percentiles of a sample (nearest rank), in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Of `values` (zeros when empty).
    ///
    /// ```
    /// let p = kv_bench::throughput::Percentiles::of(&[1.0, 2.0, 3.0, 4.0]);
    /// assert_eq!((p.p50, p.p90, p.p99, p.mean), (2.0, 4.0, 4.0, 2.5));
    /// ```
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank =
            |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Self {
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ThroughputReport {
    /// Requests completed.
    pub requests: usize,
    /// Most in flight at once.
    pub concurrency: usize,
    /// Wall time from the first arrival to the last token.
    pub duration_s: f64,
    /// Tokens generated over all requests.
    pub generated_tokens: usize,
    /// Generated tokens per second of wall time, all requests together.
    pub aggregate_tokens_per_s: f64,
    /// Time from sending a request to its first token.
    pub ttft_ms: Percentiles,
    /// Time to first token of the requests that found part of their prompt cached.
    pub ttft_hit_ms: Percentiles,
    /// ... and of those that found none.
    pub ttft_miss_ms: Percentiles,
    /// Time between consecutive tokens of a request.
    pub itl_ms: Percentiles,
    /// Sending to last token.
    pub e2e_ms: Percentiles,
    /// Prompt tokens taken from the prefix cache instead of computed.
    pub prefix_hit_tokens: usize,
    /// Requests preempted (blocks given back, recomputed later).
    pub preemptions: usize,
    /// Forward passes.
    pub steps: usize,
    /// Mean time of one step.
    pub step_ms: f64,
}

/// Runs `workload` through a fresh engine over `model`, arrivals at their times and at most
/// `workload.concurrency` requests in flight.
///
/// # Errors
/// The engine's (a request that does not fit the pool, ...).
pub fn run<B: Backend>(
    model: &Transformer<B>,
    config: EngineConfig,
    workload: &Workload,
) -> Result<ThroughputReport, GenerateError> {
    let prompts = workload.prompts(model.config().vocab_size);
    let arrivals = workload.arrivals();
    let mut engine = Engine::new(
        model,
        None,
        EngineConfig {
            max_running: workload.concurrency.max(1),
            ..config
        },
    )?;
    struct Timeline {
        arrived: Instant,
        tokens: Vec<Instant>,
        cached: usize,
    }
    let mut timelines: HashMap<RequestId, Timeline> = HashMap::new();
    let mut in_flight = 0;
    let mut next = 0;
    let start = Instant::now();
    let mut step_time = Duration::ZERO;
    let mut finished = Vec::new();
    while next < prompts.len() || engine.has_work() {
        // Admit what has arrived, up to the concurrency.
        while next < prompts.len()
            && in_flight < workload.concurrency.max(1)
            && start.elapsed() >= arrivals[next]
        {
            let request = Request {
                eos: EosPolicy::Ignore,
                ..Request::greedy(prompts[next].clone(), workload.new_tokens)
            };
            let id = engine.add_request(request)?;
            // A request's clock starts when it is sent, as a client's does (vLLM's and
            // llama.cpp's serving benchmarks measure the same way).
            timelines.insert(
                id,
                Timeline {
                    arrived: Instant::now(),
                    tokens: Vec::new(),
                    cached: 0,
                },
            );
            in_flight += 1;
            next += 1;
        }
        if !engine.has_work() {
            std::thread::sleep(arrivals[next].saturating_sub(start.elapsed()));
            continue;
        }
        let before = Instant::now();
        let events = engine.step()?;
        let now = Instant::now();
        step_time += now - before;
        for event in events {
            match event {
                EngineEvent::Token { request, .. } => {
                    timelines
                        .get_mut(&request)
                        .expect("added above")
                        .tokens
                        .push(now);
                }
                EngineEvent::Finished { request, usage, .. } => {
                    let mut timeline = timelines.remove(&request).expect("added above");
                    timeline.cached = usage.cached_prompt_tokens;
                    finished.push(timeline);
                    in_flight -= 1;
                }
            }
        }
    }
    let duration = start.elapsed().as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ttft = |keep: &dyn Fn(&Timeline) -> bool| -> Vec<f64> {
        finished
            .iter()
            .filter(|t| keep(t))
            .map(|t| ms(t.tokens[0] - t.arrived))
            .collect()
    };
    let itl: Vec<f64> = finished
        .iter()
        .flat_map(|t| t.tokens.windows(2).map(|w| ms(w[1] - w[0])))
        .collect();
    let e2e: Vec<f64> = finished
        .iter()
        .map(|t| ms(*t.tokens.last().expect("a finished request has a token") - t.arrived))
        .collect();
    let stats = engine.stats();
    Ok(ThroughputReport {
        requests: finished.len(),
        concurrency: workload.concurrency,
        duration_s: duration,
        generated_tokens: stats.generated_tokens,
        aggregate_tokens_per_s: stats.generated_tokens as f64 / duration,
        ttft_ms: Percentiles::of(&ttft(&|_| true)),
        ttft_hit_ms: Percentiles::of(&ttft(&|t| t.cached > 0)),
        ttft_miss_ms: Percentiles::of(&ttft(&|t| t.cached == 0)),
        itl_ms: Percentiles::of(&itl),
        e2e_ms: Percentiles::of(&e2e),
        prefix_hit_tokens: stats.prefix_hit_tokens,
        preemptions: stats.preemptions,
        steps: stats.steps,
        step_ms: ms(step_time) / stats.steps.max(1) as f64,
    })
}
