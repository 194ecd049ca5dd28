//! # kv-serve
//!
//! An OpenAI-compatible HTTP server on kv-generate's continuously batching [`Engine`]: any
//! OpenAI client (the official Python package, curl, LangChain...) talks to it.
//!
//! - **Routes**: `POST /v1/chat/completions` (messages through the model's chat template),
//!   `POST /v1/completions` (text, texts, token ids or lists of them), `GET /v1/models`,
//!   `GET /health` (503 while the model loads), `GET /metrics` (Prometheus), `POST /tokenize`,
//!   `POST /detokenize`, `POST /prompt_cache/save` and `/prompt_cache/restore` (a prompt's
//!   cached blocks to a file and back, [`prompt_cache`]), and `POST /reset_prefix_cache`.
//!   Streaming is Server-Sent Events in OpenAI's order.
//! - **Routers**: vLLM's metric names and render routes, and its KV events over ZeroMQ
//!   ([`kv_events`]), for the Kubernetes inference gateway's endpoint picker.
//! - **Threads**: the engine runs on a thread of its own ([`worker`]); the HTTP side runs on
//!   tokio and never blocks it. Each request's choices become engine requests that join the
//!   running batch at the next step; a client that disconnects cancels them, and their blocks
//!   are back in the pool before the following step.
//! - **Bad input** gets OpenAI's error body with a 4xx status and the field at fault
//!   ([`ApiError`]); a full queue gets 503 with `Retry-After`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use burn_ndarray::NdArray;
//! use kv_generate::engine::EngineConfig;
//! use kv_serve::{worker::Loaded, App, Settings};
//!
//! # async fn run() -> std::io::Result<()> {
//! let app = App::start::<NdArray, _>(
//!     || {
//!         let loaded = kv_model::load_model::<NdArray>("model.gguf".as_ref(), &Default::default())
//!             .map_err(|e| e.to_string())?;
//!         Ok(Loaded {
//!             model: loaded.model,
//!             tokenizer: loaded.tokenizer,
//!             id: "model".into(),
//!             fingerprint: kv_serve::model_fingerprint("model.gguf".as_ref(), "native/ndarray")
//!                 .map_err(|e| e.to_string())?,
//!             speculation: None,
//!         })
//!     },
//!     EngineConfig::default(),
//!     Settings::default(),
//!     None, // no KV events
//! );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app.router).await
//! # }
//! ```
//!
//! [`Engine`]: kv_generate::engine::Engine

#![warn(missing_docs)]

pub mod error;
pub mod kv_events;
pub mod metrics;
pub mod openai;
pub mod prompt_cache;
pub mod server;
pub mod worker;

use std::sync::Arc;
use std::thread::JoinHandle;

use burn::tensor::backend::Backend;
use kv_generate::engine::EngineConfig;

pub use error::ApiError;
pub use server::{router, AppState, Settings};
use worker::{Loaded, Shared};

/// A model's fingerprint for saved prompt caches: the SHA-256 of its files (a GGUF file, or a
/// directory's `config.json` and `.safetensors` files, in name order) and `settings` (the
/// weight format and backend, which change the keys and values computed).
pub fn model_fingerprint(path: &std::path::Path, settings: &str) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let file = entry?.path();
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.as_deref() == Some("config.json")
                || file.extension().is_some_and(|e| e == "safetensors")
            {
                files.push(file);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut hash = Sha256::new();
    for file in files {
        let mut reader = std::fs::File::open(&file)?;
        std::io::copy(&mut reader, &mut hash)?;
    }
    Ok(format!("sha256:{:x}/{settings}", hash.finalize()))
}

/// A server's parts: its routes, the state it shares with the engine, and the engine's thread.
pub struct App {
    /// Every route, ready for `axum::serve`.
    pub router: axum::Router,
    /// The model once loaded, the metrics, the in-flight count.
    pub shared: Arc<Shared>,
    /// The engine's thread: it ends once the router (every sender of jobs) is dropped and its
    /// work is done.
    pub engine: JoinHandle<()>,
}

impl App {
    /// Starts the engine's thread, which runs `load` (the routes answer 503 until it is done),
    /// and builds the routes over it. With `kv_events` (from [`kv_events::start`]), the
    /// prefix cache's events are published.
    pub fn start<B, L>(
        load: L,
        engine: EngineConfig,
        settings: Settings,
        kv_events: Option<kv_events::KvEventSink>,
    ) -> Self
    where
        B: Backend,
        L: FnOnce() -> Result<Loaded<B>, String> + Send + 'static,
    {
        let shared = Arc::new(Shared::default());
        let (commands, engine) = worker::spawn(load, engine, shared.clone(), kv_events);
        let router = router(AppState::new(shared.clone(), commands, settings));
        Self {
            router,
            shared,
            engine,
        }
    }
}
