//! Speculative decoding, greedy: a cheap drafter guesses the next few tokens, the model scores
//! them all in one pass through its cache, and the longest run it agrees with is kept with the
//! model's own next token; the cache is cropped back past the first rejected guess, so it holds
//! what feeding only the kept tokens would have left (Leviathan et al., "Fast Inference from
//! Transformers via Speculative Decoding", 2023; the draft-free prompt lookup of Saxena's
//! "Prompt Lookup Decoding", 2023, which transformers and llama.cpp ship).
//!
//! The output is plain greedy decoding's, token for token: every kept token is the model's
//! argmax at its position, computed over exactly the tokens before it. What it costs: a pass
//! scores `1 + k` positions instead of one, which on a CPU whose decode step is bound by
//! reading the weights costs little more than one position; a rejected guess wastes its share
//! of the pass. It pays where the text repeats what came before (code edits, quotes,
//! extraction), which is where prompt lookup finds guesses.

use std::time::{Duration, Instant};

use burn::tensor::{backend::Backend, Tensor};
use kv_core::CacheConfig;
use kv_model::Logits;

use crate::error::{GenerateError, Result};
use crate::generate::Generator;
use crate::sampling::argmax;

/// Guesses the tokens that follow a context.
pub trait Drafter {
    /// Up to `max` tokens that may follow `context` (the prompt and every token kept so far);
    /// fewer, or none, when it has no guess.
    fn draft(&mut self, context: &[u32], max: usize) -> Vec<u32>;
}

/// Draft-free guesses from the context itself: the tokens that followed the latest earlier
/// occurrence of the context's last `n` tokens, for the longest `n` from `max_ngram` down to
/// `min_ngram` that occurs (prompt lookup decoding).
///
/// ```
/// use kv_generate::speculative::{Drafter, PromptLookup};
///
/// let mut lookup = PromptLookup { min_ngram: 1, max_ngram: 3 };
/// // "... 7 8 9 4 5 ... 7 8" : the last two tokens occurred before, followed by 9 4 5.
/// assert_eq!(lookup.draft(&[1, 7, 8, 9, 4, 5, 2, 7, 8], 3), [9, 4, 5]);
/// assert_eq!(lookup.draft(&[1, 2, 3], 3), Vec::<u32>::new()); // nothing repeats
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptLookup {
    /// Shortest suffix to look up.
    pub min_ngram: usize,
    /// Longest suffix to look up.
    pub max_ngram: usize,
}

impl Default for PromptLookup {
    /// transformers' `prompt_lookup_num_tokens` search: suffixes of 3 tokens down to 1.
    fn default() -> Self {
        Self {
            min_ngram: 1,
            max_ngram: 3,
        }
    }
}

impl Drafter for PromptLookup {
    fn draft(&mut self, context: &[u32], max: usize) -> Vec<u32> {
        if max == 0 {
            return Vec::new();
        }
        for n in (self.min_ngram.max(1)..=self.max_ngram).rev() {
            let Some(start) = context.len().checked_sub(n) else {
                continue;
            };
            let suffix = &context[start..];
            // The latest earlier occurrence (not the suffix itself), so at least one token
            // follows it.
            if let Some(at) = (0..start).rev().find(|&i| &context[i..i + n] == suffix) {
                let from = at + n;
                return context[from..(from + max).min(context.len())].to_vec();
            }
        }
        Vec::new()
    }
}

/// What speculation did over one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeculationStats {
    /// Forward passes after the prompt's (one per step, guesses or not).
    pub passes: usize,
    /// Tokens the drafter guessed.
    pub drafted: usize,
    /// Guessed tokens the model agreed with and kept.
    pub accepted: usize,
}

/// Tokens from [`Generator::speculate_greedy`] and what speculation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeculativeOutput {
    /// The generated ids (an end-of-sequence id included, as it ended generation).
    pub tokens: Vec<u32>,
    /// Drafted and accepted counts.
    pub stats: SpeculationStats,
    /// The prompt's pass and the first token's choice.
    pub prefill: Duration,
    /// Every pass after it (drafting included).
    pub decode: Duration,
}

