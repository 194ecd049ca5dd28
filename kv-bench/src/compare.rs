//! The seed's experiment: the same prompt and number of new tokens, generated without a cache
//! and through each cache kind, several times, with every step timed. Optionally a peer
//! (transformers or llama.cpp) runs in the same loop, interleaved, so ratios hold on a noisy
//! machine.

use std::path::PathBuf;
use std::process::Command;

use burn::tensor::backend::Backend;
use kv_generate::{CacheChoice, EosPolicy, GenerationConfig, Generator};
use kv_model::Transformer;
use serde_json::{json, Value};

use crate::mean_std;
use crate::plot::Series;

/// What to run.
#[derive(Debug, Clone)]
pub struct CompareSpec {
    /// Prompt ids (already tokenized).
    pub prompt_ids: Vec<u32>,
    /// Tokens to generate per run (generation never stops early).
    pub new_tokens: usize,
    /// Timed runs per kind.
    pub runs: usize,
    /// Untimed runs per kind first.
    pub warmup: usize,
    /// Cache kinds (`none` first).
    pub caches: Vec<CacheChoice>,
    /// The peer, if asked for.
    pub peer: Option<Peer>,
}

/// Which system runs beside kv-cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// Hugging Face transformers on PyTorch, f32 (`peers/hf_transformers.py`), with its
    /// `DynamicCache` and without a cache.
    Transformers,
    /// llama.cpp on the GGUF file as stored (`peers/llama_cpp.py`), with its own cache only.
    LlamaCpp,
}

impl PeerKind {
    /// The peer script, in this crate's `peers/` folder.
    pub fn script(self) -> PathBuf {
        let name = match self {
            PeerKind::Transformers => "hf_transformers.py",
            PeerKind::LlamaCpp => "llama_cpp.py",
        };
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("peers")
            .join(name)
    }

    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Transformers => "transformers",
            PeerKind::LlamaCpp => "llama.cpp",
        }
    }

    /// Whether the peer can generate without a cache.
    fn runs_uncached(self) -> bool {
        self == PeerKind::Transformers
    }
}

impl std::str::FromStr for PeerKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "hf" | "transformers" => Ok(PeerKind::Transformers),
            "llama-cpp" | "llama.cpp" => Ok(PeerKind::LlamaCpp),
            other => Err(format!("unknown peer `{other}` (hf, llama-cpp)")),
        }
    }
}

/// How to run a peer script.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Which peer.
    pub kind: PeerKind,
    /// Python interpreter with the peer's packages (torch and transformers, or numpy for
    /// llama.cpp's bindings).
    pub python: String,
    /// The model path (HF directory or GGUF), as given to us.
    pub model: PathBuf,
    /// Threads for the peer.
    pub threads: usize,
    /// Device: `cpu`, or `cuda` for transformers.
    pub device: String,
}

impl Peer {
    /// The peer's name in tables: which and where it ran.
    fn system(&self) -> String {
        if self.device == "cpu" {
            format!("{} ({} threads)", self.kind.name(), self.threads)
        } else {
            format!("{} ({})", self.kind.name(), self.device)
        }
    }
}

/// One timed generation.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// Prefill plus decode, seconds.
    pub total_s: f64,
    /// Prompt pass, milliseconds.
    pub prefill_ms: f64,
    /// Every decode step, milliseconds.
    pub step_ms: Vec<f64>,
    /// Tokens generated.
    pub generated: usize,
    /// Cache bytes at the end (`None` when the system does not report them).
    pub cache_bytes: Option<usize>,
}

/// All runs of one system and cache kind.
#[derive(Debug, Clone, PartialEq)]
pub struct KindResult {
    /// `kv-cache (backend)` or the peer's name.
    pub system: String,
    /// Cache kind name (`none`, `dynamic`, ...).
    pub cache: String,
    /// Timed runs.
    pub runs: Vec<RunResult>,
}

impl KindResult {
    /// Mean and standard deviation of the total time, seconds.
    pub fn total(&self) -> (f64, f64) {
        mean_std(&self.runs.iter().map(|r| r.total_s).collect::<Vec<_>>())
    }

    /// Decode tokens per second, over all runs (the first token comes from the prefill).
    pub fn tokens_per_second(&self) -> f64 {
        let steps: usize = self.runs.iter().map(|r| r.step_ms.len()).sum();
        let ms: f64 = self.runs.iter().flat_map(|r| r.step_ms.iter()).sum();
        if ms > 0.0 {
            steps as f64 / (ms / 1e3)
        } else {
            0.0
        }
    }

