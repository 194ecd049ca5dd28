//! What a generation request becomes for the engine ([`Prepared`]: one engine request per
//! choice), and its events gathered back into choices, usage and log-probabilities.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kv_generate::engine::{Request, Usage as EngineUsage};
use kv_generate::{EosPolicy, FinishReason, SamplingConfig, TokenLogprobs};
use kv_model::SpecialTokens;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::checks::sampling;
use super::AppState;
use crate::error::ApiError;
use crate::openai::{
    ChatTokenLogprob, CompletionLogprobs, PromptTokensDetails, SamplingFields, TopLogprob, Usage,
};
use crate::worker::{Command, InFlight, Job, JobEvent, ModelInfo};

/// What a handler built from its request, ready for the engine.
pub(super) struct Prepared {
    /// Each prompt's ids.
    pub(super) prompts: Vec<Vec<u32>>,
    /// Choices per prompt.
    pub(super) n: usize,
    /// One engine request per choice, prompt-major.
    pub(super) requests: Vec<Request>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// Alternatives per token, when log-probabilities are asked for.
    pub(super) top_logprobs: Option<usize>,
}

impl Prepared {
    pub(super) fn new(
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
    pub(super) fn submit(
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
pub(super) struct Choice {
    pub(super) text: String,
    pub(super) tokens: Vec<u32>,
    pub(super) logprobs: Vec<TokenLogprobs>,
    pub(super) finish: Option<FinishReason>,
    pub(super) usage: EngineUsage,
}

/// Every choice's events, until all have finished.
pub(super) async fn collect(
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
pub(super) fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::StopString => "stop",
    }
}

/// Usage over every choice: each prompt once, every choice's tokens.
pub(super) fn usage(prompts: &[Vec<u32>], n: usize, choices: &[EngineUsage]) -> Usage {
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

/// A chat token's log-probabilities, with its alternatives' texts.
pub(super) fn chat_logprob(info: &ModelInfo, lp: &TokenLogprobs) -> ChatTokenLogprob {
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
pub(super) fn completion_logprobs(
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
                .map(|&(id, logprob)| (token_text(info, id), logprob))
                .collect(),
        );
    }
    out
}

/// Now, in seconds since the Unix epoch (responses' `created`).
pub(super) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh response id, `prefix-` and 16 hex digits.
pub(super) fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}
