//! [`EngineSpeculation`]: speculative decoding inside the continuous-batching engine.
//!
//! # Where the design comes from
//! vLLM's scheduler gives each decoding request a slot for its "spec tokens": the proposer
//! (n-gram lookup, a draft model, EAGLE) guesses after every step, the next step feeds the
//! request's token and its guesses as one piece of the batch, and a rejection sampler keeps
//! the longest run the target agrees with; its block manager never caches a block holding an
//! unverified token. This engine does the same over its ragged pass:
//!
//! - **Per-request drafters.** Each request gets its own [`Drafter`] when it is added (made by
//!   [`EngineSpeculation::drafter`]) and its own guess-length [`Schedule`], so a request that
//!   copies its prompt guesses long runs while an open-ended one beside it pauses.
//! - **Verification rows in the ragged pass.** Before a step, every decoding request asks its
//!   drafter for guesses; the scheduler feeds `1 + guesses` tokens for it (trimmed to the
//!   token budget) and the pass returns a logits row per position. Each row checks one guess
//!   (greedy: the argmax; sampled: `min(1, p/q)` and the residual, as
//!   [`Generator::speculate`](crate::Generator::speculate)), and the row after the last kept
//!   guess gives the request's own token.
//! - **Blocks.** The piece is reserved with [`PagedStore::reserve_unverified`]: its blocks
//!   join the prefix cache only when [`PagedStore::truncate`] keeps their positions after
//!   verification, and the blocks past the last kept guess go back to the pool at once.
//!
//! # What it costs
//! A guess costs a row of every product in the pass. With one or two decoders the products
//! read each weight for a handful of rows, so kept guesses are nearly free tokens; with many
//! decoders the pass already reads each weight once for all of them, and guesses add compute
//! without saving reads. Speculation therefore stops while more than
//! [`EngineSpeculation::max_decoding`] requests decode (vLLM's `disable_by_batch_size`). A
//! draft model drafts request by request, one pass per guess, outside the batched pass.
//!
//! [`PagedStore::reserve_unverified`]: kv_core::PagedStore::reserve_unverified
//! [`PagedStore::truncate`]: kv_core::PagedStore::truncate

use burn::tensor::backend::Backend;
use kv_core::CacheConfig;
use kv_model::Transformer;

use super::request::Request;
use crate::error::Result;
use crate::sampling::SamplingConfig;
use crate::speculative::{DraftModel, Drafter, PromptLookup, Schedule};

/// Makes a request's drafter when the request is added.
pub type DrafterFactory<'a> = Box<dyn FnMut(&Request) -> Result<Box<dyn Drafter + 'a>> + 'a>;

/// Decoders running at once above which no request speculates, by default: one. On two CPU
/// cores a lone SmolLM2 request decodes 2.1-2.6x faster copying a quote and 0.92-1.12x on
/// open-ended text, but two open-ended requests batched ran at 0.83-1.21x (median 0.93x), and
/// three with one quote among them at 0.84-0.98x: beside other decoders a guess's row costs
/// compute the batch was not already paying for (docs/benchmarks.md, "Speculation in the
/// engine").
pub const DEFAULT_MAX_DECODING: usize = 1;

/// How the engine speculates (see the module docs): who guesses, how many guesses a step, and
/// up to how many decoding requests.
///
/// ```
/// use kv_generate::engine::EngineSpeculation;
/// use kv_generate::speculative::PromptLookup;
///
/// let speculation = EngineSpeculation::prompt_lookup(PromptLookup::default(), 8);
/// assert_eq!(speculation.draft_tokens, 8);
/// ```
pub struct EngineSpeculation<'a> {
    /// Makes each request's drafter when it is added.
    pub drafter: DrafterFactory<'a>,
    /// Most guesses one request feeds a step (its [`Schedule`] starts lower and grows).
    pub draft_tokens: usize,
    /// Speculate only while at most this many requests decode.
    pub max_decoding: usize,
}

impl<'a> EngineSpeculation<'a> {
    /// Prompt lookup for every request: guesses copied from earlier in its own prompt and
    /// output.
    pub fn prompt_lookup(lookup: PromptLookup, draft_tokens: usize) -> Self {
        Self {
            drafter: Box::new(move |_| Ok(Box::new(lookup) as Box<dyn Drafter + 'a>)),
            draft_tokens,
            max_decoding: DEFAULT_MAX_DECODING,
        }
    }

    /// A draft model for every request: each gets a [`DraftModel`] over `model` with its own
    /// dynamic cache, drawing (for a sampled request) with the request's settings under another
    /// seed, and stopping a draft where its largest probability falls below `min_probability`.
    /// `model` must share the target's token ids
    /// ([`check_same_tokens`](crate::speculative::check_same_tokens)).
    pub fn draft_model<B: Backend>(
        model: &'a Transformer<B>,
        min_probability: f64,
        draft_tokens: usize,
    ) -> Self {
        let drafter = move |request: &Request| -> Result<Box<dyn Drafter + 'a>> {
            let cache = CacheConfig::Dynamic {
                capacity: request.prompt.len() + request.max_new_tokens + draft_tokens,
            };
            let sampling = SamplingConfig {
                seed: request.sampling.seed ^ 0x5eed_d4af,
                ..request.sampling.clone()
            };
            let drafter =
                DraftModel::new(model, &cache, sampling)?.with_min_probability(min_probability);
            Ok(Box::new(drafter))
        };
        Self {
            drafter: Box::new(drafter),
            draft_tokens,
            max_decoding: DEFAULT_MAX_DECODING,
        }
    }

    /// This speculation, on while at most `n` requests decode.
    pub fn with_max_decoding(mut self, n: usize) -> Self {
        self.max_decoding = n;
        self
    }
}

/// A request's drafter and its guess-length schedule.
pub(crate) struct Drafting<'a> {
    pub(crate) drafter: Box<dyn Drafter + 'a>,
    pub(crate) schedule: Schedule,
}

/// What speculation did in the engine since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpeculationCounts {
    /// Pieces that carried guesses (vLLM's `spec_decode_num_drafts`).
    pub drafts: usize,
    /// Guesses fed (vLLM's `spec_decode_num_draft_tokens`).
    pub drafted_tokens: usize,
    /// Guesses the model agreed with and kept (vLLM's `spec_decode_num_accepted_tokens`).
    pub accepted_tokens: usize,
}
