//! The HTTP side: routes, request checking, and turning a job's events into OpenAI's
//! responses, whole or streamed as Server-Sent Events.
//!
//! One room per concern: this file holds the router, the API key and the small routes
//! (`/health`, `/metrics`, `/v1/models`); `chat.rs` and `completions.rs` the two generation
//! endpoints; `tokenize.rs` and `admin.rs` (saved prompt caches) the extras; `checks.rs` the
//! request checks every route shares; `jobs.rs` what a generation request becomes for the
//! engine and how its events are collected; `streaming.rs` the Server-Sent Events. Every
//! response body is a type of [`crate::openai`], serialised by serde.
//!
//! Every handler checks its request completely before anything reaches the engine, and says
//! which field is wrong (`param` in OpenAI's error body); the engine's own checks stay behind
//! them as a second line. A handler holds its request's in-flight slots ([`InFlight`]) until
//! its last event is sent, so the server's memory stays bounded by `--max-running` plus
//! `--max-waiting` requests, and refuses more with 503 and `Retry-After`.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::error::ApiError;
use crate::openai::{Health, ModelCard, ModelList};
use crate::worker::{Command, Shared};

mod admin;
mod chat;
mod checks;
mod completions;
mod jobs;
mod streaming;
mod tokenize;

use admin::{reset_prefix_cache, restore_prompt_cache, save_prompt_cache};
use chat::chat;
use completions::completions;
use tokenize::{detokenize, render_chat, render_completions, tokenize};

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;
/// Most alternatives per token (`top_logprobs`, completions' `logprobs`), as OpenAI allows.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;

/// How the HTTP side behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most choices in flight (running and waiting) before new requests get 503.
    pub max_in_flight: usize,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The folder of saved prompt caches; `None` turns saving and restoring off.
    pub prompt_cache_dir: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            api_key: None,
            max_in_flight: 16 + 64,
            max_body_bytes: 4 << 20,
            prompt_cache_dir: None,
        }
    }
}

/// What every handler reads: the engine's shared state, the channel to it, the settings.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
    commands: Sender<Command>,
    settings: Arc<Settings>,
}

impl AppState {
    /// State over an engine started with [`crate::worker::spawn`].
    pub fn new(shared: Arc<Shared>, commands: Sender<Command>, settings: Settings) -> Self {
        Self {
            shared,
            commands,
            settings: Arc::new(settings),
        }
    }
}

/// Every route: the OpenAI API under `/v1` (with vLLM's render routes), and `/health`,
/// `/metrics`, `/tokenize`, `/detokenize` as llama.cpp's and vLLM's servers have them.
pub fn router(state: AppState) -> Router {
    let limit = state.settings.max_body_bytes;
    let guarded = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions/render", post(render_chat))
        .route("/v1/completions/render", post(render_completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/prompt_cache/save", post(save_prompt_cache))
        .route("/prompt_cache/restore", post(restore_prompt_cache))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .merge(guarded)
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Refuses requests without the API key, when one is set.
async fn require_key(State(state): State<AppState>, request: HttpRequest, next: Next) -> Response {
    if let Some(key) = &state.settings.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|given| same_secret(given.trim(), key)) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// Compares two secrets in time that depends only on their lengths, so response times do
/// not reveal how much of a guessed key was right.
fn same_secret(given: &str, key: &str) -> bool {
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state.shared.model()?;
    Ok(Json(Health { status: "ok" }))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.shared.metrics.render(),
    )
}

async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let info = state.shared.model()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: info.id.clone(),
            object: "model",
            created: info.created,
            owned_by: "kv-cache",
            max_model_len: info.max_positions,
        }],
    }))
}
