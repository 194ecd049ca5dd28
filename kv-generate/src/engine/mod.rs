//! [`Engine`]: many requests through one model at once, batched continuously.
//!
//! # Where the design comes from
//! Orca (OSDI '22) scheduled per iteration instead of per batch: requests join and leave the
//! running set at every step, so a short request never waits for a long one. vLLM
//! (SOSP '23) stored every sequence's keys and values in fixed-size blocks of one pool, with
//! a block table per sequence, so that memory is allocated as sequences grow and shared where
//! prompts agree (automatic prefix caching); its later scheduler cuts long prompts into chunks
//! that share a step with the decoding sequences (chunked prefill), so a long prompt does not
//! stall everyone else's next token. This engine follows vLLM's scheduler:
//!
//! - **One step, one forward pass.** Each step takes the running sequences oldest first:
//!   a decoding sequence feeds its one new token, a sequence still in its prompt feeds a chunk,
//!   within a budget of tokens per step ([`EngineConfig::token_budget`]); then waiting requests
//!   are admitted, first come first served, while the budget and
//!   [`EngineConfig::max_running`] allow. All of it runs as one ragged batch
//!   ([`Transformer::forward_ragged`]): the weights are read once per step, not once per
//!   sequence, which on a memory-bound decode is where the throughput comes from.
//! - **The prefix cache.** A request starts from the longest run of full blocks its prompt
//!   shares with blocks already in the pool (kv-core's [`PagedStore`]), and computes only
//!   the rest; the prompt's last token is always computed, since its logits give the first
//!   new token.
//! - **Preemption.** When a step cannot reserve blocks for a running sequence, the youngest
//!   running request gives its blocks back and returns to the front of the queue; when it is
//!   admitted again it recomputes its prompt and the tokens it had generated, mostly from the
//!   prefix cache (its full blocks stay cached after it is preempted). Its sampler's state is
//!   kept, so its output is what it would have been. A request that could never fit the pool
//!   alone is refused when it is added.
//!
//! # What it costs
//! Attention reads each sequence's keys through its block table: a plain slice when its
//! blocks are consecutive in the pool, otherwise a gather (a copy of its keys and values per
//! layer and step). Preemption recomputes what the prefix cache no longer holds. Requests in a
//! batch share products whose kernels may order a row's sums differently from a single-row
//! product's, so tokens equal a solo run's exactly when the kernels are row-independent (as
//! kv-kernels' are) and to float rounding otherwise.

use std::collections::VecDeque;

use burn::tensor::backend::Backend;
use kv_core::{BlockOrder, CacheError, PagedStore, SequenceId};
use kv_model::{BatchPiece, Logits, ModelError, Tokenizer, Transformer};

use crate::error::{GenerateError, Result};
use crate::generate::{EosPolicy, FinishReason, Row};
use crate::sampling::{SamplingConfig, TokenLogprobs};
use crate::stream::StopStrings;

/// How large the engine's block pool is, set once when the engine starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSize {
    /// This many blocks.
    Blocks(usize),
    /// Room for this many positions (rounded up to whole blocks).
    Tokens(usize),
    /// At most this many bytes of keys and values.
    Bytes(usize),
}

/// How the engine schedules and stores.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// The pool of key/value blocks shared by every request.
    pub pool: PoolSize,
    /// Positions per block (vLLM's default is 16).
    pub block_size: usize,
    /// Most requests running at once (admitted, holding blocks).
    pub max_running: usize,
    /// Most tokens one step feeds: one per decoding sequence, the rest for prompt chunks.
    pub token_budget: usize,
    /// The order blocks are handed out in ([`BlockOrder::Shuffled`] tests that nothing relies
    /// on consecutive blocks).
    pub block_order: BlockOrder,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            pool: PoolSize::Tokens(32 * 1024),
            block_size: kv_core::DEFAULT_BLOCK_SIZE,
            max_running: 16,
            token_budget: 256,
            block_order: BlockOrder::Ascending,
        }
    }
}

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

