//! Speculative decoding: a cheap drafter guesses the next few tokens, the model scores them all
//! in one pass through its cache, and the run of guesses it accepts is kept with one token of
//! its own; the cache is cropped back past the first rejected guess, so it holds what feeding
//! only the kept tokens would have left (Leviathan et al., "Fast Inference from Transformers
//! via Speculative Decoding", 2023; the draft-free prompt lookup of Saxena's "Prompt Lookup
//! Decoding", 2023, which transformers and llama.cpp ship).
//!
//! Two drafters come with it: [`PromptLookup`], which copies what followed an earlier occurrence
//! of the last few tokens, and [`DraftModel`], a smaller model (or the same model in a smaller
//! weight format) with its own cache, which decodes a few tokens ahead of the model.
//!
//! Greedy, the output is plain greedy decoding's, token for token: a guess is kept when it is
//! the model's argmax at its position, computed over exactly the tokens before it. Sampling,
//! each token has the model's distribution `p` (the sampler's, after its penalties, temperature
//! and filters): a guess drawn from the drafter's distribution `q` is kept with probability
//! `min(1, p(guess) / q(guess))`, and on a rejection the token is drawn from the residual
//! `max(0, p - q)`, renormalised (speculative sampling); a drafter that proposes with certainty
//! has a one-hot `q`, so its guess is kept with probability `p(guess)` and a rejection draws
//! from `p` without the guess. What it costs: a pass
//! scores `1 + k` positions instead of one, which on a CPU whose decode step is bound by
//! reading the weights costs little more than one position; a rejected guess wastes its share
//! of the pass. It pays where the text repeats what came before (code edits, quotes,
//! extraction), which is where prompt lookup finds guesses.

use std::time::{Duration, Instant};

use std::collections::HashMap;

use burn::tensor::backend::Backend;
use kv_core::{CacheConfig, ModelCache};
use kv_model::{Logits, SpecialTokens, Tokenizer, Transformer};

use crate::error::{GenerateError, Result};
use crate::generate::{host_positions, Generator};
use crate::sampling::{Sampler, SamplingConfig};

/// A probability distribution over token ids, as `(id, probability)` pairs (ids left out have
/// probability 0).
pub type Distribution = Vec<(u32, f64)>;

/// Guesses for the tokens after a context, and how each was proposed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    /// The guessed ids, in order.
    pub tokens: Vec<u32>,
    /// For each guess, the distribution the drafter drew it from; `None` where every guess was
    /// proposed with certainty (a lookup, a greedy draft model), which sampled verification
    /// treats as a one-hot distribution.
    pub proposals: Option<Vec<Distribution>>,
}

impl Draft {
    /// Keeps the first `n` guesses (and their proposals).
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        if let Some(proposals) = &mut self.proposals {
            proposals.truncate(n);
        }
    }

    /// Guesses.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there is no guess.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

impl From<Vec<u32>> for Draft {
    /// Guesses proposed with certainty.
    fn from(tokens: Vec<u32>) -> Self {
        Self {
            tokens,
            proposals: None,
        }
    }
}

