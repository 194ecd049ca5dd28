//! Speculative decoding: a cheap drafter guesses the next few tokens, the model scores them all
//! in one pass through its cache, and the run of guesses it accepts is kept with one token of
//! its own; the cache is cropped back past the first rejected guess, so it holds what feeding
//! only the kept tokens would have left (Leviathan et al., "Fast Inference from Transformers
//! via Speculative Decoding", 2023; the draft-free prompt lookup of Saxena's "Prompt Lookup
//! Decoding", 2023, which transformers and llama.cpp ship).
//!
//! Greedy, the output is plain greedy decoding's, token for token: a guess is kept when it is
//! the model's argmax at its position, computed over exactly the tokens before it. Sampling,
//! each token has the model's distribution `p` (the sampler's, after its penalties, temperature
//! and filters): a drafter that proposes its guess with certainty has it kept with probability
//! `p(guess)`, and on a rejection the token is drawn from `p` without the guess, renormalised
//! (the residual `max(0, p - q)` of speculative sampling for a one-hot `q`). What it costs: a pass
//! scores `1 + k` positions instead of one, which on a CPU whose decode step is bound by
//! reading the weights costs little more than one position; a rejected guess wastes its share
//! of the pass. It pays where the text repeats what came before (code edits, quotes,
//! extraction), which is where prompt lookup finds guesses.

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use kv_core::CacheConfig;
use kv_model::Logits;

use crate::error::{GenerateError, Result};
use crate::generate::{host_positions, Generator};
use crate::sampling::{Sampler, SamplingConfig};

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

/// How [`Generator::speculate`] generates.
#[derive(Debug, Clone, PartialEq)]
pub struct Speculation {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Ids that end generation (kept as the last token).
    pub eos: Vec<u32>,
    /// Greedy or sampled, as plain generation's sampler.
    pub sampling: SamplingConfig,
    /// Most guesses a step scores.
    pub draft_tokens: usize,
}