/// Counters since the engine started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Forward passes run.
    pub steps: usize,
    /// Tokens fed through the model (prompt chunks and decode tokens).
    pub computed_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Positions looked up in the prefix cache: every token a request holds when it is
    /// admitted (re-admissions after preemption included), so that `prefix_hit_tokens` is
    /// always a share of it.
    pub prefix_query_tokens: usize,
    /// Prompt positions taken from the prefix cache instead of computed (re-admissions after
    /// preemption included).
    pub prefix_hit_tokens: usize,
    /// Times a running request gave its blocks back to make room.
    pub preemptions: usize,
}

/// The pool's size, as an operator wants to read it at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSummary {
    /// Blocks in the pool.
    pub blocks: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Bytes of keys and values the pool holds.
    pub bytes: usize,
    /// The model's longest sequence.
    pub max_positions: usize,
    /// Sequences of that length the pool holds at once.
    pub full_length_sequences: usize,
}

impl std::fmt::Display for PoolSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KV pool: {} blocks of {} positions ({} positions, {:.1} MiB); {} sequences of the \
             model's full {} positions fit at once",
            self.blocks,
            self.block_size,
            self.blocks * self.block_size,
            self.bytes as f64 / (1024.0 * 1024.0),
            self.full_length_sequences,
            self.max_positions
        )
    }
}

/// A prompt's cached keys and values, every layer, copied out of the pool: what a saved prompt
/// cache holds (llama.cpp's slot save), to be put back with [`Engine::restore_prefix`] in this
/// process or another one running the same model.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedPrefix {
    /// Token ids of the saved positions: whole blocks, from the prompt's start.
    pub tokens: Vec<u32>,
    /// Positions per block of the pool it came from.
    pub block_size: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Per layer, keys then values, each `[kv_heads, tokens, head_dim]` f32, row-major.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

/// A request the engine holds, waiting or running.
struct Active {
    id: RequestId,
    row: Row,
    max_new_tokens: usize,
    eos: Vec<u32>,
    stops: StopStrings,
    top_logprobs: Option<usize>,
    /// Its sequence in the store while it runs.
    sequence: Option<SequenceId>,
    /// Positions whose keys and values are in the store (computed or cached).
    computed: usize,
    /// Prompt tokens the prefix cache held at its first admission.
    cached_prompt_tokens: Option<usize>,
}

impl Active {
    /// Prompt and generated tokens: every position the sequence will hold before its next
    /// token is sampled.
    fn tokens(&self) -> Vec<u32> {
        [self.row.prompt.as_slice(), self.row.generated.as_slice()].concat()
    }

    /// Positions not yet in the store.
    fn pending(&self) -> usize {
        self.row.prompt.len() + self.row.generated.len() - self.computed
    }
}

/// Requests through one model at once, batched continuously over a paged KV cache with
/// prefix caching (see the module docs).
///
/// ```
/// use burn_ndarray::NdArray;
/// use kv_generate::engine::{Engine, EngineConfig, EngineEvent, PoolSize, Request};
/// use kv_generate::EosPolicy;
/// use kv_model::{ModelConfig, Transformer};
///
/// # let json = serde_json::json!({
/// #     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
/// #     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
/// # });
/// # let config = ModelConfig::from_hf_json(&json, "doc").unwrap();
/// let model = Transformer::<NdArray>::random(&config, 1, &Default::default()).unwrap();
/// let config = EngineConfig { pool: PoolSize::Tokens(256), block_size: 4, ..Default::default() };
/// let mut engine = Engine::new(&model, None, config).unwrap();
/// let request = Request { eos: EosPolicy::Ignore, ..Request::greedy(vec![1, 2, 3], 5) };
/// let a = engine.add_request(request.clone()).unwrap();
/// engine.step().unwrap(); // `a` computes its prompt and samples its first token
/// let b = engine.add_request(request).unwrap(); // joins the running batch
/// let mut tokens = 0;
/// while engine.has_work() {
///     for event in engine.step().unwrap() {
///         if let EngineEvent::Token { .. } = event {
///             tokens += 1;
///         }
///     }
/// }
/// assert_eq!(tokens, 4 + 5);
/// // Every block is back in the pool.
/// assert_eq!(engine.store().pool().free_blocks(), engine.store().pool().num_blocks());
/// # let _ = (a, b);
/// ```
pub struct Engine<'a, B: Backend> {
    model: &'a Transformer<B>,
    tokenizer: Option<&'a Tokenizer>,
    config: EngineConfig,
    store: PagedStore<B>,
    /// Requests not holding blocks (new, or preempted), to be admitted front first.
    waiting: VecDeque<Active>,
    /// Requests holding blocks, oldest first.
    running: Vec<Active>,
    next_id: u64,
    stats: EngineStats,
}

