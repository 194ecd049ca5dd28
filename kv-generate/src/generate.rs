//! The generation loop: prefill the prompts, then one token per step per row, through a cache
//! or by re-feeding the whole sequence, until each row stops.

use std::time::{Duration, Instant};

use burn::tensor::{backend::Backend, Tensor};
use kv_core::{AttentionMask, CacheConfig, ModelCache};
use kv_model::{Logits, Tokenizer, Transformer};

use crate::error::{GenerateError, Result};
use crate::sampling::{Sampler, SamplingConfig};
use crate::stream::{StopStrings, TextStream};

/// Where keys and values live between steps.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheChoice {
    /// No cache: every step re-feeds the whole sequence (the seed article's `GreedySampler`).
    None,
    /// A kv-core cache of this kind.
    Cache(CacheConfig),
}

impl CacheChoice {
    /// A short name: `none`, or the kind's ([`kv_core::CacheKind::name`]).
    pub fn name(&self) -> &'static str {
        match self {
            CacheChoice::None => "none",
            CacheChoice::Cache(config) => config.kind().name(),
        }
    }
}

/// Which tokens end a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EosPolicy {
    /// The model's EOS ids (`generation_config.json`, or the GGUF's).
    Model,
    /// These ids instead.
    Ids(Vec<u32>),
    /// None: generate until another rule stops the row.
    Ignore,
}

/// What to generate and how.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate per row.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingConfig,
    /// Which tokens end a row.
    pub eos: EosPolicy,
    /// Texts that end a row when they appear in its output (needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// The cache.
    pub cache: CacheChoice,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: SamplingConfig::greedy(),
            eos: EosPolicy::Model,
            stop_strings: Vec::new(),
            cache: CacheChoice::Cache(CacheConfig::Dynamic { capacity: 256 }),
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It generated `max_new_tokens`.
    Length,
    /// It generated an EOS token (kept as the last id).
    Eos,
    /// Its text reached a stop string (the text is cut before it).
    StopString,
}

impl FinishReason {
    /// `length`, `eos` or `stop`.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::StopString => "stop",
        }
    }
}

/// One row's result.
#[derive(Debug, Clone, PartialEq)]
pub struct RowOutput {
    /// The prompt's ids (for a continuation, the shared prefix and the row's own tokens).
    pub prompt_ids: Vec<u32>,
    /// The generated ids (an EOS that ended the row is included).
    pub generated_ids: Vec<u32>,
    /// The generated text (special tokens skipped), when there is a tokenizer.
    pub text: Option<String>,
    /// Why the row stopped.
    pub finish_reason: FinishReason,
}

/// Where the time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Timings {
    /// The prompt pass (all rows at once).
    pub prefill: Duration,
    /// Every later step.
    pub decode: Duration,
    /// Tokens generated over all rows.
    pub generated: usize,
    /// Time of each decode step (one forward of one new token per row, with sampling), in
    /// order: step `i` feeds the token at position `prompt + i`.
    pub step_latencies: Vec<Duration>,
}

impl Timings {
    /// Generated tokens per second of decode time (the first token, which comes out of the
    /// prefill, is not counted).
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.decode.as_secs_f64();
        let decoded = self.generated.saturating_sub(1);
        if secs > 0.0 {
            decoded as f64 / secs
        } else {
            0.0
        }
    }
}

/// The result of a generation call.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// One per prompt, in order.
    pub rows: Vec<RowOutput>,
    /// Time spent.
    pub timings: Timings,
    /// Cache bytes when the last row stopped (0 without a cache).
    pub cache_bytes: usize,
    /// The cache kind's name.
    pub cache_kind: &'static str,
}

/// A prompt run through the model once, whose cache can be continued several ways.
///
/// Cloning a [`PromptCache`] does not copy tensors (burn tensors share storage); a cache only
/// copies a buffer when it must write into one that is shared, so continuing a prefix costs
/// one copy of the prefix per continuation at most, and nothing for the prefix's compute.
#[derive(Debug, Clone)]
pub struct PromptCache<B: Backend> {
    cache: ModelCache<B>,
    prompt: Vec<u32>,
    last_logits: Vec<f32>,
}

impl<B: Backend> PromptCache<B> {
    /// The prefix's ids.
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// The cache holding the prefix.
    pub fn cache(&self) -> &ModelCache<B> {
        &self.cache
    }
}