/// Guesses the tokens that follow a context.
pub trait Drafter {
    /// Up to `max` tokens that may follow `context` (the prompt and every token kept so far);
    /// fewer, or none, when it has no guess.
    ///
    /// # Errors
    /// Whatever stops the drafter from guessing (a draft model's forward pass).
    fn draft(&mut self, context: &[u32], max: usize) -> Result<Draft>;
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
/// let draft = lookup.draft(&[1, 7, 8, 9, 4, 5, 2, 7, 8], 3).unwrap();
/// assert_eq!(draft.tokens, [9, 4, 5]);
/// assert_eq!(lookup.lookup(&[1, 2, 3], 3), Vec::<u32>::new()); // nothing repeats
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

impl PromptLookup {
    /// Up to `max` tokens that followed the latest earlier occurrence of `context`'s last
    /// tokens; none when nothing repeats.
    pub fn lookup(&self, context: &[u32], max: usize) -> Vec<u32> {
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

impl Drafter for PromptLookup {
    fn draft(&mut self, context: &[u32], max: usize) -> Result<Draft> {
        Ok(self.lookup(context, max).into())
    }
}

/// A draft model: a smaller model with the same tokenizer, or the same model in a smaller
/// weight format (native Q4 blocks drafting for f32 weights), that decodes the guesses one
/// token at a time through its own cache.
///
/// The cache follows the context across calls: the tokens it holds that the context no longer
/// has (guesses the model rejected) are cropped away, and only the context's new tokens are fed,
/// so a step costs the draft model one pass per guess plus one for the tokens the model added.
/// Greedy (the default sampler), guesses are the draft's argmax and proposed with certainty;
/// with a sampling configuration they are drawn from the draft's distribution, which
/// [`Draft::proposals`] reports for speculative sampling's acceptance test.
///
/// Drafting stops early where the draft is unsure ([`DraftModel::with_min_probability`]: its
/// largest probability below a floor, as llama.cpp's `--draft-p-min`), since a guess the draft
/// doubts is one the model tends to reject, and each costs a draft step. The test looks at the
/// draft's distribution, never at the guess drawn from it, so sampled speculation stays exact.
///
/// ```
/// use burn_ndarray::NdArray;
/// use kv_core::CacheConfig;
/// use kv_generate::speculative::{DraftModel, Drafter};
/// use kv_generate::SamplingConfig;
/// use kv_model::{ModelConfig, Transformer};
///
/// let json = serde_json::json!({
///     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
///     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
/// });
/// let config = ModelConfig::from_hf_json(&json, "example").unwrap();
/// let draft = Transformer::<NdArray>::random(&config, 7, &Default::default()).unwrap();
/// let cache = CacheConfig::Dynamic { capacity: 64 };
/// let mut drafter = DraftModel::new(&draft, &cache, SamplingConfig::greedy()).unwrap();
/// let guesses = drafter.draft(&[1, 2, 3], 4).unwrap();
/// assert_eq!(guesses.tokens.len(), 4);
/// assert_eq!(drafter.held(), 6); // the context and the first three guesses
/// ```
pub struct DraftModel<'m, B: Backend> {
    model: &'m Transformer<B>,
    cache: ModelCache<B>,
    /// The tokens whose keys and values `cache` holds.
    fed: Vec<u32>,
    sampler: Sampler,
    /// Least probability (softmax of the draft's logits) of a guess worth proposing.
    min_probability: f64,
}

impl<'m, B: Backend> DraftModel<'m, B> {
    /// A drafter decoding with `model` through a new cache of kind `cache` (one that can crop:
    /// dynamic, static or paged), drawing its guesses with `sampling`.
    ///
    /// # Errors
    /// Sampling settings out of range, or a cache the model cannot build.
    pub fn new(
        model: &'m Transformer<B>,
        cache: &CacheConfig,
        sampling: SamplingConfig,
    ) -> Result<Self> {
        Ok(Self {
            model,
            cache: model.new_cache(cache)?,
            fed: Vec::new(),
            sampler: Sampler::new(sampling)?,
            min_probability: 0.0,
        })
    }

    /// This drafter, stopping a draft at the first position where the draft's largest
    /// probability (softmax of its logits) is below `p` (0 proposes every guess asked for).
    pub fn with_min_probability(mut self, p: f64) -> Self {
        self.min_probability = p;
        self
    }

    /// Positions the draft's cache holds.
    pub fn held(&self) -> usize {
        self.fed.len()
    }

    /// Crops the cache to what it shares with `context`, keeping at least one token of
    /// `context` to feed (its logits are the first guess's).
    fn catch_up(&mut self, context: &[u32]) -> Result<()> {
        let shared = self
            .fed
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count()
            .min(context.len() - 1);
        if shared < self.fed.len() {
            self.cache.crop(shared)?;
            self.fed.truncate(shared);
        }
        Ok(())
    }