impl<'a, B: Backend> Engine<'a, B> {
    /// An engine over `model` (with `tokenizer` for text, streaming and stop strings), its
    /// pool allocated now.
    ///
    /// # Errors
    /// A zero block size, token budget or running limit, or a pool smaller than one block.
    pub fn new(
        model: &'a Transformer<B>,
        tokenizer: Option<&'a Tokenizer>,
        config: EngineConfig,
    ) -> Result<Self> {
        if config.block_size == 0 {
            return Err(CacheError::ZeroBlockSize.into());
        }
        if config.token_budget == 0 || config.max_running == 0 {
            return Err(GenerateError::InvalidRequest(format!(
                "the engine needs a token budget and a running limit of at least 1 \
                 (token_budget = {}, max_running = {})",
                config.token_budget, config.max_running
            )));
        }
        let block_bytes = config.block_size * model.kv_bytes_per_position();
        let blocks = match config.pool {
            PoolSize::Blocks(n) => n,
            PoolSize::Tokens(n) => n.div_ceil(config.block_size),
            PoolSize::Bytes(n) => n / block_bytes,
        };
        if blocks == 0 {
            return Err(GenerateError::InvalidRequest(format!(
                "a KV pool of {:?} holds no block of {} positions ({block_bytes} bytes): give \
                 it more room",
                config.pool, config.block_size
            )));
        }
        let store = model.new_paged_store(blocks, config.block_size, config.block_order);
        Ok(Self {
            model,
            tokenizer,
            config: EngineConfig {
                pool: PoolSize::Blocks(blocks),
                ..config
            },
            store,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: EngineStats::default(),
        })
    }

    /// The pool's size in blocks, bytes and full-length sequences.
    pub fn pool_summary(&self) -> PoolSummary {
        let pool = self.store.pool();
        let max_positions = self.model.config().max_positions;
        PoolSummary {
            blocks: pool.num_blocks(),
            block_size: pool.block_size(),
            bytes: pool.num_blocks() * pool.block_size() * self.model.kv_bytes_per_position(),
            max_positions,
            full_length_sequences: pool.num_blocks() / max_positions.div_ceil(pool.block_size()),
        }
    }

    /// The store (its pool's counters and invariants).
    pub fn store(&self) -> &PagedStore<B> {
        &self.store
    }

