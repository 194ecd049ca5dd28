//! `POST /v1/completions`: text or token-id prompts (several at once), whole or streamed
//! (`text_completion` both ways), with `echo` and the legacy log-probabilities.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kv_generate::{FinishReason, TokenLogprobs};
use kv_model::SpecialTokens;

use super::checks::{check_model, new_tokens, parse_with_sampling, token_ids, tokenizer};
use super::jobs::{collect, completion_logprobs, finish_name, now_s, response_id, usage, Prepared};
use super::streaming::{stream, Chunks, Streaming};
use super::{AppState, MAX_TOP_LOGPROBS};
use crate::error::ApiError;
use crate::openai::{Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Prompt};
use crate::worker::ModelInfo;

/// `POST /v1/completions`.
pub(super) async fn completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    completion_response(state, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The prompts of a completions request as token ids.
pub(super) fn completion_prompts(
    prompt: &Prompt,
    info: &ModelInfo,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str, param: &str| -> Result<Vec<u32>, ApiError> {
        tokenizer(info, param)?
            .encode_prompt(text)
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
    let choices = choices
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let echo = &echoes[index / prepared.n];
            CompletionChoice {
                index,
                text: format!("{echo}{}", c.text),
                logprobs: prepared
                    .top_logprobs
                    .map(|_| completion_logprobs(&info, &c.logprobs, echo.len())),
                finish_reason: c.finish.map(finish_name),
            }
        })
        .collect();
    Ok(Json(Completion {
        id,
        object: "text_completion",
        created: now_s(),
        model: info.id.clone(),
        choices,
        usage: Some(usage),
    })
    .into_response())
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
    /// A chunk moving `choices` (none in the closing chunk).
    fn chunk(&self, choices: Vec<CompletionChoice>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.info.id.clone(),
            choices,
            usage: None,
        }
    }

    /// A chunk moving one choice.
    fn step(
        &self,
        index: usize,
        text: &str,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> Completion {
        self.chunk(vec![CompletionChoice {
            index,
            text: text.to_string(),
            logprobs,
            finish_reason,
        }])
    }
}

impl Chunks for CompletionStream {
    type Chunk = Completion;

    fn opening(&self) -> Vec<Completion> {
        let choices = self.echoes.len() * self.n;
        (0..choices)
            .filter_map(|index| {
                let echo = &self.echoes[index / self.n];
                (!echo.is_empty()).then(|| self.step(index, echo, None, None))
            })
            .collect()
    }

    fn token(
        &self,
        choice: usize,
        text: &str,
        logprobs: Option<&TokenLogprobs>,
        offset: usize,
    ) -> Option<Completion> {
        if text.is_empty() && logprobs.is_none() {
            return None;
        }
        let echo = self.echoes[choice / self.n].len();
        let logprobs = logprobs
            .map(|lp| completion_logprobs(&self.info, std::slice::from_ref(lp), echo + offset));
        Some(self.step(choice, text, logprobs, None))
    }

    fn finish(&self, choice: usize, reason: FinishReason) -> Completion {
        self.step(choice, "", None, Some(finish_name(reason)))
    }

    fn closing(&self) -> Completion {
        self.chunk(Vec::new())
    }
}
