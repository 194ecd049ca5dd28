//! The wire types of OpenAI's API, as far as this server speaks it: requests, then every
//! response body (whole responses, stream chunks, and the llama.cpp/vLLM extras), each
//! serialised by serde as it is declared here.
//!
//! Requests take OpenAI's field names; fields OpenAI defines that the server does not act on
//! (`tools`, `response_format`, ...) are accepted and ignored, as llama.cpp's and vLLM's
//! servers do. Where OpenAI is silent the extensions follow vLLM (`top_k`, `min_p`,
//! `repetition_penalty`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Up to four stop strings.
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// A message's `content`: a string, or a list of typed parts of which the text ones count.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts, as the vision-capable API sends them.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ContentPart {
    /// `text` (the only kind this server reads).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (absent on an assistant message that only called tools).
    #[serde(default)]
    pub content: Option<Content>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct StreamOptions {
    /// Send a last chunk with the request's usage before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and stopping fields chat and completions share.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct SamplingFields {
    /// In `[0, 2]`; 0 is greedy. Default 1.
    pub temperature: Option<f32>,
    /// In `(0, 1]`.
    pub top_p: Option<f32>,
    /// Seed of choice 0; choice `j` uses `seed + j`. Default: random.
    pub seed: Option<i64>,
    /// Texts that end a choice (not included in its text).
    pub stop: Option<Stop>,
    /// Choices per prompt, 1 to 16.
    pub n: Option<u32>,
    /// In `[-2, 2]`.
    pub presence_penalty: Option<f32>,
    /// In `[-2, 2]`.
    pub frequency_penalty: Option<f32>,
    /// Extension: sample among the k most likely tokens (`-1` or 0: off).
    pub top_k: Option<i64>,
    /// Extension: in `[0, 1]`.
    pub min_p: Option<f32>,
    /// Extension: transformers' repetition penalty, `> 0` (1 is off).
    pub repetition_penalty: Option<f32>,
    /// Extension (vLLM's): keep generating past the model's end-of-sequence tokens, up to the
    /// token limit (for benchmarks that need fixed lengths).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Stream Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// The caller's end user, which a load balancer may hash on for affinity.
    pub user: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChatRequest {
    /// The model's id, as `/v1/models` lists it.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Most tokens per choice (deprecated by OpenAI for `max_completion_tokens`).
    pub max_tokens: Option<u32>,
    /// Most tokens per choice.
    pub max_completion_tokens: Option<u32>,
    /// Return each token's log-probability.
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per token, 0 to 20 (needs `logprobs`).
    pub top_logprobs: Option<u32>,
    /// Sampling and stopping: the same body's fields, read on their own (so an error names
    /// its field; serde's `flatten` would lose the name).
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// A completions `prompt`: text, texts, token ids or lists of token ids.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts, each a prompt of its own.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Ids(Vec<i64>),
    /// Several prompts as token ids.
    IdLists(Vec<Vec<i64>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CompletionRequest {
    /// The model's id, as `/v1/models` lists it.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt or prompts.
    pub prompt: Prompt,
    /// Most tokens per choice (default 16, as OpenAI's).
    pub max_tokens: Option<u32>,
    /// Put the prompt's text before each choice's.
    #[serde(default)]
    pub echo: bool,
    /// Log-probabilities of each token and of this many alternatives (0 to 20).
    pub logprobs: Option<u32>,
    /// Sampling and stopping: the same body's fields, read on their own (so an error names
    /// its field; serde's `flatten` would lose the name).
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// `usage`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Usage {
    /// Tokens in the prompts (each prompt once, whatever `n`).
    pub prompt_tokens: usize,
    /// Tokens generated over every choice.
    pub completion_tokens: usize,
    /// The sum of both.
    pub total_tokens: usize,
    /// Of the prompt tokens, those served from the prefix cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were already cached.
    pub cached_tokens: usize,
}

/// One alternative in a chat token's `top_logprobs`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its text's UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One generated token in a chat choice's `logprobs.content`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its text's UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at its position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// A chat choice's `logprobs`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// A completion choice's `logprobs`, in the legacy completions shape.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability.
    pub token_logprobs: Vec<f32>,
    /// Each position's alternatives, token text to log-probability.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Where each token's text starts in the choice's text, in bytes.
    pub text_offset: Vec<usize>,
}

/// The body of every error response, as OpenAI sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    /// A message that says what to fix.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A short machine-readable code.
    pub code: Option<String>,
}

/// `POST /v1/completions/render`: a completions request's body, of which only the model and
/// the prompts are read.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRenderRequest {
    /// The model's id, as `/v1/models` lists it.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt or prompts.
    pub prompt: Prompt,
}