    /// Counters since the engine started.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Requests waiting to be admitted (new or preempted).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests running (holding blocks).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Queues `request`; it is admitted at a coming step.
    ///
    /// # Errors
    /// An empty prompt, no tokens to generate, sampling settings out of range, stop strings
    /// without a tokenizer, ids outside the vocabulary, a sequence past the model's positions,
    /// or one that would not fit the pool even alone.
    pub fn add_request(&mut self, request: Request) -> Result<RequestId> {
        request.sampling.validate()?;
        if request.prompt.is_empty() {
            return Err(GenerateError::InvalidRequest(
                "the prompt needs at least one token".into(),
            ));
        }
        if request.max_new_tokens == 0 {
            return Err(GenerateError::InvalidRequest(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        if !request.stop_strings.is_empty() && self.tokenizer.is_none() {
            return Err(GenerateError::InvalidRequest(
                "stop strings need a tokenizer".into(),
            ));
        }
        self.model.config().check_token_ids(0, &request.prompt)?;
        // The last new token is never fed back, so it takes no position.
        let positions = request.prompt.len() + request.max_new_tokens - 1;
        let max = self.model.config().max_positions;
        if positions > max {
            return Err(GenerateError::PastModelContext {
                prompt: request.prompt.len(),
                new: request.max_new_tokens,
                max,
            });
        }
        let pool = self.store.pool();
        let blocks = positions.div_ceil(pool.block_size());
        if blocks > pool.num_blocks() {
            return Err(GenerateError::LargerThanPool {
                positions,
                blocks,
                pool_blocks: pool.num_blocks(),
                block_size: pool.block_size(),
            });
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let eos = match &request.eos {
            EosPolicy::Model => self.model.config().eos_token_ids.clone(),
            EosPolicy::Ids(ids) => ids.clone(),
            EosPolicy::Ignore => Vec::new(),
        };
        self.waiting.push_back(Active {
            id,
            row: Row::new(id.0 as usize, request.prompt, request.sampling)?,
            max_new_tokens: request.max_new_tokens,
            eos,
            stops: StopStrings::new(request.stop_strings),
            top_logprobs: request.top_logprobs,
            sequence: None,
            computed: 0,
            cached_prompt_tokens: None,
        });
        Ok(id)
    }

    /// Copies the longest run of `tokens`'s full blocks that the prefix cache holds out of the
    /// pool (nothing is computed: run the prompt first). Empty when none is cached.
    pub fn save_prefix(&mut self, tokens: &[u32]) -> SavedPrefix {
        let config = self.model.config();
        // A store never counts a prompt's last position as cached (its logits are needed), so
        // ask with one placeholder token more: every full block of `tokens` may count.
        let probe: Vec<u32> = tokens.iter().copied().chain([0]).collect();
        let (sequence, cached) = self.store.add_sequence(&probe);
        let host = |t: burn::tensor::Tensor<B, 4>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .into_vec()
                .expect("converted to f32")
        };
        let layers = if cached == 0 {
            Vec::new()
        } else {
            (0..config.num_layers)
                .map(|layer| {
                    let (keys, values) = self.store.read(layer, sequence);
                    (host(keys), host(values))
                })
                .collect()
        };
        self.store.free(sequence);
        SavedPrefix {
            tokens: tokens[..cached].to_vec(),
            block_size: self.store.block_size(),
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            layers,
        }
    }

    /// Puts `saved` back in the pool as cached blocks, so later prompts that start with its
    /// tokens skip computing them (positions the pool still holds are kept, not rewritten).
    /// Returns the positions it covers. The blocks are cached, not held: like any unreferenced
    /// block they go when the pool needs room.
    ///
    /// # Errors
    /// A prefix of another shape (layers, heads, head size, lengths), another block size, ids
    /// outside the vocabulary, or a pool with no room for it now.
    pub fn restore_prefix(&mut self, saved: &SavedPrefix) -> Result<usize> {
        let config = self.model.config();
        let n = saved.tokens.len();
        let expect = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(GenerateError::InvalidRequest(format!(
                    "the saved prefix has {what} {got}, this engine's model and pool need {want}"
                )))
            }
        };
        expect("block size", saved.block_size, self.store.block_size())?;
        expect("key/value heads", saved.kv_heads, config.num_kv_heads)?;
        expect("head size", saved.head_dim, config.head_dim)?;
        if n == 0 {
            return Ok(0);
        }
        expect("layers", saved.layers.len(), config.num_layers)?;
        expect("positions not in whole blocks:", n % saved.block_size, 0)?;
        let values = config.num_kv_heads * n * config.head_dim;
        for (keys, vals) in &saved.layers {
            expect("values per layer", keys.len(), values)?;
            expect("values per layer", vals.len(), values)?;
        }
        config.check_token_ids(0, &saved.tokens)?;
        let probe: Vec<u32> = saved.tokens.iter().copied().chain([0]).collect();
        let (sequence, cached) = self.store.add_sequence(&probe);
        if cached < n {
            if let Err(e) = self.store.reserve(sequence, &saved.tokens[cached..]) {
                self.store.free(sequence);
                return Err(e.into());
            }
            let dims = [1, config.num_kv_heads, n, config.head_dim];
            let device = self.model.device();
            let tensor = |data: &[f32]| {
                burn::tensor::Tensor::<B, 4>::from_data(
                    burn::tensor::TensorData::new(data.to_vec(), dims),
                    device,
                )
                .narrow(2, cached, n - cached)
            };
            for (layer, (keys, vals)) in saved.layers.iter().enumerate() {
                self.store
                    .write(layer, sequence, cached, tensor(keys), tensor(vals));
            }
        }
        self.store.free(sequence);
        Ok(n)
    }

    /// Drops `request` wherever it is; its blocks are back in the pool when this returns.
    /// Whether it was held (a finished or unknown request is not).
    pub fn cancel(&mut self, request: RequestId) -> bool {
        if let Some(at) = self.waiting.iter().position(|a| a.id == request) {
            self.waiting.remove(at);
            return true;
        }
        if let Some(at) = self.running.iter().position(|a| a.id == request) {
            let active = self.running.remove(at);
            if let Some(sequence) = active.sequence {
                self.store.free(sequence);
            }
            return true;
        }
        false
    }

    /// One step: schedules, runs one forward pass over everything scheduled, samples where a
    /// sequence reached its end, and reports what happened. A step with nothing to do returns
    /// no events.
    ///
    /// # Errors
    /// The model's errors (none expected for requests [`Engine::add_request`] accepted).
    pub fn step(&mut self) -> Result<Vec<EngineEvent>> {
        let plan = self.schedule()?;
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        // The ragged batch: each scheduled request's next tokens, logits where it samples.
        let inputs: Vec<(SequenceId, Vec<u32>, usize, bool)> = plan
            .iter()
            .map(|&(id, n)| {
                let active = self.active(id);
                let tokens = active.tokens();
                let start = active.computed;
                let samples = start + n == tokens.len();
                let sequence = active.sequence.expect("scheduled requests hold a sequence");
                (sequence, tokens[start..start + n].to_vec(), start, samples)
            })
            .collect();
        let pieces: Vec<BatchPiece<'_>> = inputs
            .iter()
            .map(|(sequence, tokens, start, samples)| BatchPiece {
                sequence: *sequence,
                tokens,
                start: *start,
                logits: samples.then_some(Logits::Last),
            })
            .collect();
        let logits = self.model.forward_ragged(&mut self.store, &pieces)?;
        let [rows, vocab] = logits.dims();
        let logits: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("logits converted to f32");
        self.stats.steps += 1;
        // Sample where a sequence reached its end, in plan order (one logits row each).
        let mut events = Vec::new();
        let mut row_logits = logits.chunks_exact(vocab.max(1)).take(rows);
        for (&(id, n), (_, _, _, samples)) in plan.iter().zip(&inputs) {
            self.stats.computed_tokens += n;
            let tokenizer = self.tokenizer;
            let active = self.active_mut(id);
            active.computed += n;
            if !samples {
                continue;
            }
            let logits = row_logits
                .next()
                .expect("one logits row per sampling piece");
            let token =
                active
                    .row
                    .advance(logits, &active.eos, active.max_new_tokens, tokenizer)?;
            let logprobs = active
                .top_logprobs
                .map(|top| TokenLogprobs::new(logits, token, top));
            let text = active.row.publish(&active.stops).to_string();
            events.push(EngineEvent::Token {
                request: id,
                token,
                text,
                logprobs,
            });
            let finish = active.row.finish;
            let usage = Usage {
                prompt_tokens: active.row.prompt.len(),
                completion_tokens: active.row.generated.len(),
                cached_prompt_tokens: active.cached_prompt_tokens.unwrap_or(0),
            };
            self.stats.generated_tokens += 1;
            if let Some(reason) = finish {
                self.cancel(id);
                events.push(EngineEvent::Finished {
                    request: id,
                    reason,
                    usage,
                });
            }
        }
        Ok(events)
    }

    /// Decides this step's pieces, `(request, tokens)`, reserving their positions: running
    /// decoders first (one token each), then running prompts' chunks, oldest first, then new
    /// admissions, within the token budget. A running request that cannot reserve preempts
    /// the youngest running one (itself, if it is the youngest).
    fn schedule(&mut self) -> Result<Vec<(RequestId, usize)>> {
        let mut budget = self.config.token_budget;
        let mut plan: Vec<(RequestId, usize)> = Vec::new();
        let decoding = |a: &Active| a.pending() == 1 && a.computed >= a.row.prompt.len();
        let order: Vec<RequestId> = {
            let (decode, prompt): (Vec<&Active>, Vec<&Active>) =
                self.running.iter().partition(|a| decoding(a));
            decode.iter().chain(&prompt).map(|a| a.id).collect()
        };
        for id in order {
            if budget == 0 {
                break;
            }
            // Preempted by an earlier request of this loop.
            if !self.running.iter().any(|a| a.id == id) {
                continue;
            }
            let n = self.active(id).pending().min(budget);
            if self.reserve_or_preempt(id, n, &plan)? {
                plan.push((id, n));
                budget -= n;
            }
        }
        // Admit waiting requests, front first, while there is room.
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(mut active) = self.waiting.pop_front() else {
                break;
            };
            let tokens = active.tokens();
            let (sequence, cached) = self.store.add_sequence(&tokens);
            let n = (tokens.len() - cached).min(budget);
            if self
                .store
                .reserve(sequence, &tokens[cached..cached + n])
                .is_err()
            {
                // No room now: it waits for running requests to finish or be preempted.
                self.store.free(sequence);
                self.waiting.push_front(active);
                break;
            }
            self.stats.prefix_query_tokens += tokens.len();
            self.stats.prefix_hit_tokens += cached;
            active.cached_prompt_tokens.get_or_insert(cached);
            active.sequence = Some(sequence);
            active.computed = cached;
            plan.push((active.id, n));
            budget -= n;
            self.running.push(active);
        }
        self.running.sort_by_key(|a| a.id);
        if plan.is_empty() && !self.waiting.is_empty() && self.running.is_empty() {
            // Unreachable for requests `add_request` accepted (each fits the pool alone);
            // an error rather than a silent hang if that ever changes.
            let front = &self.waiting[0];
            return Err(GenerateError::LargerThanPool {
                positions: front.row.prompt.len() + front.max_new_tokens - 1,
                blocks: front.tokens().len().div_ceil(self.store.block_size()),
                pool_blocks: self.store.pool().num_blocks(),
                block_size: self.store.block_size(),
            });
        }
        Ok(plan)
    }

