//! The prefix cache's administration: saved prompt caches (`/prompt_cache/save`,
//! `/prompt_cache/restore`: a prompt's cached blocks written to a file in the server's folder
//! and read back, llama.cpp's slot save) and `/reset_prefix_cache` (vLLM's).

use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;

use super::chat::chat_prompt;
use super::checks::parse;
use super::completions::completion_prompts;
use super::{AppState, Settings};
use crate::error::ApiError;
use crate::openai::{
    PrefixCacheReset, Prompt, PromptCacheRestoreRequest, PromptCacheRestored,
    PromptCacheSaveRequest, PromptCacheSaved,
};
use crate::prompt_cache::{self, PromptCacheError};
use crate::worker::Command;

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
pub(super) async fn save_prompt_cache(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PromptCacheSaved>, ApiError> {
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
    // Only whole blocks are cached, and so saved.
    let block_size = info.pool.block_size;
    let whole_blocks = tokens.len() / block_size;
    if whole_blocks == 0 {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "a prompt of {} tokens holds no whole block of {block_size}: only whole blocks \
                 are cached and saved",
                tokens.len()
            ),
        ));
    }
    let (reply, saved) = tokio::sync::oneshot::channel();
    state
        .commands
        .send(Command::SavePrefix { tokens, reply })
        .map_err(|_| ApiError::Engine("the engine has stopped".into()))?;
    let saved = saved
        .await
        .map_err(|_| ApiError::Engine("the engine has stopped".into()))?;
    let tokens_saved = saved.tokens.len();
    if tokens_saved == 0 {
        // An empty file would restore nothing: say what to do instead of writing it.
        return Err(ApiError::NothingCached {
            whole_blocks,
            block_size,
        });
    }
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
    Ok(Json(PromptCacheSaved {
        filename: request.filename,
        tokens_saved,
        bytes: size,
    }))
}

/// Reads a saved prompt cache back into the pool as cached blocks.
pub(super) async fn restore_prompt_cache(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PromptCacheRestored>, ApiError> {
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
    Ok(Json(PromptCacheRestored {
        filename: request.filename,
        tokens_restored,
    }))
}

/// Forgets every cached prefix, as vLLM's `/reset_prefix_cache`: requests running keep their
/// blocks, later prompts compute theirs again, and KV event subscribers get
/// `AllBlocksCleared`.
pub(super) async fn reset_prefix_cache(
    State(state): State<AppState>,
) -> Result<Json<PrefixCacheReset>, ApiError> {
    state.shared.model()?;
    let (reply, forgotten) = tokio::sync::oneshot::channel();
    state
        .commands
        .send(Command::ResetPrefixCache { reply })
        .map_err(|_| ApiError::Engine("the engine has stopped".into()))?;
    let blocks_forgotten = forgotten
        .await
        .map_err(|_| ApiError::Engine("the engine has stopped".into()))?;
    Ok(Json(PrefixCacheReset { blocks_forgotten }))
}