    /// Mean prefill time over the runs, milliseconds.
    pub fn prefill_ms(&self) -> f64 {
        mean_std(&self.runs.iter().map(|r| r.prefill_ms).collect::<Vec<_>>()).0
    }

    /// How step cost grows along the sequence: the median latency of the steps around position
    /// `early` and of the last ten steps, as `(early position, ms, late position, ms)`. Step `i`
    /// feeds the token at position `prompt_len + i`. `None` with fewer than 20 steps or an
    /// `early` position inside the prompt.
    pub fn step_growth(&self, prompt_len: usize, early: usize) -> Option<(usize, f64, usize, f64)> {
        let steps = self.median_steps();
        if steps.len() < 20 || early < prompt_len {
            return None;
        }
        let median = |window: &[f64]| {
            let mut w = window.to_vec();
            w.sort_by(f64::total_cmp);
            w[w.len() / 2]
        };
        let at = early - prompt_len;
        let early_window = &steps[at.saturating_sub(5)..(at + 5).min(steps.len())];
        let late_window = &steps[steps.len() - 10..];
        Some((
            early,
            median(early_window),
            prompt_len + steps.len() - 5,
            median(late_window),
        ))
    }

    /// The per-position median step latency over the runs, for the plot.
    pub fn median_steps(&self) -> Vec<f64> {
        let steps = self.runs.iter().map(|r| r.step_ms.len()).min().unwrap_or(0);
        (0..steps)
            .map(|i| {
                let mut at: Vec<f64> = self.runs.iter().map(|r| r.step_ms[i]).collect();
                at.sort_by(f64::total_cmp);
                at[at.len() / 2]
            })
            .collect()
    }