    /// The next guess from one pass over `tokens`, the distribution it came from, and the
    /// draft's confidence: its largest softmax probability, which does not depend on the draw
    /// (so a draft stopped on it leaves every proposed guess distributed as reported).
    fn step(&mut self, tokens: &[u32], context: &[u32]) -> Result<(u32, Distribution, f64)> {
        let logits = self.model.forward(
            &[tokens.to_vec()],
            None,
            Some(&mut self.cache),
            Logits::Last,
        )?;
        self.fed.extend_from_slice(tokens);
        let row = &host_positions(logits)[0];
        let q = self.sampler.distribution(row, context);
        let guess = match self.sampler.config().is_greedy() {
            true => q[0].0,
            false => self.sampler.draw(&q),
        };
        let confidence = match self.min_probability > 0.0 {
            true => top_probability(row),
            false => 1.0,
        };
        Ok((guess, q, confidence))
    }
}

impl<B: Backend> Drafter for DraftModel<'_, B> {
    fn draft(&mut self, context: &[u32], max: usize) -> Result<Draft> {
        if max == 0 || context.is_empty() {
            return Ok(Draft::default());
        }
        self.catch_up(context)?;
        // The next call crops back at most the guesses fed after the first, and one token more.
        self.cache.set_rewind(max + 1);
        let mut context = context.to_vec();
        let mut tokens = Vec::with_capacity(max);
        let mut proposals = Vec::with_capacity(max);
        let mut input = context[self.fed.len()..].to_vec();
        while tokens.len() < max {
            let (guess, q, confidence) = self.step(&input, &context)?;
            if confidence < self.min_probability {
                break;
            }
            tokens.push(guess);
            proposals.push(q);
            context.push(guess);
            input = vec![guess];
        }
        let proposals = (!self.sampler.config().is_greedy()).then_some(proposals);
        Ok(Draft { tokens, proposals })
    }
}

/// The largest softmax probability among `logits`.
fn top_probability(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    1.0 / sum
}

/// Checks that a draft model's tokenizer gives the model's token ids: the same vocabulary size,
/// the same text for every 61st id, and the same ids for a sample text. A draft whose ids mean
/// other text would guess nonsense the model rejects (slower, never wrong), or ids past the
/// model's vocabulary (an error mid-generation), so it is refused up front.
///
/// # Errors
/// [`GenerateError::InvalidRequest`] naming the first difference.
pub fn check_same_tokens(model: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    let differ = |what: String| {
        Err(GenerateError::InvalidRequest(format!(
            "the draft model's tokenizer differs from the model's ({what}): a draft must share \
             the model's token ids"
        )))
    };
    let (size, draft_size) = (model.vocab_size(), draft.vocab_size());
    if size != draft_size {
        return differ(format!("{draft_size} tokens against {size}"));
    }
    for id in (0..size as u32).step_by(61) {
        let text = model.decode(&[id], SpecialTokens::Show)?;
        let draft_text = draft.decode(&[id], SpecialTokens::Show)?;
        if text != draft_text {
            return differ(format!("token {id} is {draft_text:?} against {text:?}"));
        }
    }
    let sample = "Speculative decoding: a draft guesses, the model checks. 12345 €";
    if model.encode(sample)? != draft.encode(sample)? {
        return differ(format!("{sample:?} is split into other tokens"));
    }
    Ok(())
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

/// Whether a guess stands, and the token at its position: greedy, whether it is the argmax;
/// sampled, kept with probability `min(1, p(guess) / q(guess))` and otherwise replaced by a
/// draw from `max(0, p - q)`, where `q` is the drafter's `proposal` (one-hot at the guess when
/// `None`).
pub(crate) fn check(
    sampler: &mut Sampler,
    logits: &[f32],
    context: &[u32],
    guess: u32,
    proposal: Option<&[(u32, f64)]>,
) -> (bool, u32) {
    if sampler.config().is_greedy() {
        let choice = sampler.sample(logits, context);
        return (choice == guess, choice);
    }
    let p = sampler.distribution(logits, context);
    let q: HashMap<u32, f64> = match proposal {
        Some(q) => q.iter().copied().collect(),
        None => HashMap::from([(guess, 1.0)]),
    };
    let p_guess = p.iter().find(|(id, _)| *id == guess).map_or(0.0, |t| t.1);
    let q_guess = q.get(&guess).copied().unwrap_or(0.0);
    if q_guess > 0.0 && sampler.uniform() * q_guess < p_guess {
        return (true, guess);
    }
    let residual: Distribution = p
        .iter()
        .map(|&(id, prob)| (id, prob - q.get(&id).copied().unwrap_or(0.0)))
        .filter(|&(_, r)| r > 0.0)
        .collect();
    // An empty residual means `p == q` up to rounding, where a rejection has probability 0.
    match residual.is_empty() {
        true => (false, sampler.draw(&p)),
        false => (false, sampler.draw(&residual)),
    }
}

/// How many guesses each step asks for.
///
/// The length grows as transformers' assisted generation's does, two more after a pass that
/// kept every guess (up to the most), and shrinks by one after a pass that kept some. It starts
/// at two, not at the most: on a CPU a pass of `1 + k` positions costs up to `1 + k` plain
/// steps where the products are compute-bound (f16 or k-quant weights), so a long first guess
/// that fails costs several steps, while a copied run reaches the most within a few passes. A
/// pass whose guesses were all rejected is pure loss: the length drops to one, and the drafter
/// pauses for 1, then 2, 4, up to 16 plain steps while such passes repeat, resuming at once
/// after any kept guess (the backoff that keeps open-ended text near plain speed while copied
/// runs are still found within a few tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    most: usize,
    length: usize,
    /// Plain steps left before the next guesses.
    pause: usize,
    /// The pause after the next pass that keeps nothing (0: none yet).
    backoff: usize,
}

impl Schedule {
    /// Longest pause, in plain steps.
    const MAX_PAUSE: usize = 16;