/// Text as it is generated: `(row, text)`.
pub type OnText<'a> = &'a mut dyn FnMut(usize, &str);

/// Generates with one model and, optionally, its tokenizer (for text, streaming and stop
/// strings).
///
/// ```
/// use burn_ndarray::NdArray;
/// use kv_generate::{EosPolicy, GenerationConfig, Generator};
/// use kv_model::{ModelConfig, Transformer};
///
/// let json = serde_json::json!({
///     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
///     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
/// });
/// let config = ModelConfig::from_hf_json(&json, "example").unwrap();
/// let model = Transformer::<NdArray>::random(&config, 1, &Default::default()).unwrap();
/// let generator = Generator::new(&model, None);
/// let settings = GenerationConfig { max_new_tokens: 5, eos: EosPolicy::Ignore, ..Default::default() };
/// let out = generator.generate(&[vec![1, 2, 3]], &settings, &mut |_, _| {}).unwrap();
/// assert_eq!(out.rows[0].generated_ids.len(), 5);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Generator<'a, B: Backend> {
    pub(crate) model: &'a Transformer<B>,
    pub(crate) tokenizer: Option<&'a Tokenizer>,
}

/// One sequence being generated: what it was asked, what it has produced, and its text so
/// far (shared by [`Generator`] and the continuous-batching engine).
pub(crate) struct Row {
    /// Index of the row in the caller's list.
    pub(crate) index: usize,
    pub(crate) prompt: Vec<u32>,
    pub(crate) generated: Vec<u32>,
    pub(crate) sampler: Sampler,
    pub(crate) stream: TextStream,
    pub(crate) text: String,
    /// Bytes of `text` already handed to the caller.
    pub(crate) streamed: usize,
    pub(crate) finish: Option<FinishReason>,
}

impl Row {
    /// A row that has generated nothing yet.
    pub(crate) fn new(index: usize, prompt: Vec<u32>, sampling: SamplingConfig) -> Result<Self> {
        Ok(Self {
            index,
            prompt,
            generated: Vec::new(),
            sampler: Sampler::new(sampling)?,
            stream: TextStream::new(),
            text: String::new(),
            streamed: 0,
            finish: None,
        })
    }