    fn to_json(&self) -> Value {
        let (mean, std) = self.total();
        json!({
            "system": self.system,
            "cache": self.cache,
            "mean_total_s": mean,
            "std_total_s": std,
            "tokens_per_s": self.tokens_per_second(),
            "runs": self.runs.iter().map(|r| json!({
                "total_s": r.total_s,
                "prefill_ms": r.prefill_ms,
                "step_ms": r.step_ms,
                "generated": r.generated,
                "cache_bytes": r.cache_bytes,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Why a comparison failed.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] kv_generate::GenerateError),
    /// The peer could not run or gave unreadable output.
    #[error("peer: {0}")]
    Peer(String),
}

/// Runs the experiment: for each run, every kind once (and the peer, with and without its
/// cache, right after), so slow drifts of the machine hit every kind alike.
pub fn run<B: Backend>(
    model: &Transformer<B>,
    backend: &str,
    spec: &CompareSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<KindResult>, CompareError> {
    let generator = Generator::new(model, None);
    let system = format!("kv-cache ({backend})");
    let mut results: Vec<KindResult> = spec
        .caches
        .iter()
        .map(|c| KindResult {
            system: system.clone(),
            cache: c.name().into(),
            runs: Vec::new(),
        })
        .collect();
    // The peer runs without a cache only when we do and it can.
    let with_none = spec.caches.iter().any(|c| matches!(c, CacheChoice::None))
        && spec.peer.as_ref().is_some_and(|p| p.kind.runs_uncached());
    let peer_kinds: &[&str] = if with_none {
        &["none", "dynamic"]
    } else {
        &["dynamic"]
    };
    if let Some(peer) = &spec.peer {
        for kind in peer_kinds {
            results.push(KindResult {
                system: peer.system(),
                cache: (*kind).into(),
                runs: Vec::new(),
            });
        }
    }
    let total_runs = spec.warmup + spec.runs;
    for run in 0..total_runs {
        let timed = run >= spec.warmup;
        for (i, cache) in spec.caches.iter().enumerate() {
            progress(&format!(
                "run {}/{} ({}), cache {}",
                run + 1,
                total_runs,
                if timed { "timed" } else { "warm-up" },
                cache.name()
            ));
            let config = GenerationConfig {
                max_new_tokens: spec.new_tokens,
                eos: EosPolicy::Ignore,
                cache: cache.clone(),
                ..GenerationConfig::default()
            };
            let out = generator.generate(
                std::slice::from_ref(&spec.prompt_ids),
                &config,
                &mut |_, _| {},
            )?;
            if timed {
                let t = &out.timings;
                results[i].runs.push(RunResult {
                    total_s: (t.prefill + t.decode).as_secs_f64(),
                    prefill_ms: t.prefill.as_secs_f64() * 1e3,
                    step_ms: t
                        .step_latencies
                        .iter()
                        .map(|d| d.as_secs_f64() * 1e3)
                        .collect(),
                    generated: out.rows[0].generated_ids.len(),
                    cache_bytes: Some(out.cache_bytes),
                });
            }
        }
        if let Some(peer) = &spec.peer {
            for (k, kind) in peer_kinds.iter().enumerate() {
                progress(&format!(
                    "run {}/{}, {}, cache {kind}",
                    run + 1,
                    total_runs,
                    peer.kind.name()
                ));
                let result = run_peer(peer, spec, kind)?;
                if timed {
                    results[spec.caches.len() + k].runs.push(result);
                }
            }
        }
    }
    Ok(results)
}

fn run_peer(peer: &Peer, spec: &CompareSpec, kind: &str) -> Result<RunResult, CompareError> {
    let ids: Vec<String> = spec.prompt_ids.iter().map(u32::to_string).collect();
    let script = peer.kind.script();
    let mut command = Command::new(&peer.python);
    if peer.kind == PeerKind::Transformers {
        // PyTorch's OpenMP threads otherwise spin while waiting and, on shared cores, run
        // about 10x slower. llama.cpp's threads are meant to spin between graph nodes: left as
        // they are (passive waiting made its decode 3x slower).
        command.env("OMP_WAIT_POLICY", "PASSIVE");
    }
    let out = command
        .arg(&script)
        .arg("--model")
        .arg(&peer.model)
        .args(["--prompt-ids", &ids.join(",")])
        .args(["--new-tokens", &spec.new_tokens.to_string()])
        .args(["--cache", kind, "--threads", &peer.threads.to_string()])
        .args(["--device", &peer.device])
        .output()
        .map_err(|e| CompareError::Peer(format!("could not run {}: {e}", peer.python)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("no message");
        return Err(CompareError::Peer(format!(
            "{} failed: {last}",
            script.display()
        )));
    }
    let json: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CompareError::Peer(format!("unreadable output: {e}")))?;
    let number = |key: &str| json[key].as_f64().unwrap_or(0.0);
    Ok(RunResult {
        total_s: number("total_s"),
        prefill_ms: number("prefill_ms"),
        step_ms: json["step_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
        generated: json["generated"].as_u64().unwrap_or(0) as usize,
        cache_bytes: None,
    })
}

/// The seed's table, one line per system and kind, with tokens/s and the speedup over the
/// same system without a cache, then kv-cache's cached decode speed over the peer's.
pub fn table(results: &[KindResult]) -> String {
    let mut lines = Vec::new();
    for r in results {
        let (mean, std) = r.total();
        let label = if r.cache == "none" {
            "without KV caching".to_owned()
        } else {
            format!("with KV caching ({})", r.cache)
        };
        let baseline = results
            .iter()
            .find(|b| b.system == r.system && b.cache == "none")
            .map(|b| b.total().0);
        let speedup = baseline.map_or(String::new(), |b| format!(", {:.2}x over none", b / mean));
        lines.push(format!(
            "{:<28} {label}: {mean:.3} +- {std:.3} seconds ({:.1} tokens/s{speedup}; prefill {:.1} ms)",
            r.system,
            r.tokens_per_second(),
            r.prefill_ms()
        ));
    }
    let ours = results
        .iter()
        .find(|r| r.system.starts_with("kv-cache") && r.cache != "none");
    let theirs = results
        .iter()
        .find(|r| !r.system.starts_with("kv-cache") && r.cache != "none");
    if let (Some(ours), Some(theirs)) = (ours, theirs) {
        lines.push(format!(
            "cached decode tokens/s, kv-cache ({}) over {}: {:.2}x; prefill time, {} over kv-cache: {:.2}x",
            ours.cache,
            theirs.system,
            ours.tokens_per_second() / theirs.tokens_per_second().max(f64::MIN_POSITIVE),
            theirs.system,
            theirs.prefill_ms() / ours.prefill_ms().max(f64::MIN_POSITIVE)
        ));
    }
    lines.join("\n")
}

/// `compare.json`: the setting, the machine, and every run.
pub fn report(spec: &CompareSpec, results: &[KindResult], setting: Value) -> Value {
    json!({
        "setting": setting,
        "prompt_ids": spec.prompt_ids,
        "new_tokens": spec.new_tokens,
        "runs": spec.runs,
        "warmup": spec.warmup,
        "machine": crate::machine::describe(),
        "git_commit": crate::machine::git_commit(),
        "date": crate::machine::now(),
        "results": results.iter().map(KindResult::to_json).collect::<Vec<_>>(),
    })
}

/// The plot's series: the median step latency of each system and kind.
pub fn series(results: &[KindResult]) -> Vec<Series> {
    results
        .iter()
        .map(|r| Series {
            label: format!("{} {}", r.system, r.cache),
            values: r.median_steps(),
        })
        .collect()
}