    /// Guesses of the first pass (fewer when the most is).
    const FIRST: usize = 2;

    /// A schedule of at most `most` guesses a step.
    pub fn new(most: usize) -> Self {
        Self {
            most,
            length: most.min(Self::FIRST),
            pause: 0,
            backoff: 0,
        }
    }

    /// Guesses to ask for this step (0 while paused); counts the step.
    ///
    /// ```
    /// use kv_generate::speculative::Schedule;
    ///
    /// let mut schedule = Schedule::new(8);
    /// assert_eq!(schedule.guesses(), 2);
    /// schedule.update(2, 2); // all kept: two more
    /// assert_eq!(schedule.guesses(), 4);
    /// schedule.update(4, 0); // nothing kept: one guess next, after a pause of one step
    /// assert_eq!((schedule.guesses(), schedule.guesses()), (0, 1));
    /// schedule.update(1, 0); // nothing kept again: a pause of two
    /// assert_eq!([schedule.guesses(), schedule.guesses(), schedule.guesses()], [0, 0, 1]);
    /// schedule.update(1, 1); // kept: no pause, two more guesses
    /// assert_eq!(schedule.guesses(), 3);
    /// ```
    pub fn guesses(&mut self) -> usize {
        if self.pause > 0 {
            self.pause -= 1;
            return 0;
        }
        self.length
    }

