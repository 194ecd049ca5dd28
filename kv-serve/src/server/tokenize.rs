//! `/tokenize` and `/detokenize`, as llama.cpp's and vLLM's servers have them, and the render
//! routes (`/v1/completions/render`, `/v1/chat/completions/render`) that give a request's
//! prompt as the model would be fed it, as vLLM's do: an inference gateway's router tokenizes
//! through them to score prefix-cache hits.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use kv_model::SpecialTokens;

use super::chat::chat_prompt;
use super::checks::{check_model, parse, token_ids, tokenizer};
use super::completions::completion_prompts;
use super::AppState;
use crate::error::ApiError;
use crate::openai::{
    ChatRenderRequest, CompletionRenderRequest, DetokenizeRequest, Detokenized, Rendered,
    TokenizeRequest, Tokenized,
};

/// `POST /tokenize`: a text's token ids (llama.cpp's and vLLM's route).
pub(super) async fn tokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Tokenized>, ApiError> {
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
    Ok(Json(Tokenized {
        count: tokens.len(),
        tokens,
        max_model_len: info.max_positions,
    }))
}

/// `POST /detokenize`: token ids' text, special tokens shown.
pub(super) async fn detokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Detokenized>, ApiError> {
    let request: DetokenizeRequest = parse(body, &state.settings)?;
    let info = state.shared.model()?;
    let ids = token_ids(&request.tokens, info, "tokens")?;
    let content = tokenizer(info, "tokens")?
        .decode(&ids, SpecialTokens::Show)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(Detokenized { content }))
}

/// `POST /v1/completions/render`: each prompt's token ids, in order (text through the
/// tokenizer with the model's BOS where it adds one, token ids checked and kept).
pub(super) async fn render_completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Rendered>>, ApiError> {
    let request: CompletionRenderRequest = parse(body, &state.settings)?;
    let info = state.shared.model()?;
    check_model(request.model.as_deref(), info)?;
    let prompts = completion_prompts(&request.prompt, info)?;
    Ok(Json(
        prompts
            .into_iter()
            .map(|token_ids| Rendered { token_ids })
            .collect(),
    ))
}

/// `POST /v1/chat/completions/render`: the messages through the chat template, as token ids.
pub(super) async fn render_chat(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Rendered>, ApiError> {
    let request: ChatRenderRequest = parse(body, &state.settings)?;
    let info = state.shared.model()?;
    check_model(request.model.as_deref(), info)?;
    Ok(Json(Rendered {
        token_ids: chat_prompt(&request.messages, info)?,
    }))
}