    /// Samples the next token from `logits`, appends it, and decides whether the row stops
    /// (an `eos` id, or `max_new_tokens` reached); its text grows as it becomes valid UTF-8.
    /// Returns the token.
    pub(crate) fn advance(
        &mut self,
        logits: &[f32],
        eos: &[u32],
        max_new_tokens: usize,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<u32> {
        let next = self.sampler.sample(logits, &self.context());
        self.push(next, eos, max_new_tokens, tokenizer)?;
        Ok(next)
    }

    /// What the sampler's penalties read: prompt and output, assembled only when it has
    /// penalties (empty otherwise).
    pub(crate) fn context(&self) -> Vec<u32> {
        match self.sampler.uses_context() {
            true => [self.prompt.as_slice(), self.generated.as_slice()].concat(),
            false => Vec::new(),
        }
    }

    /// Appends `next`, chosen elsewhere (a verified guess), and decides whether the row stops,
    /// as [`Row::advance`] does.
    pub(crate) fn push(
        &mut self,
        next: u32,
        eos: &[u32],
        max_new_tokens: usize,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<()> {
        self.generated.push(next);
        if eos.contains(&next) {
            self.finish = Some(FinishReason::Eos);
        } else if let Some(tokenizer) = tokenizer {
            if let Some(text) = self.stream.push(tokenizer, next)? {
                self.text.push_str(&text);
            }
        }
        if self.finish.is_none() && self.generated.len() >= max_new_tokens {
            self.finish = Some(FinishReason::Length);
        }
        if self.finish.is_some() {
            if let Some(tokenizer) = tokenizer {
                if let Some(text) = self.stream.flush(tokenizer)? {
                    self.text.push_str(&text);
                }
            }
        }
        Ok(())
    }

    /// Checks the text for stop strings (a stop ends the row and cuts the text before it) and
    /// returns what can be shown that was not before: everything once the row is finished,
    /// and otherwise all but a tail that could still become a stop string.
    pub(crate) fn publish(&mut self, stops: &StopStrings) -> &str {
        if let Some(at) = stops.find(&self.text) {
            self.text.truncate(at);
            self.finish = Some(FinishReason::StopString);
        }
        let end = if self.finish.is_some() {
            self.text.len()
        } else {
            self.text.len() - stops.pending_len(&self.text)
        };
        let start = self.streamed.min(end);
        self.streamed = self.streamed.max(end);
        &self.text[start..end]
    }
}

/// The state of a batch between steps.
struct Batch<B: Backend> {
    rows: Vec<Row>,
    /// `None` runs without a cache.
    cache: Option<ModelCache<B>>,
    /// Padding of every position so far, `None` when no row is padded.
    mask: Option<AttentionMask>,
    /// Padded tokens so far, per row: needed only without a cache.
    sequences: Vec<Vec<u32>>,
}

impl<'a, B: Backend> Generator<'a, B> {
    /// A generator over `model`, with `tokenizer` for text.
    pub fn new(model: &'a Transformer<B>, tokenizer: Option<&'a Tokenizer>) -> Self {
        Self { model, tokenizer }
    }

    /// Generates a continuation of each prompt, all rows in one batch (left-padded to the
    /// longest, with positions counted per row, so each row gets what it would get alone).
    /// `on_text` receives text as it becomes valid UTF-8.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
        on_text: OnText<'_>,
    ) -> Result<Generation> {
        self.check(prompts, config)?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        self.check_static_fits(longest, prompts.len(), config)?;
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let padded = lengths.iter().any(|&l| l != longest);
        let mask = padded
            .then(|| AttentionMask::left_padded(&lengths, longest))
            .transpose()?;
        let pad = self.pad_token();
        let sequences: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| [vec![pad; longest - p.len()], p.clone()].concat())
            .collect();
        let cache = match &config.cache {
            CacheChoice::None => None,
            CacheChoice::Cache(kind) => Some(self.model.new_cache(kind)?),
        };
        let batch = Batch {
            rows: self.rows(prompts, config)?,
            cache,
            mask,
            sequences: sequences.clone(),
        };
        self.run(batch, sequences, config, on_text)
    }

    /// Runs `prompt` once through a new `cache` and keeps the result for
    /// [`Generator::continue_from`].
    pub fn prefill(&self, prompt: &[u32], cache: &CacheConfig) -> Result<PromptCache<B>> {
        if prompt.is_empty() {
            return Err(GenerateError::InvalidRequest("empty prompt".into()));
        }
        let mut model_cache = self.model.new_cache(cache)?;
        let logits = self.model.forward(
            &[prompt.to_vec()],
            None,
            Some(&mut model_cache),
            Logits::Last,
        )?;
        Ok(PromptCache {
            cache: model_cache,
            prompt: prompt.to_vec(),
            last_logits: host_rows(logits).remove(0),
        })
    }

    /// Continues a prefilled prefix several ways at once: row `i` is the prefix followed by
    /// `continuations[i]` (which may be empty) and what the model generates after it. The
    /// prefix is not recomputed: its cache is repeated across the rows.
    pub fn continue_from(
        &self,
        prefix: &PromptCache<B>,
        continuations: &[Vec<u32>],
        config: &GenerationConfig,
        on_text: OnText<'_>,
    ) -> Result<Generation> {
        let prompts: Vec<Vec<u32>> = continuations
            .iter()
            .map(|c| [prefix.prompt.clone(), c.clone()].concat())
            .collect();
        self.check(&prompts, config)?;
        let rows = self.rows(&prompts, config)?;
        let mut cache = prefix.cache.clone();
        cache.repeat_batch(continuations.len())?;
        let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
        let past = prefix.prompt.len();
        if longest == 0 {
            // Every row continues right after the prefix: its logits are already known.
            let batch = Batch {
                rows,
                cache: Some(cache),
                mask: None,
                sequences: Vec::new(),
            };
            let logits = vec![prefix.last_logits.clone(); continuations.len()];
            return self.decode(batch, logits, Duration::ZERO, config, on_text);
        }
        // Padding goes between the prefix and each row's own tokens; position ids skip it.
        let mask_rows: Vec<Vec<bool>> = continuations
            .iter()
            .map(|c| {
                let mut row = vec![true; past];
                row.extend((0..longest).map(|i| i >= longest - c.len()));
                row
            })
            .collect();
        let mask = AttentionMask::from_rows(mask_rows)?;
        let pad = self.pad_token();
        let suffixes: Vec<Vec<u32>> = continuations
            .iter()
            .map(|c| [vec![pad; longest - c.len()], c.clone()].concat())
            .collect();
        let padded = continuations.iter().any(|c| c.len() != longest);
        let batch = Batch {
            rows,
            cache: Some(cache),
            mask: padded.then_some(mask),
            sequences: Vec::new(),
        };
        self.run(batch, suffixes, config, on_text)
    }

