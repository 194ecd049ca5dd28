//! Load against an OpenAI-compatible server (kv-serve, llama.cpp's `llama-server`, vLLM): a
//! bounded number of streamed completions at a concurrency and an arrival rate, timed from the
//! client's side as vLLM's `benchmark_serving` times them.
//!
//! Each request is a `/v1/completions` call with a prompt of token ids (so every server sees
//! the same tokens whatever its tokenizer) and `ignore_eos`, streamed. Time to first token
//! runs from sending the request to the first chunk with text; inter-token latency is the
//! gap between chunks with text; end to end is sending to `[DONE]`. Goodput counts the
//! requests whose time to first token and mean inter-token latency both meet their limits.
//! A share of the requests can hang up mid-stream, to check that a server frees what they held.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::throughput::Percentiles;

/// The workload.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    /// The server's base URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// The `model` field of each request (`None`: left out).
    pub model: Option<String>,
    /// `Authorization: Bearer` key, if the server needs one.
    pub api_key: Option<String>,
    /// Requests in all.
    pub requests: usize,
    /// Most requests in flight.
    pub concurrency: usize,
    /// Mean arrivals per second (Poisson); `None`: all at once.
    pub rate: Option<f64>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens every prompt shares at its start (a system prompt).
    pub shared_prefix: usize,
    /// Tokens to generate per request.
    pub new_tokens: usize,
    /// Share of requests that hang up after a few tokens.
    pub disconnect: f64,
    /// Token ids are drawn from `[100, vocab)` (from 0 for vocabularies up to 200).
    pub vocab: u32,
    /// Goodput's time-to-first-token limit.
    pub ttft_limit: Duration,
    /// Goodput's mean inter-token latency limit.
    pub itl_limit: Duration,
    /// Seed of the prompts, arrivals and hang-ups.
    pub seed: u64,
}

/// What one request saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestResult {
    /// Seconds to the first text chunk.
    pub ttft: Option<f64>,
    /// Seconds between text chunks.
    pub itls: Vec<f64>,
    /// Seconds to the end of the stream.
    pub e2e: f64,
    /// Text chunks received.
    pub chunks: usize,
    /// Completion tokens by the server's usage chunk, when it sent one.
    pub usage_tokens: Option<usize>,
    /// It hung up on purpose.
    pub disconnected: bool,
    /// Why it failed (a status and body, or a transport error).
    pub error: Option<String>,
}

impl RequestResult {
    /// Tokens generated (the usage chunk's count, else the text chunks).
    pub fn tokens(&self) -> usize {
        self.usage_tokens.unwrap_or(self.chunks)
    }

    fn mean_itl(&self) -> f64 {
        if self.itls.is_empty() {
            0.0
        } else {
            self.itls.iter().sum::<f64>() / self.itls.len() as f64
        }
    }
}

/// The run's results.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Every request, in issue order.
    pub results: Vec<RequestResult>,
    /// Seconds from the first request to the last answer.
    pub duration: f64,
}

impl LoadReport {
    /// Requests that completed (not failed, not hung up on purpose).
    pub fn completed(&self) -> impl Iterator<Item = &RequestResult> {
        self.results
            .iter()
            .filter(|r| r.error.is_none() && !r.disconnected)
    }

    /// The report as JSON, with `spec`.
    pub fn to_json(&self, spec: &LoadSpec) -> Value {
        let completed: Vec<&RequestResult> = self.completed().collect();
        let ms = |values: Vec<f64>| {
            let p = Percentiles::of(&values.iter().map(|v| v * 1e3).collect::<Vec<_>>());
            json!({ "p50": p.p50, "p90": p.p90, "p99": p.p99, "mean": p.mean })
        };
        let tokens: usize = self
            .results
            .iter()
            .filter(|r| r.error.is_none())
            .map(RequestResult::tokens)
            .sum();
        let good = completed
            .iter()
            .filter(|r| {
                r.ttft.is_some_and(|t| t <= spec.ttft_limit.as_secs_f64())
                    && r.mean_itl() <= spec.itl_limit.as_secs_f64()
            })
            .count();
        let errors: Vec<&String> = self
            .results
            .iter()
            .filter_map(|r| r.error.as_ref())
            .collect();
        let duration = self.duration.max(1e-9);
        json!({
            "url": spec.url,
            "requests": spec.requests,
            "concurrency": spec.concurrency,
            "rate_per_s": spec.rate,
            "prompt_tokens": spec.prompt_tokens,
            "shared_prefix": spec.shared_prefix,
            "new_tokens": spec.new_tokens,
            "disconnect_share": spec.disconnect,
            "ttft_limit_ms": spec.ttft_limit.as_secs_f64() * 1e3,
            "itl_limit_ms": spec.itl_limit.as_secs_f64() * 1e3,
            "completed": completed.len(),
            "disconnected": self.results.iter().filter(|r| r.disconnected).count(),
            "failed": errors.len(),
            "errors": errors.iter().take(10).collect::<Vec<_>>(),
            "duration_s": self.duration,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens as f64 / duration,
            "requests_per_s": completed.len() as f64 / duration,
            "goodput_requests_per_s": good as f64 / duration,
            "good_requests": good,
            "ttft_ms": ms(completed.iter().filter_map(|r| r.ttft).collect()),
            "itl_ms": ms(completed.iter().flat_map(|r| r.itls.iter().copied()).collect()),
            "e2e_ms": ms(completed.iter().map(|r| r.e2e).collect()),
        })
    }
}

