//! The HTTP side: routes, request checking, and turning a job's events into OpenAI's
//! responses, whole or streamed as Server-Sent Events.
//!
//! Every handler checks its request completely before anything reaches the engine, and says
//! which field is wrong (`param` in OpenAI's error body); the engine's own checks stay behind
//! them as a second line. A handler holds its request's in-flight slots ([`InFlight`]) until
//! its last event is sent, so the server's memory stays bounded by `--max-running` plus
//! `--max-waiting` requests, and refuses more with 503 and `Retry-After`.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kv_generate::engine::Request;
use kv_generate::{EosPolicy, FinishReason, SamplingConfig, TokenLogprobs};
use kv_model::{ChatMessage, GenerationPrompt, SpecialTokens, Tokenizer};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::openai::{
    ChatLogprobs, ChatRequest, ChatTokenLogprob, CompletionLogprobs, CompletionRequest, Content,
    DetokenizeRequest, Message, Prompt, PromptCacheRestoreRequest, PromptCacheSaveRequest,
    PromptTokensDetails, SamplingFields, Stop, TokenizeRequest, TopLogprob, Usage,
};
use crate::prompt_cache::{self, PromptCacheError};
use crate::worker::{Command, InFlight, Job, JobEvent, ModelInfo, Shared};

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

/// Every route: the OpenAI API under `/v1`, and `/health`, `/metrics`, `/tokenize`,
/// `/detokenize` as llama.cpp's and vLLM's servers have them.
pub fn router(state: AppState) -> Router {
    let limit = state.settings.max_body_bytes;
    let guarded = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/prompt_cache/save", post(save_prompt_cache))
        .route("/prompt_cache/restore", post(restore_prompt_cache))
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

async fn health(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.shared.model()?;
    Ok(Json(json!({ "status": "ok" })))
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

async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let info = state.shared.model()?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": info.id,
            "object": "model",
            "created": info.created,
            "owned_by": "kv-cache",
            "max_model_len": info.max_positions,
        }],
    })))
}

async fn tokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: TokenizeRequest = parse(body, &state.settings)?;
    let info = state.shared.model()?;
    let text = request.content.or(request.prompt).ok_or_else(|| {
        ApiError::invalid(
            "content",
            "give the text to tokenize as `content` (or `prompt`)",
        )
    })?;
    let tokens = tokenizer(info, "content")?
        .encode(&text)
        .map_err(|e| ApiError::invalid("content", e.to_string()))?;
    Ok(Json(json!({
        "tokens": tokens,
        "count": tokens.len(),
        "max_model_len": info.max_positions,
    })))
}

async fn detokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: DetokenizeRequest = parse(body, &state.settings)?;
    let info = state.shared.model()?;
    let ids = token_ids(&request.tokens, info, "tokens")?;
    let content = tokenizer(info, "tokens")?
        .decode(&ids, SpecialTokens::Show)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(json!({ "content": content })))
}

/// The prompt cache folder, or 501 when the server was started without one.
fn prompt_cache_dir(settings: &Settings) -> Result<PathBuf, ApiError> {
    settings
        .prompt_cache_dir
        .clone()
        .ok_or(ApiError::NotEnabled {
            what: "saving and restoring prompt caches",
            flag: "--prompt-cache-dir DIR",
        })
}

impl From<PromptCacheError> for ApiError {
    fn from(e: PromptCacheError) -> Self {
        match e {
            PromptCacheError::Io { .. } => ApiError::Engine(e.to_string()),
            other => ApiError::invalid("filename", other.to_string()),
        }
    }
}

