//! [`ApiError`]: every way a request fails, with its HTTP status and OpenAI's error body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::openai::{ErrorBody, ErrorDetail};

/// Why a request was refused or failed. Each variant maps to one status: the client's
/// mistakes are 4xx, a full queue or a model still loading is 503 (retry later), and only a
/// failure inside the engine is 500.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The body is not what the API accepts: bad JSON, a wrong type, a value out of range.
    #[error("{message}")]
    Invalid {
        /// What is wrong and how to fix it.
        message: String,
        /// The field at fault (`messages[0].content`, `temperature`), if one is.
        param: Option<String>,
    },
    /// The body is larger than the server accepts.
    #[error("the request body is larger than this server's limit of {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// An API key is required and the request's `Authorization: Bearer` header does not give
    /// it.
    #[error(
        "this server needs an API key: send the header `Authorization: Bearer <key>` with the \
         key it was started with (--api-key or KV_SERVE_API_KEY)"
    )]
    Unauthorized,
    /// The request names a model this server does not serve.
    #[error("the model `{asked}` does not exist here: this server serves `{served}`")]
    UnknownModel {
        /// The model asked for.
        asked: String,
        /// The one served.
        served: String,
    },
    /// No route has this path and method.
    #[error("no route {method} {path}: see /v1/models, /v1/chat/completions, /v1/completions")]
    NoRoute {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// The model is still loading.
    #[error("the model is still loading: retry in a few seconds")]
    Loading,
    /// The model failed to load; the server answers but cannot generate.
    #[error("the model failed to load: {0}")]
    LoadFailed(String),
    /// Too many requests are in flight.
    #[error(
        "the server is at capacity ({in_flight} requests in flight, limit {limit}): retry in \
         {retry_after_s} s"
    )]
    QueueFull {
        /// Requests in flight now.
        in_flight: usize,
        /// The most the server holds.
        limit: usize,
        /// Seconds after which a retry is reasonable.
        retry_after_s: u64,
    },
    /// A feature this server was started without.
    #[error("{what} is off on this server: start it with {flag}")]
    NotEnabled {
        /// The feature.
        what: &'static str,
        /// The flag that turns it on.
        flag: &'static str,
    },
    /// A prompt cache save of a prompt the pool holds no block of.
    #[error(
        "the pool holds none of this prompt's {whole_blocks} whole blocks of {block_size} \
         tokens: run the prompt first (a completion of it, max_tokens 1), then save it"
    )]
    NothingCached {
        /// Whole blocks in the prompt.
        whole_blocks: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// The engine failed on an accepted request.
    #[error("the engine failed: {0}")]
    Engine(String),
}

impl ApiError {
    /// A bad value in field `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::UnknownModel { .. } | ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::Loading | ApiError::LoadFailed(_) | ApiError::QueueFull { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::NotEnabled { .. } => StatusCode::NOT_IMPLEMENTED,
            ApiError::NothingCached { .. } => StatusCode::CONFLICT,
            ApiError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> ErrorBody {
        let (kind, code) = match self {
            ApiError::Invalid { .. } | ApiError::TooLarge { .. } => ("invalid_request_error", None),
            ApiError::Unauthorized => ("authentication_error", Some("invalid_api_key")),
            ApiError::UnknownModel { .. } => ("invalid_request_error", Some("model_not_found")),
            ApiError::NoRoute { .. } => ("not_found_error", None),
            ApiError::Loading | ApiError::LoadFailed(_) => ("server_error", Some("unavailable")),
            ApiError::QueueFull { .. } => ("server_error", Some("queue_full")),
            ApiError::NotEnabled { .. } => ("invalid_request_error", Some("not_enabled")),
            ApiError::NothingCached { .. } => ("invalid_request_error", Some("not_cached")),
            ApiError::Engine(_) => ("server_error", None),
        };
        let param = match self {
            ApiError::Invalid { param, .. } => param.clone(),
            ApiError::UnknownModel { .. } => Some("model".into()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: kind.into(),
                param,
                code: code.map(str::to_string),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        let retry = match &self {
            ApiError::QueueFull { retry_after_s, .. } => Some(*retry_after_s),
            ApiError::Loading => Some(5),
            _ => None,
        };
        if let Some(seconds) = retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status_and_names_its_field() {
        let e = ApiError::invalid("temperature", "temperature must be in [0, 2], got 3");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let body = e.body();
        assert_eq!(body.error.param.as_deref(), Some("temperature"));
        assert_eq!(body.error.kind, "invalid_request_error");
        assert!(body.error.message.contains("got 3"));

        let full = ApiError::QueueFull {
            in_flight: 9,
            limit: 8,
            retry_after_s: 2,
        };
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = full.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");

        assert_eq!(ApiError::Unauthorized.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            ApiError::TooLarge { limit: 10 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