/// One request's body.
fn body(spec: &LoadSpec, prompt: &[u32]) -> Value {
    let mut body = json!({
        "prompt": prompt,
        "max_tokens": spec.new_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    if let Some(model) = &spec.model {
        body["model"] = json!(model);
    }
    body
}

/// Sends one streamed request; hangs up after `hang_up_after` text chunks when given.
fn one_request(
    agent: &ureq::Agent,
    spec: &LoadSpec,
    prompt: &[u32],
    hang_up_after: Option<usize>,
) -> RequestResult {
    let start = Instant::now();
    let mut result = RequestResult::default();
    let mut request = agent
        .post(&format!(
            "{}/v1/completions",
            spec.url.trim_end_matches('/')
        ))
        .set("Content-Type", "application/json");
    if let Some(key) = &spec.api_key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    let response = match request.send_string(&body(spec, prompt).to_string()) {
        Ok(response) => response,
        Err(ureq::Error::Status(status, response)) => {
            let text = response.into_string().unwrap_or_default();
            result.error = Some(format!("HTTP {status}: {}", text.trim()));
            result.e2e = start.elapsed().as_secs_f64();
            return result;
        }
        Err(e) => {
            result.error = Some(e.to_string());
            result.e2e = start.elapsed().as_secs_f64();
            return result;
        }
    };
    let mut last = None;
    for line in BufReader::new(response.into_reader()).lines() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                result.error = Some(format!("reading the stream: {e}"));
                break;
            }
        };
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            result.error = Some(format!("not JSON: {data}"));
            break;
        };
        if let Some(error) = chunk.get("error") {
            result.error = Some(error.to_string());
            break;
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            result.usage_tokens = Some(n as usize);
        }
        let text = chunk["choices"][0]["text"].as_str().unwrap_or("");
        if text.is_empty() {
            continue;
        }
        let now = start.elapsed().as_secs_f64();
        match last {
            None => result.ttft = Some(now),
            Some(before) => result.itls.push(now - before),
        }
        last = Some(now);
        result.chunks += 1;
        if hang_up_after.is_some_and(|n| result.chunks >= n) {
            // Dropping the reader closes the connection.
            result.disconnected = true;
            break;
        }
    }
    result.e2e = start.elapsed().as_secs_f64();
    result
}

/// Runs the load: `spec.requests` requests from `spec.concurrency` client threads, each
/// released at its arrival time.
pub fn run(spec: &LoadSpec) -> LoadReport {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    // Past the first ids, where tokenizers keep special and control tokens.
    let low = if spec.vocab > 200 { 100 } else { 0 };
    let token = |rng: &mut ChaCha8Rng| rng.random_range(low..spec.vocab.max(low + 1));
    let prefix: Vec<u32> = (0..spec.shared_prefix.min(spec.prompt_tokens))
        .map(|_| token(&mut rng))
        .collect();
    let mut at = 0.0f64;
    let plans: Vec<(f64, Vec<u32>, Option<usize>)> = (0..spec.requests)
        .map(|_| {
            let mut prompt = prefix.clone();
            prompt.extend((prefix.len()..spec.prompt_tokens).map(|_| token(&mut rng)));
            let hang_up = (rng.random::<f64>() < spec.disconnect)
                .then(|| rng.random_range(1..spec.new_tokens.max(2)));
            let arrival = at;
            if let Some(rate) = spec.rate {
                // Exponential gaps: Poisson arrivals at `rate` per second.
                at += -(1.0 - rng.random::<f64>()).ln() / rate;
            }
            (arrival, prompt, hang_up)
        })
        .collect();
    let next = AtomicUsize::new(0);
    let results = Mutex::new(vec![RequestResult::default(); spec.requests]);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..spec.concurrency.max(1) {
            scope.spawn(|| {
                let agent = ureq::AgentBuilder::new()
                    .timeout_connect(Duration::from_secs(10))
                    .build();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((arrival, prompt, hang_up)) = plans.get(i) else {
                        return;
                    };
                    let wait = Duration::from_secs_f64(*arrival).saturating_sub(start.elapsed());
                    std::thread::sleep(wait);
                    let result = one_request(&agent, spec, prompt, *hang_up);
                    results.lock().expect("no thread panics holding it")[i] = result;
                }
            });
        }
    });
    LoadReport {
        results: results.into_inner().expect("no thread panics holding it"),
        duration: start.elapsed().as_secs_f64(),
    }
}

/// A metric's value from a server's `/metrics` (Prometheus text), if it has it.
pub fn scrape(url: &str, name: &str) -> Option<f64> {
    let text = ureq::get(&format!("{}/metrics", url.trim_end_matches('/')))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goodput_counts_only_requests_within_both_limits() {
        let spec = LoadSpec {
            url: "http://x".into(),
            model: None,
            api_key: None,
            requests: 3,
            concurrency: 1,
            rate: None,
            prompt_tokens: 4,
            shared_prefix: 0,
            new_tokens: 3,
            disconnect: 0.0,
            vocab: 1000,
            ttft_limit: Duration::from_millis(100),
            itl_limit: Duration::from_millis(20),
            seed: 0,
        };
        let ok = RequestResult {
            ttft: Some(0.05),
            itls: vec![0.01, 0.02],
            e2e: 0.08,
            chunks: 3,
            ..RequestResult::default()
        };
        let slow_first = RequestResult {
            ttft: Some(0.5),
            ..ok.clone()
        };
        let failed = RequestResult {
            error: Some("HTTP 503".into()),
            ..RequestResult::default()
        };
        let report = LoadReport {
            results: vec![ok, slow_first, failed],
            duration: 1.0,
        };
        let json = report.to_json(&spec);
        assert_eq!(json["completed"], 2);
        assert_eq!(json["failed"], 1);
        assert_eq!(json["good_requests"], 1);
        assert_eq!(json["output_tokens"], 6);
        assert_eq!(json["ttft_ms"]["p50"].as_f64().unwrap().round(), 50.0);
    }
}
