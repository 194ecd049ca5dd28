//! A request as the caller hands it in ([`Request`]), as the engine holds it
//! ([`RequestState`]), and what the engine reports of it ([`EngineEvent`], [`Usage`]).

use kv_core::SequenceId;

use crate::generate::{EosPolicy, FinishReason, Row};
use crate::sampling::{SamplingConfig, TokenLogprobs};
use crate::speculative::Draft;
use crate::stream::StopStrings;

/// One request: a prompt and how to continue it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// How each token is chosen, with the request's own seed.
    pub sampling: SamplingConfig,
    /// Which tokens end it.
    pub eos: EosPolicy,
    /// Texts that end it (needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Log-probabilities of each generated token and of this many alternatives; `None` for
    /// none.
    pub top_logprobs: Option<usize>,
}

impl Request {
    /// Greedy decoding of up to `max_new_tokens` after `prompt`, stopping at the model's EOS.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            max_new_tokens,
            sampling: SamplingConfig::greedy(),
            eos: EosPolicy::Model,
            stop_strings: Vec::new(),
            top_logprobs: None,
        }
    }
}

/// A request's handle, in the order requests were added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt tokens found in the prefix cache when the request was first admitted (not
    /// computed).
    pub cached_prompt_tokens: usize,
}

/// What a step reports, per request, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// A token was generated.
    Token {
        /// Whose.
        request: RequestId,
        /// The token.
        token: u32,
        /// Text that became showable with it (valid UTF-8, never part of a stop string; may
        /// be empty).
        text: String,
        /// Its log-probabilities, when the request asked for them.
        logprobs: Option<TokenLogprobs>,
    },
    /// The request is done; its blocks are back in the pool.
    Finished {
        /// Whose.
        request: RequestId,
        /// Why.
        reason: FinishReason,
        /// Its token counts.
        usage: Usage,
    },
}

/// A request the engine holds, waiting or running: its sampler and output so far, and how
/// far its sequence is in the store.
pub(crate) struct RequestState {
    pub(crate) id: RequestId,
    pub(crate) row: Row,
    pub(crate) max_new_tokens: usize,
    pub(crate) eos: Vec<u32>,
    pub(crate) stops: StopStrings,
    pub(crate) top_logprobs: Option<usize>,
    /// Its sequence in the store while it runs.
    pub(crate) sequence: Option<SequenceId>,
    /// Positions whose keys and values are in the store (computed or cached).
    pub(crate) computed: usize,
    /// Prompt tokens the prefix cache held at its first admission.
    pub(crate) cached_prompt_tokens: Option<usize>,
    /// This step's guesses after its pending token, when it decodes speculatively: fed after
    /// it in the same piece, and verified against its logits rows.
    pub(crate) guesses: Draft,
}

impl RequestState {
    /// Prompt and generated tokens: every position the sequence will hold before its next
    /// token is sampled.
    pub(crate) fn tokens(&self) -> Vec<u32> {
        [self.row.prompt.as_slice(), self.row.generated.as_slice()].concat()
    }

    /// The next `n` tokens to feed: those not yet in the store, then the guesses.
    pub(crate) fn feed(&self, n: usize) -> Vec<u32> {
        // Read in place: a decode step copies its few tokens, not the whole sequence.
        let (prompt, generated) = (&self.row.prompt, &self.row.generated);
        prompt
            .iter()
            .chain(generated)
            .skip(self.computed)
            .chain(&self.guesses.tokens)
            .take(n)
            .copied()
            .collect()
    }

    /// Positions not yet in the store.
    pub(crate) fn pending(&self) -> usize {
        self.row.prompt.len() + self.row.generated.len() - self.computed
    }

    /// Whether it decodes: its prompt is in the store and one generated token waits to be fed.
    pub(crate) fn decoding(&self) -> bool {
        self.pending() == 1 && self.computed >= self.row.prompt.len()
    }
}
