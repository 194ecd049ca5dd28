//! The checks every route shares: the body parsed with errors that name their field, token
//! ids against the vocabulary, the model's name, sampling settings, and room in the context.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use kv_generate::SamplingConfig;
use kv_model::Tokenizer;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Settings, MAX_CHOICES, MAX_STOP_STRINGS};
use crate::error::ApiError;
use crate::openai::{SamplingFields, Stop};
use crate::worker::ModelInfo;

/// `body` as JSON of type `T`, or a 400 that names the field at fault (413 past the limit).
pub(super) fn parse<T: DeserializeOwned>(
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
pub(super) fn parse_with_sampling<T: DeserializeOwned>(
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

pub(super) fn tokenizer<'a>(info: &'a ModelInfo, param: &str) -> Result<&'a Tokenizer, ApiError> {
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
pub(super) fn token_ids(ids: &[i64], info: &ModelInfo, param: &str) -> Result<Vec<u32>, ApiError> {
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
pub(super) fn check_model(asked: Option<&str>, info: &ModelInfo) -> Result<(), ApiError> {
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
pub(super) fn sampling(
    fields: &SamplingFields,
) -> Result<(SamplingConfig, Vec<String>, usize), ApiError> {
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
pub(super) fn new_tokens(
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