/// Writes the cached blocks of a prompt's longest cached prefix to a file in the prompt cache
/// folder (run the prompt first: nothing is computed here).
async fn save_prompt_cache(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: PromptCacheSaveRequest = parse(body, &state.settings)?;
    let folder = prompt_cache_dir(&state.settings)?;
    let path = prompt_cache::path_in(&folder, &request.filename)?;
    let info = state.shared.model()?.clone();
    let tokens = match (&request.prompt, &request.messages) {
        (Some(Prompt::Text(_) | Prompt::Ids(_)), None) => {
            completion_prompts(request.prompt.as_ref().expect("matched"), &info)?.remove(0)
        }
        (None, Some(messages)) => chat_prompt(messages, &info)?,
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give one prompt (text or token ids) as `prompt`, or chat `messages`",
            ))
        }
    };
    let (reply, saved) = tokio::sync::oneshot::channel();
    state
        .commands
        .send(Command::SavePrefix { tokens, reply })
        .map_err(|_| ApiError::Engine("the engine has stopped".into()))?;
    let saved = saved
        .await
        .map_err(|_| ApiError::Engine("the engine has stopped".into()))?;
    let tokens_saved = saved.tokens.len();
    let bytes = prompt_cache::encode(&saved, &info.fingerprint);
    let size = bytes.len();
    tokio::task::spawn_blocking(move || -> Result<(), PromptCacheError> {
        let io = |source| PromptCacheError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&folder).map_err(io)?;
        // Written beside its name and renamed, so a reader never sees half a file.
        let partial = path.with_extension("partial");
        std::fs::write(&partial, &bytes).map_err(io)?;
        std::fs::rename(&partial, &path).map_err(io)
    })
    .await
    .map_err(|e| ApiError::Engine(e.to_string()))??;
    Ok(Json(json!({
        "filename": request.filename,
        "tokens_saved": tokens_saved,
        "bytes": size,
    })))
}

/// Reads a saved prompt cache back into the pool as cached blocks.
async fn restore_prompt_cache(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request: PromptCacheRestoreRequest = parse(body, &state.settings)?;
    let folder = prompt_cache_dir(&state.settings)?;
    let path = prompt_cache::path_in(&folder, &request.filename)?;
    let info = state.shared.model()?.clone();
    let name = request.filename.clone();
    let saved = tokio::task::spawn_blocking(move || {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PromptCacheError::NotFound(name))
            }
            Err(source) => return Err(PromptCacheError::Io { path, source }),
        };
        prompt_cache::decode(&name, &bytes, &info.fingerprint)
    })
    .await
    .map_err(|e| ApiError::Engine(e.to_string()))??;
    let (reply, restored) = tokio::sync::oneshot::channel();
    state
        .commands
        .send(Command::RestorePrefix { saved, reply })
        .map_err(|_| ApiError::Engine("the engine has stopped".into()))?;
    let tokens_restored = restored
        .await
        .map_err(|_| ApiError::Engine("the engine has stopped".into()))??;
    Ok(Json(json!({
        "filename": request.filename,
        "tokens_restored": tokens_restored,
    })))
}

/// `body` as JSON of type `T`, or a 400 that names the field at fault (413 past the limit).
fn parse<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    settings: &Settings,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge {
                limit: settings.max_body_bytes,
            }
        } else {
            ApiError::Invalid {
                message: format!("could not read the body: {}", rejection.body_text()),
                param: None,
            }
        }
    })?;
    let mut json = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut json).map_err(field_error)
}

/// A request whose sampling fields sit beside its own: both read from one parsed body, each
/// with errors that name their field.
fn parse_with_sampling<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    settings: &Settings,
) -> Result<(T, SamplingFields), ApiError> {
    let value: Value = parse(body, settings)?;
    let request = serde_path_to_error::deserialize(&value).map_err(field_error)?;
    let sampling = serde_path_to_error::deserialize(&value).map_err(field_error)?;
    Ok((request, sampling))
}

/// A deserialization error as a 400 naming its field (`messages[0].content`).
fn field_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if path == "." {
        ApiError::Invalid {
            message: format!("the body is not a valid request: {inner}"),
            param: None,
        }
    } else {
        ApiError::Invalid {
            message: format!("`{path}`: {inner}"),
            param: Some(path),
        }
    }
}