/// `POST /v1/chat/completions/render`: a chat request's body, of which only the model and the
/// messages are read.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRenderRequest {
    /// The model's id, as `/v1/models` lists it.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
}

/// A rendered prompt: the token ids the model would be fed (vLLM's `/render` answer).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rendered {
    /// The prompt's token ids.
    pub token_ids: Vec<u32>,
}

/// `POST /tokenize` (llama.cpp's `content`, vLLM's `prompt`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TokenizeRequest {
    /// The text (llama.cpp's name).
    pub content: Option<String>,
    /// The text (vLLM's name).
    pub prompt: Option<String>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DetokenizeRequest {
    /// Token ids.
    pub tokens: Vec<i64>,
}

/// `POST /prompt_cache/save`: the prompt whose cached blocks to write, and the file's name.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PromptCacheSaveRequest {
    /// A plain file name inside the server's prompt cache folder.
    pub filename: String,
    /// The prompt, as text or token ids (as `/v1/completions` takes one)...
    pub prompt: Option<Prompt>,
    /// ...or as chat messages (as `/v1/chat/completions` renders them).
    pub messages: Option<Vec<Message>>,
}

/// `POST /prompt_cache/restore`: the file to read back.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PromptCacheRestoreRequest {
    /// A plain file name inside the server's prompt cache folder.
    pub filename: String,
}

// --- Responses ------------------------------------------------------------------------------

/// `GET /health`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Health {
    /// `ok` while the model is loaded.
    pub status: &'static str,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The model served.
    pub data: Vec<ModelCard>,
}

/// One model of [`ModelList`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelCard {
    /// The name requests use in `model`.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// When it was loaded, in seconds since the Unix epoch.
    pub created: u64,
    /// `kv-cache`.
    pub owned_by: &'static str,
    /// Its context, in tokens (vLLM's field).
    pub max_model_len: usize,
}

/// `POST /tokenize`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Tokenized {
    /// The token ids.
    pub tokens: Vec<u32>,
    /// How many.
    pub count: usize,
    /// The model's context, in tokens.
    pub max_model_len: usize,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Detokenized {
    /// The text, special tokens shown.
    pub content: String,
}

/// `POST /prompt_cache/save`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PromptCacheSaved {
    /// The file written.
    pub filename: String,
    /// Positions saved (whole blocks).
    pub tokens_saved: usize,
    /// The file's size.
    pub bytes: usize,
}

/// `POST /prompt_cache/restore`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PromptCacheRestored {
    /// The file read.
    pub filename: String,
    /// Positions put back in the pool as cached blocks.
    pub tokens_restored: usize,
}

/// `POST /reset_prefix_cache`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PrefixCacheReset {
    /// Cached blocks forgotten (running requests' blocks included; they keep them).
    pub blocks_forgotten: usize,
}

/// `POST /v1/chat/completions`, whole (`object: chat.completion`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The model served.
    pub model: String,
    /// One per choice (`n`).
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// One choice of a [`ChatCompletion`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatChoice {
    /// Which choice.
    pub index: usize,
    /// The assistant's reply.
    pub message: AssistantMessage,
    /// Per-token log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: Option<&'static str>,
}

/// The assistant's message in a [`ChatChoice`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: &'static str,
    /// Its text.
    pub content: String,
}

/// One streamed chunk of a chat completion (`object: chat.completion.chunk`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatCompletionChunk {
    /// The same for every chunk of a response.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The model served.
    pub model: String,
    /// The choices this chunk moves (none in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
}

/// One choice's step in a [`ChatCompletionChunk`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatChunkChoice {
    /// Which choice.
    pub index: usize,
    /// What the message gains.
    pub delta: Delta,
    /// The new token's log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the choice's last chunk.
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to a chat message (empty in a choice's last chunk).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Delta {
    /// `assistant`, in a choice's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// More text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `POST /v1/completions`, whole, and each of its streamed chunks (`object: text_completion`
/// both).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The model served.
    pub model: String,
    /// One per prompt and choice, prompt-major (one per chunk when streamed, none in the
    /// usage chunk).
    pub choices: Vec<CompletionChoice>,
    /// Token counts (whole responses only; streams send them in a chunk of their own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One choice of a [`Completion`] (or its step in a chunk).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompletionChoice {
    /// Which choice.
    pub index: usize,
    /// Its text (the prompt's first, with `echo`).
    pub text: String,
    /// Per-token log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`, once the choice ends.
    pub finish_reason: Option<&'static str>,
}

/// A streamed chunk as sent: its body, and `usage` when the client asked for it
/// (`stream_options.include_usage`): `null` in every chunk but the last, which holds the
/// counts and no choices.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamChunk<C> {
    /// The chunk.
    #[serde(flatten)]
    pub body: C,
    /// Absent without `include_usage`; `null`, or the counts in the last chunk, with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}
