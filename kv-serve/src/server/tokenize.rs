//! `/tokenize` and `/detokenize`, as llama.cpp's and vLLM's servers have them.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use kv_model::SpecialTokens;

use super::checks::{parse, token_ids, tokenizer};
use super::AppState;
use crate::error::ApiError;
use crate::openai::{DetokenizeRequest, Detokenized, TokenizeRequest, Tokenized};

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