/// Whether a guess stands, and the token at its position.
fn check(sampler: &mut Sampler, logits: &[f32], context: &[u32], guess: u32) -> (bool, u32) {
    if sampler.config().is_greedy() {
        let choice = sampler.sample(logits, context);
        return (choice == guess, choice);
    }
    let p = sampler.distribution(logits, context);
    let p_guess = p.iter().find(|(id, _)| *id == guess).map_or(0.0, |t| t.1);
    if sampler.uniform() < p_guess {
        return (true, guess);
    }
    let residual: Vec<(u32, f64)> = p.into_iter().filter(|(id, _)| *id != guess).collect();
    (false, sampler.draw(&residual))
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

/// Tokens from [`Generator::speculate`] and what speculation did.
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
    /// Generation of up to `config.max_new_tokens` after `prompt` through a new `cache`, each
    /// step scoring up to `config.draft_tokens` guesses of `drafter` in the same pass: greedy,
    /// the tokens of plain greedy decoding; sampled, tokens with the model's distribution
    /// (seeded by the sampler's seed); either way in fewer passes where the guesses hold.
    /// Stops after any id of `config.eos`.
    ///
    /// The number of guesses a step asks for adapts as transformers' assisted generation's
    /// does: two more after a pass that kept every guess (up to `draft_tokens`), one fewer
    /// (down to one) after a pass that rejected some, so a text that does not repeat itself
    /// costs passes of two positions, not of `1 + draft_tokens`.
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_core::CacheConfig;
    /// use kv_generate::speculative::{PromptLookup, Speculation};
    /// use kv_generate::{Generator, SamplingConfig};
    /// use kv_model::{ModelConfig, Transformer};
    ///
    /// let json = serde_json::json!({
    ///     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    ///     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    /// });
    /// let config = ModelConfig::from_hf_json(&json, "example").unwrap();
    /// let model = Transformer::<NdArray>::random(&config, 1, &Default::default()).unwrap();
    /// let cache = CacheConfig::Dynamic { capacity: 64 };
    /// let speculation = Speculation {
    ///     max_new_tokens: 8,
    ///     eos: vec![],
    ///     sampling: SamplingConfig::greedy(),
    ///     draft_tokens: 4,
    /// };
    /// let out = Generator::new(&model, None)
    ///     .speculate(&[1, 2, 3, 1, 2], &cache, &speculation, &mut PromptLookup::default())
    ///     .unwrap();
    /// assert_eq!(out.tokens.len(), 8);
    /// ```
    ///
    /// # Errors
    /// An empty prompt, sampling settings out of range, ids outside the vocabulary, positions
    /// past the model's, or a cache kind that cannot drop its last positions
    /// ([`kv_core::KvCache::crop`]: a ring that has wrapped around).
    pub fn speculate(
        &self,
        prompt: &[u32],
        cache: &CacheConfig,
        config: &Speculation,
        drafter: &mut dyn Drafter,
    ) -> Result<SpeculativeOutput> {
        if prompt.is_empty() {
            return Err(GenerateError::InvalidRequest("empty prompt".into()));
        }
        let mut sampler = Sampler::new(config.sampling.clone())?;
        let model = self.model;
        let mut cache = model.new_cache(cache)?;
        let mut stats = SpeculationStats::default();
        let mut tokens = Vec::new();
        let start = Instant::now();
        if config.max_new_tokens == 0 {
            let zero = Duration::ZERO;
            return Ok(SpeculativeOutput {
                tokens,
                stats,
                prefill: zero,
                decode: zero,
            });
        }
        let logits = model.forward(&[prompt.to_vec()], None, Some(&mut cache), Logits::Last)?;
        let mut next = sampler.sample(&host_positions(logits)[0], prompt);
        let prefill = start.elapsed();
        let mut context = prompt.to_vec();
        let mut limit = config.draft_tokens;
        loop {
            tokens.push(next);
            context.push(next);
            let room = config.max_new_tokens - tokens.len();
            if room == 0 || config.eos.contains(&next) {
                break;
            }
            // A pass keeps its accepted guesses and one token of its own: at most `room`.
            let draft = drafter.draft(&context, limit.min(room - 1));
            let held = cache.seq_len();
            let input: Vec<u32> = std::iter::once(next).chain(draft.iter().copied()).collect();
            let logits = model.forward(&[input], None, Some(&mut cache), Logits::All)?;
            // Row `i` scores the position after `input[..=i]`.
            let rows = host_positions(logits);
            let mut accepted = 0;
            let mut own = None;
            for (guess, row) in draft.iter().zip(&rows) {
                let (kept, token) = check(&mut sampler, row, &context, *guess);
                if !kept {
                    own = Some(token);
                    break;
                }
                context.push(*guess);
                accepted += 1;
            }
            let own = match own {
                Some(token) => token,
                None => sampler.sample(&rows[accepted], &context),
            };
            stats.passes += 1;
            stats.drafted += draft.len();
            stats.accepted += accepted;
            if !draft.is_empty() {
                limit = match accepted == draft.len() {
                    true => (limit + 2).min(config.draft_tokens),
                    false => limit.saturating_sub(1).max(1),
                };
            }
            // Keep `next` and the accepted guesses; the rest never happened.
            if accepted < draft.len() {
                cache.crop(held + 1 + accepted)?;
            }
            let kept = &draft[..accepted];
            if let Some(end) = kept.iter().position(|t| config.eos.contains(t)) {
                tokens.extend_from_slice(&kept[..=end]);
                break;
            }
            tokens.extend_from_slice(kept);
            next = own;
        }
        Ok(SpeculativeOutput {
            tokens,
            stats,
            prefill,
            decode: start.elapsed() - prefill,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token at a guessed position has the model's distribution whatever the guess: over
    /// 20,000 seeded draws among the four tokens top-k leaves of five, a chi-square test
    /// against `p` (3 degrees of freedom; 16.27 is exceeded by chance once in a thousand runs,
    /// and the seeds are fixed), for a likely guess, an unlikely one and one the filter removed.
    #[test]
    fn a_checked_guess_leaves_the_models_distribution() {
        let logits = [0.3f32, -1.0, 1.2, 0.0, -0.4];
        let config = SamplingConfig {
            temperature: Some(0.9),
            top_k: Some(4),
            seed: 11,
            ..SamplingConfig::greedy()
        };
        let p = Sampler::new(config.clone())
            .unwrap()
            .distribution(&logits, &[]);
        assert_eq!(p.len(), 4);
        for guess in [2, 4, 1] {
            let mut sampler = Sampler::new(config.clone()).unwrap();
            let draws = 20_000;
            let mut counts = [0usize; 5];
            let mut kept = 0;
            for _ in 0..draws {
                let (was_kept, token) = check(&mut sampler, &logits, &[], guess);
                counts[token as usize] += 1;
                kept += usize::from(was_kept);
                assert_eq!(was_kept, token == guess);
            }
            let chi2: f64 = p
                .iter()
                .map(|&(id, prob)| {
                    let expected = prob * draws as f64;
                    (counts[id as usize] as f64 - expected).powi(2) / expected
                })
                .sum();
            assert!(
                chi2 < 16.27,
                "guess {guess}: chi-square {chi2}, counts {counts:?}"
            );
            assert_eq!(counts[1], 0, "token 1 is filtered out");
            // The guess is kept as often as the model would pick it.
            let p_guess = p.iter().find(|t| t.0 == guess).map_or(0.0, |t| t.1);
            assert!((kept as f64 / draws as f64 - p_guess).abs() < 0.02);
        }
    }

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