    /// Reserves `id`'s next `n` positions, preempting the youngest running requests not in
    /// `plan` until it fits. Whether `id` is still running (it preempts itself when it is the
    /// youngest).
    fn reserve_or_preempt(
        &mut self,
        id: RequestId,
        n: usize,
        plan: &[(RequestId, usize)],
    ) -> Result<bool> {
        loop {
            let active = self.active(id);
            let sequence = active.sequence.expect("running requests hold a sequence");
            let tokens = active.tokens();
            let start = active.computed;
            match self.store.reserve(sequence, &tokens[start..start + n]) {
                Ok(()) => return Ok(true),
                Err(CacheError::PoolExhausted { .. }) => {
                    let victim = self
                        .running
                        .iter()
                        .rev()
                        .find(|a| !plan.iter().any(|(p, _)| *p == a.id))
                        .map(|a| a.id)
                        .expect("`id` itself is running and not planned");
                    self.preempt(victim);
                    if victim == id {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(ModelError::Cache(e).into()),
            }
        }
    }

    /// Gives `id`'s blocks back and queues it first, to recompute its sequence when readmitted.
    fn preempt(&mut self, id: RequestId) {
        let at = self
            .running
            .iter()
            .position(|a| a.id == id)
            .expect("preempting a running request");
        let mut active = self.running.remove(at);
        if let Some(sequence) = active.sequence.take() {
            self.store.free(sequence);
        }
        active.computed = 0;
        self.stats.preemptions += 1;
        // Preempted requests go back in age order, ahead of new ones.
        let at = self
            .waiting
            .iter()
            .position(|w| w.id > id)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, active);
    }

    fn active(&self, id: RequestId) -> &Active {
        self.running
            .iter()
            .find(|a| a.id == id)
            .expect("a running request")
    }

    fn active_mut(&mut self, id: RequestId) -> &mut Active {
        self.running
            .iter_mut()
            .find(|a| a.id == id)
            .expect("a running request")
    }
}