fn tokenizer<'a>(info: &'a ModelInfo, param: &str) -> Result<&'a Tokenizer, ApiError> {
    info.tokenizer.as_ref().ok_or_else(|| {
        ApiError::invalid(
            param,
            format!(
                "the model `{}` has no tokenizer: send prompts to /v1/completions as token ids",
                info.id
            ),
        )
    })
}

/// `ids` checked against the vocabulary.
fn token_ids(ids: &[i64], info: &ModelInfo, param: &str) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < info.vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid(
                        param,
                        format!(
                            "token id {id} at index {i} is outside the vocabulary (0 to {})",
                            info.vocab_size - 1
                        ),
                    )
                })
        })
        .collect()
}

/// The model a request names, checked against the one served (none named: the one served).
fn check_model(asked: Option<&str>, info: &ModelInfo) -> Result<(), ApiError> {
    match asked {
        Some(asked) if !asked.is_empty() && asked != info.id => Err(ApiError::UnknownModel {
            asked: asked.to_string(),
            served: info.id.clone(),
        }),
        _ => Ok(()),
    }
}

/// The sampling settings and stop strings of a request, checked, for choice 0 (choice `j`
/// adds `j` to the seed).
fn sampling(fields: &SamplingFields) -> Result<(SamplingConfig, Vec<String>, usize), ApiError> {
    let in_range = |param: &str, value: Option<f32>, lo: f32, hi: f32| match value {
        Some(v) if !(v.is_finite() && (lo..=hi).contains(&v)) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be in [{lo}, {hi}], got {v}"),
        )),
        _ => Ok(()),
    };
    in_range("temperature", fields.temperature, 0.0, 2.0)?;
    in_range("presence_penalty", fields.presence_penalty, -2.0, 2.0)?;
    in_range("frequency_penalty", fields.frequency_penalty, -2.0, 2.0)?;
    in_range("min_p", fields.min_p, 0.0, 1.0)?;
    if let Some(p) = fields.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` must be in (0, 1], got {p}"),
            ));
        }
    }
    if let Some(r) = fields.repetition_penalty {
        if !(r.is_finite() && r > 0.0) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("`repetition_penalty` must be positive (1 is off), got {r}"),
            ));
        }
    }
    let top_k = match fields.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be positive, or -1 for off; got {k}"),
            ))
        }
    };
    let n = fields.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be from 1 to {MAX_CHOICES}, got {n}"),
        ));
    }
    let stops = fields.stop.clone().map(Stop::into_vec).unwrap_or_default();
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                stops.len()
            ),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    let temperature = fields.temperature.unwrap_or(1.0);
    let config = SamplingConfig {
        temperature: (temperature > 0.0).then_some(temperature),
        top_k,
        top_p: fields.top_p.filter(|&p| p < 1.0),
        min_p: fields.min_p.filter(|&p| p > 0.0),
        repetition_penalty: fields.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: fields.frequency_penalty.unwrap_or(0.0),
        presence_penalty: fields.presence_penalty.unwrap_or(0.0),
        seed: fields.seed.map_or_else(rand::random, |s| s as u64),
    };
    Ok((config, stops, n as usize))
}

/// How many tokens a choice may generate after a prompt of `prompt_len` tokens: `asked` when
/// it fits the model's context, else a 400 that says how much room there is; by default all
/// the room (chat) or `default` at most.
fn new_tokens(
    asked: Option<u32>,
    param: &str,
    prompt_len: usize,
    prompt_param: &str,
    info: &ModelInfo,
    default: Option<usize>,
) -> Result<usize, ApiError> {
    // The last new token is never fed back, so a prompt may fill the context exactly.
    if prompt_len > info.max_positions {
        return Err(ApiError::invalid(
            prompt_param,
            format!(
                "the prompt is {prompt_len} tokens, longer than the model's context of {} \
                 tokens: shorten it",
                info.max_positions
            ),
        ));
    }
    let room = info.max_positions + 1 - prompt_len;
    match asked {
        Some(0) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be at least 1"),
        )),
        Some(n) if n as usize > room => Err(ApiError::invalid(
            param,
            format!(
                "`{param}` is {n}, but the prompt's {prompt_len} tokens leave room for {room} \
                 in the model's context of {} tokens",
                info.max_positions
            ),
        )),
        Some(n) => Ok(n as usize),
        None => Ok(default.map_or(room, |d| d.min(room))),
    }
}

/// The token ids of `messages` through the model's chat template, ending with the
/// assistant's header.
fn chat_prompt(messages: &[Message], info: &ModelInfo) -> Result<Vec<u32>, ApiError> {
    let messages = chat_messages(messages)?;
    let tokenizer = tokenizer(info, "messages")?;
    let text = tokenizer
        .apply_chat_template(&messages, GenerationPrompt::Add)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// The messages as the chat template takes them, each content's text parts joined.
fn chat_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let role = match message.role.as_str() {
                "developer" => "system",
                role @ ("system" | "user" | "assistant" | "tool") => role,
                other => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        format!(
                            "unknown role `{other}`: use system, developer, user, assistant \
                             or tool"
                        ),
                    ))
                }
            };
            let content = match &message.content {
                Some(Content::Text(text)) => text.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!(
                                        "content parts of type `{kind}` are not supported: \
                                         this model reads text parts only"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                None if role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].content"),
                        format!("a {role} message needs `content`"),
                    ))
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// What a handler built from its request, ready for the engine.
struct Prepared {
    /// Each prompt's ids.
    prompts: Vec<Vec<u32>>,
    /// Choices per prompt.
    n: usize,
    /// One engine request per choice, prompt-major.
    requests: Vec<Request>,
    stream: bool,
    include_usage: bool,
    /// Alternatives per token, when log-probabilities are asked for.
    top_logprobs: Option<usize>,
}

impl Prepared {
    fn new(
        prompts: Vec<Vec<u32>>,
        max_new: Vec<usize>,
        fields: &SamplingFields,
        top_logprobs: Option<usize>,
    ) -> Result<Self, ApiError> {
        let (config, stops, n) = sampling(fields)?;
        let mut requests = Vec::with_capacity(prompts.len() * n);
        for (prompt, max_new_tokens) in prompts.iter().zip(max_new) {
            for j in 0..n {
                requests.push(Request {
                    prompt: prompt.clone(),
                    max_new_tokens,
                    sampling: SamplingConfig {
                        seed: config.seed.wrapping_add(j as u64),
                        ..config.clone()
                    },
                    eos: if fields.ignore_eos {
                        EosPolicy::Ignore
                    } else {
                        EosPolicy::Model
                    },
                    stop_strings: stops.clone(),
                    top_logprobs,
                });
            }
        }
        Ok(Self {
            prompts,
            n,
            requests,
            stream: fields.stream,
            include_usage: fields
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            top_logprobs,
        })
    }

    /// Sends the requests to the engine, holding their in-flight slots.
    fn submit(
        &mut self,
        state: &AppState,
    ) -> Result<(UnboundedReceiver<JobEvent>, InFlight), ApiError> {
        let count = self.requests.len();
        let limit = state.settings.max_in_flight;
        let slots = InFlight::acquire(&state.shared, count, limit).map_err(|in_flight| {
            ApiError::QueueFull {
                in_flight,
                limit,
                retry_after_s: 1,
            }
        })?;
        let (events, receiver) = unbounded_channel();
        state
            .commands
            .send(Command::Generate(Job {
                requests: std::mem::take(&mut self.requests),
                events,
                arrived: Instant::now(),
            }))
            .map_err(|_| ApiError::Engine("the engine has stopped".into()))?;
        Ok((receiver, slots))
    }
}

/// A choice as its events built it.
#[derive(Debug, Default)]
struct Choice {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    finish: Option<FinishReason>,
    usage: kv_generate::engine::Usage,
}

/// Every choice's events, until all have finished.
async fn collect(
    events: &mut UnboundedReceiver<JobEvent>,
    choices: usize,
) -> Result<Vec<Choice>, ApiError> {
    let mut out: Vec<Choice> = (0..choices).map(|_| Choice::default()).collect();
    let mut open = choices;
    while open > 0 {
        match events.recv().await {
            Some(JobEvent::Token {
                choice,
                token,
                text,
                logprobs,
            }) => {
                let c = &mut out[choice];
                c.text.push_str(&text);
                c.tokens.push(token);
                c.logprobs.extend(logprobs);
            }
            Some(JobEvent::Finished {
                choice,
                reason,
                usage,
            }) => {
                out[choice].finish = Some(reason);
                out[choice].usage = usage;
                open -= 1;
            }
            Some(JobEvent::Failed(e)) => return Err(e),
            None => return Err(ApiError::Engine("the engine stopped mid-request".into())),
        }
    }
    Ok(out)
}

/// OpenAI's name for why a choice ended.
fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::StopString => "stop",
    }
}

/// Usage over every choice: each prompt once, every choice's tokens.
fn usage(prompts: &[Vec<u32>], n: usize, choices: &[kv_generate::engine::Usage]) -> Usage {
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let completion_tokens = choices.iter().map(|u| u.completion_tokens).sum();
    let cached_tokens = choices
        .iter()
        .step_by(n.max(1))
        .map(|u| u.cached_prompt_tokens)
        .sum();
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: PromptTokensDetails { cached_tokens },
    }
}

/// A token's text for log-probability listings (its id where there is no tokenizer).
fn token_text(info: &ModelInfo, id: u32) -> String {
    info.tokenizer
        .as_ref()
        .and_then(|t| t.decode(&[id], SpecialTokens::Show).ok())
        .unwrap_or_else(|| format!("token_id:{id}"))
}

fn chat_logprob(info: &ModelInfo, lp: &TokenLogprobs) -> ChatTokenLogprob {
    let token = token_text(info, lp.token);
    ChatTokenLogprob {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob: lp.logprob,
        top_logprobs: lp
            .top
            .iter()
            .map(|&(id, logprob)| {
                let token = token_text(info, id);
                TopLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob,
                }
            })
            .collect(),
    }
}

/// Completions' legacy log-probabilities for `lps`, whose texts start at `offset` bytes.
fn completion_logprobs(
    info: &ModelInfo,
    lps: &[TokenLogprobs],
    mut offset: usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for lp in lps {
        let token = token_text(info, lp.token);
        out.text_offset.push(offset);
        offset += token.len();
        out.tokens.push(token);
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(
            lp.top
                .iter()
                .map(|&(id, logprob)| (token_text(info, id), json!(logprob)))
                .collect(),
        );
    }
    out
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

// --- Chat -----------------------------------------------------------------------------------

async fn chat(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    chat_response(state, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_response(
    state: AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (mut request, sampling): (ChatRequest, _) = parse_with_sampling(body, &state.settings)?;
    request.sampling = sampling;
    let info = state.shared.model()?.clone();
    check_model(request.model.as_deref(), &info)?;
    let prompt = chat_prompt(&request.messages, &info)?;
    let (asked, param) = match (request.max_completion_tokens, request.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let max_new = new_tokens(asked, param, prompt.len(), "messages", &info, None)?;
    let top_logprobs = match (request.logprobs, request.top_logprobs) {
        (_, Some(top)) if top > MAX_TOP_LOGPROBS => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be from 0 to {MAX_TOP_LOGPROBS}, got {top}"),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (true, top) => Some(top.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let mut prepared = Prepared::new(vec![prompt], vec![max_new], &request.sampling, top_logprobs)?;
    let (events, slots) = prepared.submit(&state)?;
    let id = response_id("chatcmpl");
    if prepared.stream {
        let job = Streaming::new(&prepared, events, slots);
        let chunks = ChatStream {
            info,
            id,
            created: now_s(),
            n: prepared.n,
        };
        return Ok(stream(chunks, job));
    }
    let mut events = events;
    let choices = collect(&mut events, prepared.n).await?;
    drop(slots);
    let usage = usage(
        &prepared.prompts,
        prepared.n,
        &choices.iter().map(|c| c.usage).collect::<Vec<_>>(),
    );
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let logprobs = prepared.top_logprobs.map(|_| ChatLogprobs {
                content: c
                    .logprobs
                    .iter()
                    .map(|lp| chat_logprob(&info, lp))
                    .collect(),
            });
            json!({
                "index": index,
                "message": { "role": "assistant", "content": c.text },
                "logprobs": logprobs,
                "finish_reason": c.finish.map(finish_name),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now_s(),
        "model": info.id,
        "choices": choices,
        "usage": usage,
    }))
    .into_response())
}

// --- Completions ----------------------------------------------------------------------------

async fn completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    completion_response(state, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The prompts of a completions request as token ids.
fn completion_prompts(prompt: &Prompt, info: &ModelInfo) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str, param: &str| -> Result<Vec<u32>, ApiError> {
        tokenizer(info, param)?
            .encode(text)
            .map_err(|e| ApiError::invalid(param, e.to_string()))
    };
    let prompts = match prompt {
        Prompt::Text(text) => vec![encode(text, "prompt")?],
        Prompt::Texts(texts) => texts
            .iter()
            .enumerate()
            .map(|(i, t)| encode(t, &format!("prompt[{i}]")))
            .collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![token_ids(ids, info, "prompt")?],
        Prompt::IdLists(lists) => lists
            .iter()
            .enumerate()
            .map(|(i, ids)| token_ids(ids, info, &format!("prompt[{i}]")))
            .collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must hold a prompt"));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        let param = if prompts.len() == 1 {
            "prompt".to_string()
        } else {
            format!("prompt[{i}]")
        };
        return Err(ApiError::invalid(
            &param,
            "the prompt is empty: give at least one token",
        ));
    }
    Ok(prompts)
}

async fn completion_response(
    state: AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (mut request, sampling): (CompletionRequest, _) =
        parse_with_sampling(body, &state.settings)?;
    request.sampling = sampling;
    let info = state.shared.model()?.clone();
    check_model(request.model.as_deref(), &info)?;
    let prompts = completion_prompts(&request.prompt, &info)?;
    let max_new = prompts
        .iter()
        .map(|p| {
            new_tokens(
                request.max_tokens,
                "max_tokens",
                p.len(),
                "prompt",
                &info,
                Some(16),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let top_logprobs = match request.logprobs {
        Some(top) if top > MAX_TOP_LOGPROBS => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be from 0 to {MAX_TOP_LOGPROBS}, got {top}"),
            ))
        }
        Some(_) if request.echo => {
            return Err(ApiError::invalid(
                "echo",
                "`echo` with `logprobs` asks for the prompt's log-probabilities, which this \
                 server does not compute: drop one of them",
            ))
        }
        top => top.map(|t| t as usize),
    };
    // The prompt's text for `echo`.
    let echoes: Vec<String> = if request.echo {
        prompts
            .iter()
            .map(|p| match &info.tokenizer {
                Some(t) => t
                    .decode(p, SpecialTokens::Show)
                    .map_err(|e| ApiError::invalid("prompt", e.to_string())),
                None => Ok(String::new()),
            })
            .collect::<Result<_, _>>()?
    } else {
        vec![String::new(); prompts.len()]
    };
    let mut prepared = Prepared::new(prompts, max_new, &request.sampling, top_logprobs)?;
    let (events, slots) = prepared.submit(&state)?;
    let id = response_id("cmpl");
    if prepared.stream {
        let job = Streaming::new(&prepared, events, slots);
        let chunks = CompletionStream {
            info,
            id,
            created: now_s(),
            n: prepared.n,
            echoes,
        };
        return Ok(stream(chunks, job));
    }
    let mut events = events;
    let choices = collect(&mut events, prepared.prompts.len() * prepared.n).await?;
    drop(slots);
    let usage = usage(
        &prepared.prompts,
        prepared.n,
        &choices.iter().map(|c| c.usage).collect::<Vec<_>>(),
    );
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let echo = &echoes[index / prepared.n];
            let logprobs = prepared
                .top_logprobs
                .map(|_| completion_logprobs(&info, &c.logprobs, echo.len()));
            json!({
                "index": index,
                "text": format!("{echo}{}", c.text),
                "logprobs": logprobs,
                "finish_reason": c.finish.map(finish_name),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": now_s(),
        "model": info.id,
        "choices": choices,
        "usage": usage,
    }))
    .into_response())
}

// --- Streaming ------------------------------------------------------------------------------

/// A streamed job: its events, its in-flight slots (held until the stream ends), and what the
/// usage chunk counts.
struct Streaming {
    events: UnboundedReceiver<JobEvent>,
    slots: InFlight,
    prompts: Vec<Vec<u32>>,
    n: usize,
    include_usage: bool,
}

impl Streaming {
    fn new(prepared: &Prepared, events: UnboundedReceiver<JobEvent>, slots: InFlight) -> Self {
        Self {
            events,
            slots,
            prompts: prepared.prompts.clone(),
            n: prepared.n,
            include_usage: prepared.include_usage,
        }
    }
}

/// How one kind of response turns events into stream chunks.
trait Chunks: Send + 'static {
    /// Chunks sent before any event (chat's role deltas, completions' echoes).
    fn opening(&self) -> Vec<Value>;
    /// The chunk for a token of choice `choice`, if it shows anything.
    fn token(
        &self,
        choice: usize,
        text: &str,
        logprobs: Option<&TokenLogprobs>,
        offset: usize,
    ) -> Option<Value>;
    /// The chunk that says why choice `choice` ended.
    fn finish(&self, choice: usize, reason: FinishReason) -> Value;
    /// The final chunk with the usage and no choices.
    fn usage(&self, usage: Usage) -> Value;
}

/// Streams `chunks`'s events as Server-Sent Events, in OpenAI's order: the opening chunks,
/// content deltas, each choice's finish chunk, the usage chunk when asked, `[DONE]`. A
/// client that goes away stops the task, which drops the job's receiver: the engine cancels
/// its requests.
fn stream<C: Chunks>(chunks: C, job: Streaming) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let Streaming {
            mut events,
            slots: _slots,
            prompts,
            n,
            include_usage,
        } = job;
        let choices = prompts.len() * n;
        let with_usage = |mut chunk: Value| {
            if include_usage {
                chunk["usage"] = Value::Null;
            }
            Event::default().data(chunk.to_string())
        };
        for chunk in chunks.opening() {
            if tx.send(Ok(with_usage(chunk))).await.is_err() {
                return;
            }
        }
        let mut usages = vec![kv_generate::engine::Usage::default(); choices];
        let mut offsets = vec![0usize; choices];
        let mut open = choices;
        while open > 0 {
            let chunk = match events.recv().await {
                Some(JobEvent::Token {
                    choice,
                    text,
                    logprobs,
                    ..
                }) => {
                    let chunk = chunks.token(choice, &text, logprobs.as_ref(), offsets[choice]);
                    offsets[choice] += text.len();
                    match chunk {
                        Some(chunk) => chunk,
                        None => continue,
                    }
                }
                Some(JobEvent::Finished {
                    choice,
                    reason,
                    usage,
                }) => {
                    usages[choice] = usage;
                    open -= 1;
                    chunks.finish(choice, reason)
                }
                Some(JobEvent::Failed(e)) => {
                    let _ = tx
                        .send(Ok(Event::default().data(json!(e.body()).to_string())))
                        .await;
                    return;
                }
                None => {
                    let e = ApiError::Engine("the engine stopped mid-request".into());
                    let _ = tx
                        .send(Ok(Event::default().data(json!(e.body()).to_string())))
                        .await;
                    return;
                }
            };
            if tx.send(Ok(with_usage(chunk))).await.is_err() {
                return;
            }
        }
        if include_usage {
            let usage = usage(&prompts, n, &usages);
            if tx
                .send(Ok(Event::default().data(chunks.usage(usage).to_string())))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Chat's chunks (`chat.completion.chunk`).
struct ChatStream {
    info: ModelInfo,
    id: String,
    created: u64,
    n: usize,
}

impl ChatStream {
    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.info.id,
            "choices": choices,
        })
    }
}

impl Chunks for ChatStream {
    fn opening(&self) -> Vec<Value> {
        (0..self.n)
            .map(|index| {
                self.chunk(json!([{
                    "index": index,
                    "delta": { "role": "assistant", "content": "" },
                    "logprobs": null,
                    "finish_reason": null,
                }]))
            })
            .collect()
    }

    fn token(
        &self,
        choice: usize,
        text: &str,
        logprobs: Option<&TokenLogprobs>,
        _offset: usize,
    ) -> Option<Value> {
        if text.is_empty() && logprobs.is_none() {
            return None;
        }
        let logprobs = logprobs.map(|lp| ChatLogprobs {
            content: vec![chat_logprob(&self.info, lp)],
        });
        Some(self.chunk(json!([{
            "index": choice,
            "delta": { "content": text },
            "logprobs": logprobs,
            "finish_reason": null,
        }])))
    }

    fn finish(&self, choice: usize, reason: FinishReason) -> Value {
        self.chunk(json!([{
            "index": choice,
            "delta": {},
            "logprobs": null,
            "finish_reason": finish_name(reason),
        }]))
    }

    fn usage(&self, usage: Usage) -> Value {
        let mut chunk = self.chunk(json!([]));
        chunk["usage"] = json!(usage);
        chunk
    }
}

/// Completions' chunks (`text_completion`).
struct CompletionStream {
    info: ModelInfo,
    id: String,
    created: u64,
    /// Choices per prompt.
    n: usize,
    /// Each prompt's text for `echo` (empty without).
    echoes: Vec<String>,
}

impl CompletionStream {
    fn chunk(&self, index: usize, text: &str, logprobs: Value, finish: Value) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.info.id,
            "choices": [{
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }],
        })
    }
}

impl Chunks for CompletionStream {
    fn opening(&self) -> Vec<Value> {
        let choices = self.echoes.len() * self.n;
        (0..choices)
            .filter_map(|index| {
                let echo = &self.echoes[index / self.n];
                (!echo.is_empty()).then(|| self.chunk(index, echo, Value::Null, Value::Null))
            })
            .collect()
    }

    fn token(
        &self,
        choice: usize,
        text: &str,
        logprobs: Option<&TokenLogprobs>,
        offset: usize,
    ) -> Option<Value> {
        if text.is_empty() && logprobs.is_none() {
            return None;
        }
        let echo = self.echoes[choice / self.n].len();
        let logprobs = logprobs.map_or(Value::Null, |lp| {
            json!(completion_logprobs(
                &self.info,
                std::slice::from_ref(lp),
                echo + offset
            ))
        });
        Some(self.chunk(choice, text, logprobs, Value::Null))
    }

    fn finish(&self, choice: usize, reason: FinishReason) -> Value {
        self.chunk(choice, "", Value::Null, json!(finish_name(reason)))
    }

    fn usage(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.info.id,
            "choices": [],
            "usage": usage,
        })
    }
}