    /// Takes a pass's outcome: `drafted` guesses, of which the first `accepted` were kept.
    pub fn update(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.length = match accepted {
            _ if accepted == drafted => (self.length + 2).min(self.most),
            0 => 1,
            _ => self.length.saturating_sub(1).max(1),
        };
        if accepted == 0 {
            self.backoff = (self.backoff * 2).clamp(1, Self::MAX_PAUSE);
            self.pause = self.backoff;
        } else {
            self.backoff = 0;
        }
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
    /// The number of guesses a step asks for adapts ([`Schedule`]): two more after a pass that
    /// kept every guess, one fewer after a pass that rejected some, and after passes that kept
    /// none, a pause of plain steps that doubles with each such pass, so a text that does not
    /// repeat itself costs little more than plain decoding.
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
    /// Every cache kind can drop a pass's rejected guesses: dense kinds move their end back,
    /// a paged cache frees its tail blocks, and rings (sliding and sink caches, a model's
    /// sliding-window layers) keep a log of the positions the guesses evicted
    /// ([`kv_core::KvCache::set_rewind`]) and write them back.
    ///
    /// # Errors
    /// An empty prompt, sampling settings out of range, ids outside the vocabulary, positions
    /// past the model's, or a drafter's failure.
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
        // Rings (sliding layers, sliding and sink caches) keep what a pass's guesses evict.
        cache.set_rewind(config.draft_tokens);
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
        let mut schedule = Schedule::new(config.draft_tokens);
        loop {
            tokens.push(next);
            context.push(next);
            let room = config.max_new_tokens - tokens.len();
            if room == 0 || config.eos.contains(&next) {
                break;
            }
            // A pass keeps its accepted guesses and one token of its own: at most `room`.
            let Draft {
                tokens: draft,
                proposals,
            } = match schedule.guesses() {
                0 => Draft::default(),
                guesses => drafter.draft(&context, guesses.min(room - 1))?,
            };
            let held = cache.seq_len();
            let input: Vec<u32> = std::iter::once(next).chain(draft.iter().copied()).collect();
            let logits = model.forward(&[input], None, Some(&mut cache), Logits::All)?;
            // Row `i` scores the position after `input[..=i]`.
            let rows = host_positions(logits);
            let mut accepted = 0;
            let mut own = None;
            for (i, (guess, row)) in draft.iter().zip(&rows).enumerate() {
                let proposal = proposals.as_ref().map(|q| q[i].as_slice());
                let (kept, token) = check(&mut sampler, row, &context, *guess, proposal);
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
            schedule.update(draft.len(), accepted);
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

    /// Five logits and a sampler that keeps four of them (temperature 0.9, top-k 4).
    const LOGITS: [f32; 5] = [0.3, -1.0, 1.2, 0.0, -0.4];

    fn top4(seed: u64) -> SamplingConfig {
        SamplingConfig {
            temperature: Some(0.9),
            top_k: Some(4),
            seed,
            ..SamplingConfig::greedy()
        }
    }

    /// Pearson's chi-square of `counts` over `draws` against `p`.
    fn chi_square(p: &Distribution, counts: &[usize], draws: usize) -> f64 {
        p.iter()
            .map(|&(id, prob)| {
                let expected = prob * draws as f64;
                (counts[id as usize] as f64 - expected).powi(2) / expected
            })
            .sum()
    }

    /// The token at a guessed position has the model's distribution whatever the guess: over
    /// 20,000 seeded draws among the four tokens top-k leaves of five, a chi-square test
    /// against `p` (3 degrees of freedom; 16.27 is exceeded by chance once in a thousand runs,
    /// and the seeds are fixed), for a likely guess, an unlikely one and one the filter removed.
    #[test]
    fn a_checked_guess_leaves_the_models_distribution() {
        let logits = LOGITS;
        let config = top4(11);
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
                let (was_kept, token) = check(&mut sampler, &logits, &[], guess, None);
                counts[token as usize] += 1;
                kept += usize::from(was_kept);
                assert_eq!(was_kept, token == guess);
            }
            let chi2 = chi_square(&p, &counts, draws);
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

    /// A guess drawn from a draft distribution `q` and checked against `p` leaves `p`: 20,000
    /// seeded rounds, each drawing the guess from `q` with the drafter's own generator, with `q`
    /// unlike `p` (mass on a token `p` filters out, too little on `p`'s likeliest); the same
    /// chi-square bound as above (3 degrees of freedom, one false alarm in a thousand runs).
    #[test]
    fn a_guess_drawn_from_a_draft_distribution_leaves_the_models_distribution() {
        let logits = LOGITS;
        let config = top4(5);
        let p = Sampler::new(config.clone())
            .unwrap()
            .distribution(&logits, &[]);
        let q: Distribution = vec![(0, 0.4), (1, 0.2), (2, 0.1), (3, 0.25), (4, 0.05)];
        let mut drafter = Sampler::new(SamplingConfig {
            seed: 99,
            ..config.clone()
        })
        .unwrap();
        let mut sampler = Sampler::new(config).unwrap();
        let draws = 20_000;
        let mut counts = [0usize; 5];
        let mut kept = 0;
        for _ in 0..draws {
            let guess = drafter.draw(&q);
            let (was_kept, token) = check(&mut sampler, &logits, &[], guess, Some(&q));
            counts[token as usize] += 1;
            kept += usize::from(was_kept);
        }
        let chi2 = chi_square(&p, &counts, draws);
        assert!(chi2 < 16.27, "chi-square {chi2}, counts {counts:?}");
        assert_eq!(counts[1], 0, "token 1 is filtered out");
        // Acceptance is the overlap of the two distributions, sum min(p, q).
        let overlap: f64 = p
            .iter()
            .map(|&(id, prob)| prob.min(q.iter().find(|t| t.0 == id).unwrap().1))
            .sum();
        assert!((kept as f64 / draws as f64 - overlap).abs() < 0.02);
    }

    #[test]
    fn prompt_lookup_prefers_the_longest_suffix_and_the_latest_occurrence() {
        let lookup = PromptLookup {
            min_ngram: 1,
            max_ngram: 2,
        };
        // "5" occurs twice before (followed by 6, then by 9); "4 5" once, followed by 6.
        assert_eq!(lookup.lookup(&[4, 5, 6, 5, 9, 4, 5], 2), [6, 5]);
        // Only "5" matches: its latest earlier occurrence is followed by 9.
        assert_eq!(lookup.lookup(&[4, 5, 6, 5, 9, 3, 5], 2), [9, 3]);
        // No more than what follows the match, nor than asked.
        assert_eq!(lookup.lookup(&[1, 2, 1], 5), [2, 1]);
        assert_eq!(lookup.lookup(&[1, 2, 1], 0), Vec::<u32>::new());
        assert_eq!(lookup.lookup(&[], 3), Vec::<u32>::new());
    }
}
