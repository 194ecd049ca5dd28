//! `POST /v1/chat/completions`: messages through the model's chat template, whole or
//! streamed (`chat.completion` and `chat.completion.chunk`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kv_generate::{FinishReason, TokenLogprobs};
use kv_model::{ChatMessage, GenerationPrompt};

use super::checks::{check_model, new_tokens, parse_with_sampling, tokenizer};
use super::jobs::{chat_logprob, collect, finish_name, now_s, response_id, usage, Prepared};
use super::streaming::{stream, Chunks, Streaming};
use super::{AppState, MAX_TOP_LOGPROBS};
use crate::error::ApiError;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatLogprobs, ChatRequest, Content, Delta, Message,
};
use crate::worker::ModelInfo;

/// `POST /v1/chat/completions`.
pub(super) async fn chat(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
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
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| ChatChoice {
            index,
            logprobs: prepared.top_logprobs.map(|_| ChatLogprobs {
                content: c
                    .logprobs
                    .iter()
                    .map(|lp| chat_logprob(&info, lp))
                    .collect(),
            }),
            message: AssistantMessage {
                role: "assistant",
                content: c.text,
            },
            finish_reason: c.finish.map(finish_name),
        })
        .collect();
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created: now_s(),
        model: info.id.clone(),
        choices,
        usage,
    })
    .into_response())
}

/// The token ids of `messages` through the model's chat template, ending with the
/// assistant's header.
pub(super) fn chat_prompt(messages: &[Message], info: &ModelInfo) -> Result<Vec<u32>, ApiError> {
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

/// Chat's chunks (`chat.completion.chunk`).
struct ChatStream {
    info: ModelInfo,
    id: String,
    created: u64,
    n: usize,
}

impl ChatStream {
    fn chunk(&self, choices: Vec<ChatChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.info.id.clone(),
            choices,
        }
    }
}

impl Chunks for ChatStream {
    type Chunk = ChatCompletionChunk;

    fn opening(&self) -> Vec<ChatCompletionChunk> {
        (0..self.n)
            .map(|index| {
                self.chunk(vec![ChatChunkChoice {
                    index,
                    delta: Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    },
                    logprobs: None,
                    finish_reason: None,
                }])
            })
            .collect()
    }

    fn token(
        &self,
        choice: usize,
        text: &str,
        logprobs: Option<&TokenLogprobs>,
        _offset: usize,
    ) -> Option<ChatCompletionChunk> {
        if text.is_empty() && logprobs.is_none() {
            return None;
        }
        let logprobs = logprobs.map(|lp| ChatLogprobs {
            content: vec![chat_logprob(&self.info, lp)],
        });
        Some(self.chunk(vec![ChatChunkChoice {
            index: choice,
            delta: Delta {
                role: None,
                content: Some(text.to_string()),
            },
            logprobs,
            finish_reason: None,
        }]))
    }

    fn finish(&self, choice: usize, reason: FinishReason) -> ChatCompletionChunk {
        self.chunk(vec![ChatChunkChoice {
            index: choice,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: Some(finish_name(reason)),
        }])
    }

    fn closing(&self) -> ChatCompletionChunk {
        self.chunk(Vec::new())
    }
}