    /// Refuses `rows` rows of up to `longest` prompt tokens that a static cache cannot hold
    /// with all their new tokens.
    pub(crate) fn check_static_fits(
        &self,
        longest: usize,
        rows: usize,
        config: &GenerationConfig,
    ) -> Result<()> {
        if let CacheChoice::Cache(CacheConfig::Static { max_batch, max_len }) = config.cache {
            if longest + config.max_new_tokens.saturating_sub(1) > max_len {
                return Err(GenerateError::CacheTooSmall {
                    prompt: longest,
                    new: config.max_new_tokens,
                    capacity: max_len,
                });
            }
            if rows > max_batch {
                return Err(GenerateError::InvalidRequest(format!(
                    "{rows} rows do not fit a static cache of {max_batch} rows"
                )));
            }
        }
        Ok(())
    }

    /// The ids that end a row under `policy`.
    pub(crate) fn eos_ids(&self, policy: &EosPolicy) -> Vec<u32> {
        match policy {
            EosPolicy::Model => self.model.config().eos_token_ids.clone(),
            EosPolicy::Ids(ids) => ids.clone(),
            EosPolicy::Ignore => Vec::new(),
        }
    }

    pub(crate) fn check(&self, prompts: &[Vec<u32>], config: &GenerationConfig) -> Result<()> {
        config.sampling.validate()?;
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(GenerateError::InvalidRequest(
                "every prompt needs at least one token".into(),
            ));
        }
        if config.max_new_tokens == 0 {
            return Err(GenerateError::InvalidRequest(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        if !config.stop_strings.is_empty() && self.tokenizer.is_none() {
            return Err(GenerateError::InvalidRequest(
                "stop strings need a tokenizer".into(),
            ));
        }
        // Every cache but a sink that re-rotates its keys (and no cache at all) gives the model
        // text positions, which must stay below its limit; the last token is never fed back.
        let re_rotates =
            matches!(&config.cache, CacheChoice::Cache(kind) if kind.bounds_positions());
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let max = self.model.config().max_positions;
        if !re_rotates && longest + config.max_new_tokens - 1 > max {
            return Err(GenerateError::PastModelContext {
                prompt: longest,
                new: config.max_new_tokens,
                max,
            });
        }
        for (row, prompt) in prompts.iter().enumerate() {
            self.model.config().check_token_ids(row, prompt)?;
        }
        Ok(())
    }

    fn rows(&self, prompts: &[Vec<u32>], config: &GenerationConfig) -> Result<Vec<Row>> {
        prompts
            .iter()
            .enumerate()
            .map(|(index, prompt)| {
                let sampling = SamplingConfig {
                    seed: config.sampling.seed.wrapping_add(index as u64),
                    ..config.sampling.clone()
                };
                Row::new(index, prompt.clone(), sampling)
            })
            .collect()
    }

    /// The id that fills padding positions (never seen by attention).
    fn pad_token(&self) -> u32 {
        self.model
            .config()
            .eos_token_ids
            .first()
            .copied()
            .unwrap_or(0)
    }

    /// Prefill `input` (the padded prompts, or suffixes after a cached prefix), then decode.
    fn run(
        &self,
        mut batch: Batch<B>,
        input: Vec<Vec<u32>>,
        config: &GenerationConfig,
        on_text: OnText<'_>,
    ) -> Result<Generation> {
        let start = Instant::now();
        let logits = self.model.forward(
            &input,
            batch.mask.as_ref(),
            batch.cache.as_mut(),
            Logits::Last,
        )?;
        let logits = host_rows(logits);
        self.decode(batch, logits, start.elapsed(), config, on_text)
    }

    /// From the prompt's logits on: sample, stop rows, feed the new tokens.
    fn decode(
        &self,
        mut batch: Batch<B>,
        mut logits: Vec<Vec<f32>>,
        prefill: Duration,
        config: &GenerationConfig,
        on_text: OnText<'_>,
    ) -> Result<Generation> {
        let eos = self.eos_ids(&config.eos);
        let stops = StopStrings::new(config.stop_strings.clone());
        let decode_start = Instant::now();
        let mut finished: Vec<Row> = Vec::new();
        let mut step_latencies = Vec::new();
        let mut step_start = Instant::now();
        let mut cache_bytes = 0;
        loop {
            // Choose each active row's next token and decide who stops.
            for (row, row_logits) in batch.rows.iter_mut().zip(&logits) {
                row.advance(row_logits, &eos, config.max_new_tokens, self.tokenizer)?;
                let index = row.index;
                let text = row.publish(&stops);
                if !text.is_empty() {
                    on_text(index, text);
                }
            }
            // Finished rows leave the batch, so they cost nothing more.
            let keep: Vec<usize> = (0..batch.rows.len())
                .filter(|&i| batch.rows[i].finish.is_none())
                .collect();
            if keep.len() < batch.rows.len() {
                if let Some(cache) = &batch.cache {
                    cache_bytes = cache_bytes.max(cache.memory_bytes());
                }
                let rows = std::mem::take(&mut batch.rows);
                let mut kept_rows = Vec::with_capacity(keep.len());
                for (i, row) in rows.into_iter().enumerate() {
                    if keep.contains(&i) {
                        kept_rows.push(row);
                    } else {
                        finished.push(row);
                    }
                }
                batch.rows = kept_rows;
                if keep.is_empty() {
                    break;
                }
                if let Some(cache) = &mut batch.cache {
                    cache.select_batch(&keep)?;
                }
                batch.mask = batch.mask.map(|m| m.select_rows(&keep)).transpose()?;
                if !batch.sequences.is_empty() {
                    batch.sequences = keep.iter().map(|&i| batch.sequences[i].clone()).collect();
                }
            }
            // Feed the new tokens.
            let new: Vec<u32> = batch
                .rows
                .iter()
                .map(|r| *r.generated.last().unwrap_or(&0))
                .collect();
            if let Some(mask) = &mut batch.mask {
                mask.extend(1);
            }
            let output = match &mut batch.cache {
                Some(cache) => {
                    let input: Vec<Vec<u32>> = new.iter().map(|&id| vec![id]).collect();
                    self.model
                        .forward(&input, batch.mask.as_ref(), Some(cache), Logits::Last)?
                }
                None => {
                    for (sequence, &id) in batch.sequences.iter_mut().zip(&new) {
                        sequence.push(id);
                    }
                    self.model.forward_uncached(
                        &batch.sequences,
                        batch.mask.as_ref(),
                        Logits::Last,
                    )?
                }
            };
            logits = host_rows(output);
            step_latencies.push(step_start.elapsed());
            step_start = Instant::now();
        }
        finished.sort_by_key(|r| r.index);
        let generated = finished.iter().map(|r| r.generated.len()).sum();
        Ok(Generation {
            rows: finished
                .into_iter()
                .map(|r| RowOutput {
                    prompt_ids: r.prompt,
                    generated_ids: r.generated,
                    text: self.tokenizer.map(|_| r.text),
                    finish_reason: r.finish.unwrap_or(FinishReason::Length),
                })
                .collect(),
            timings: Timings {
                prefill,
                decode: decode_start.elapsed(),
                generated,
                step_latencies,
            },
            cache_bytes,
            cache_kind: config.cache.name(),
        })
    }
}

/// `[batch, seq, vocab]` logits as one host row per batch row: its last position's.
pub(crate) fn host_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let seq = logits.dims()[1].max(1);
    host_positions(logits)
        .into_iter()
        .skip(seq - 1)
        .step_by(seq)
        .collect()
}

/// `[batch, seq, vocab]` logits as one host row per position, batch row by batch row.
pub(crate) fn host_positions<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let vocab = logits.dims()[2].max(1);
    let data = logits
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("logits converted to f32");
    data.chunks(vocab).map(<[f32]>::to_vec).collect()
}