impl<B: Backend> Generator<'_, B> {
    /// Greedy generation of up to `max_new_tokens` after `prompt` through a new `cache`, each
    /// step scoring up to `draft_tokens` guesses of `drafter` in the same pass: the tokens of
    /// plain greedy decoding, in fewer passes where the guesses hold. Stops after any id of
    /// `eos`.
    ///
    /// The number of guesses a step asks for adapts as transformers' assisted generation's
    /// does: two more after a pass that kept every guess (up to `draft_tokens`), one fewer
    /// (down to one) after a pass that rejected some, so a text that does not repeat itself
    /// costs passes of two positions, not of `1 + draft_tokens`.
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_core::CacheConfig;
    /// use kv_generate::speculative::PromptLookup;
    /// use kv_generate::Generator;
    /// use kv_model::{ModelConfig, Transformer};
    ///
    /// let json = serde_json::json!({
    ///     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    ///     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    /// });
    /// let config = ModelConfig::from_hf_json(&json, "example").unwrap();
    /// let model = Transformer::<NdArray>::random(&config, 1, &Default::default()).unwrap();
    /// let cache = CacheConfig::Dynamic { capacity: 64 };
    /// let out = Generator::new(&model, None)
    ///     .speculate_greedy(&[1, 2, 3, 1, 2], &cache, 8, &[], &mut PromptLookup::default(), 4)
    ///     .unwrap();
    /// assert_eq!(out.tokens.len(), 8);
    /// ```
    ///
    /// # Errors
    /// An empty prompt, ids outside the vocabulary, positions past the model's, or a cache
    /// kind that cannot drop its last positions ([`kv_core::KvCache::crop`]: a ring that has
    /// wrapped around).
    pub fn speculate_greedy(
        &self,
        prompt: &[u32],
        cache: &CacheConfig,
        max_new_tokens: usize,
        eos: &[u32],
        drafter: &mut dyn Drafter,
        draft_tokens: usize,
    ) -> Result<SpeculativeOutput> {
        if prompt.is_empty() {
            return Err(GenerateError::InvalidRequest("empty prompt".into()));
        }
        let model = self.model;
        let mut cache = model.new_cache(cache)?;
        let mut stats = SpeculationStats::default();
        let mut tokens = Vec::new();
        let start = Instant::now();
        if max_new_tokens == 0 {
            let zero = Duration::ZERO;
            return Ok(SpeculativeOutput {
                tokens,
                stats,
                prefill: zero,
                decode: zero,
            });
        }
        let logits = model.forward(&[prompt.to_vec()], None, Some(&mut cache), Logits::Last)?;
        let mut next = argmax(&position_rows(logits)[0]);
        let prefill = start.elapsed();
        let mut context = prompt.to_vec();
        let mut limit = draft_tokens;
        loop {
            tokens.push(next);
            context.push(next);
            let room = max_new_tokens - tokens.len();
            if room == 0 || eos.contains(&next) {
                break;
            }
            // A pass keeps its accepted guesses and one token of its own: at most `room`.
            let draft = drafter.draft(&context, limit.min(room - 1));
            let held = cache.seq_len();
            let input: Vec<u32> = std::iter::once(next).chain(draft.iter().copied()).collect();
            let logits = model.forward(&[input], None, Some(&mut cache), Logits::All)?;
            // Row `i` is the model's choice after `input[..=i]`.
            let choices: Vec<u32> = position_rows(logits).iter().map(|r| argmax(r)).collect();
            let accepted = draft
                .iter()
                .zip(&choices)
                .take_while(|(guess, choice)| guess == choice)
                .count();
            stats.passes += 1;
            stats.drafted += draft.len();
            stats.accepted += accepted;
            if !draft.is_empty() {
                limit = match accepted == draft.len() {
                    true => (limit + 2).min(draft_tokens),
                    false => limit.saturating_sub(1).max(1),
                };
            }
            // Keep `next` and the accepted guesses; the rest never happened.
            if accepted < draft.len() {
                cache.crop(held + 1 + accepted)?;
            }
            let kept = &draft[..accepted];
            if let Some(end) = kept.iter().position(|t| eos.contains(t)) {
                tokens.extend_from_slice(&kept[..=end]);
                break;
            }
            tokens.extend_from_slice(kept);
            context.extend_from_slice(kept);
            next = choices[accepted];
        }
        Ok(SpeculativeOutput {
            tokens,
            stats,
            prefill,
            decode: start.elapsed() - prefill,
        })
    }
}

/// Every position's logits of a one-row batch `[1, seq, vocab]`, on the host.
fn position_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [_, _, vocab] = logits.dims();
    let data = logits
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("logits converted to f32");
    data.chunks(vocab).map(<[f32]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_prefers_the_longest_suffix_and_the_latest_occurrence() {
        let mut lookup = PromptLookup {
            min_ngram: 1,
            max_ngram: 2,
        };
        // "5" occurs twice before (followed by 6, then by 9); "4 5" once, followed by 6.
        assert_eq!(lookup.draft(&[4, 5, 6, 5, 9, 4, 5], 2), [6, 5]);
        // Only "5" matches: its latest earlier occurrence is followed by 9.
        assert_eq!(lookup.draft(&[4, 5, 6, 5, 9, 3, 5], 2), [9, 3]);
        // No more than what follows the match, nor than asked.
        assert_eq!(lookup.draft(&[1, 2, 1], 5), [2, 1]);
        assert_eq!(lookup.draft(&[1, 2, 1], 0), Vec::<u32>::new());
        assert_eq!(lookup.draft(&[], 3), Vec::<u32>::new());
    }
}
