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
//!   within a budget of tokens per step ([`EngineConfig::token_budget`]), of which a step that
//!   decodes gives prompts at most [`EngineConfig::prefill_while_decoding`] (decode-first
//!   steps, so a new prompt's chunk does not stall every decoder's next token); then waiting
//!   requests are admitted, first come first served, while the budget and
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
//! # Where each part lives
//! - `config.rs`: [`EngineConfig`] and the defaults kv-serve and kv-bench take;
//! - `request.rs`: a request as given ([`Request`]), as held (`RequestState`), as reported
//!   ([`EngineEvent`]);
//! - `scheduler.rs`: the step plan (admission, the token budget, preemption) over a
//!   [`CacheManager`];
//! - this file: the engine, which executes each plan as one ragged forward pass and samples;
//! - `prefix.rs`: saving a prompt's cached blocks and restoring them;
//! - `speculation.rs`: per-request drafters whose guesses a step verifies
//!   ([`EngineSpeculation`]).
//!
//! # What it costs
//! Attention reads each sequence's keys through its block table. On the host (a model whose
//! matrices live there, as the CPU binaries load them) the pool is host memory and the
//! attention kernel walks the table where the blocks lie, no copy; only a decode step past 256
//! keys, which splits its keys over threads, reads them out as a tensor. On a device, a
//! sequence whose blocks are consecutive in the pool is read as one slice, any other is
//! gathered (a copy of its keys and values per layer and step). Preemption recomputes what the prefix cache no longer holds. Requests in a
//! batch share products whose kernels may order a row's sums differently from a single-row
//! product's, so tokens equal a solo run's exactly when the kernels are row-independent (as
//! kv-kernels' are) and to float rounding otherwise.

use std::collections::HashMap;

use burn::tensor::backend::Backend;
use kv_core::{BlockEvent, CacheError, KvDtype, PagedStore, SequenceId};
use kv_model::{BatchPiece, Logits, Tokenizer, Transformer};

use crate::error::{GenerateError, Result};
use crate::generate::{EosPolicy, Row};
use crate::sampling::TokenLogprobs;
use crate::speculative::{check, Draft, Schedule};
use crate::stream::StopStrings;

mod config;
mod prefix;
mod request;
mod scheduler;
mod speculation;

pub use config::{
    EngineConfig, PoolSize, DEFAULT_MAX_RUNNING, DEFAULT_POOL_TOKENS,
    DEFAULT_PREFILL_WHILE_DECODING, DEFAULT_TOKEN_BUDGET,
};
pub use prefix::SavedPrefix;
pub use request::{EngineEvent, Request, RequestId, Usage};
pub use scheduler::CacheManager;
pub use speculation::{DrafterFactory, EngineSpeculation, SpeculationCounts, DEFAULT_MAX_DECODING};

use request::RequestState;
use scheduler::{Scheduler, StepPlan};
use speculation::Drafting;

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
    /// Guesses drafted and kept, when the engine speculates.
    pub speculation: SpeculationCounts,
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
    /// Sequences of that length the pool holds at once as they decode (a sliding layer
    /// group holding its window's blocks only).
    pub full_length_sequences: usize,
    /// What keys and values are stored as.
    pub dtype: KvDtype,
}

impl std::fmt::Display for PoolSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KV pool: {} blocks of {} positions ({} positions, {:.1} MiB of {}); {} sequences of \
             the model's full {} positions fit at once",
            self.blocks,
            self.block_size,
            self.blocks * self.block_size,
            self.bytes as f64 / (1024.0 * 1024.0),
            self.dtype,
            self.full_length_sequences,
            self.max_positions
        )
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
    /// Every request's keys and values, in one block pool with its prefix cache: the
    /// scheduler's [`CacheManager`], and what the forward pass reads and writes.
    store: PagedStore<B>,
    /// The waiting and running requests, and each step's plan.
    scheduler: Scheduler,
    next_id: u64,
    stats: EngineStats,
    /// How requests draft, when the engine speculates.
    speculation: Option<EngineSpeculation<'a>>,
    /// Each speculating request's drafter, held from its addition to its end.
    drafting: HashMap<RequestId, Drafting<'a>>,
    /// What the pool stores keys and values as.
    kv_dtype: KvDtype,
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
        if config.token_budget == 0 || config.max_running == 0 || config.prefill_while_decoding == 0
        {
            return Err(GenerateError::InvalidRequest(format!(
                "the engine needs a token budget, a running limit and a prompt budget while \
                 decoding of at least 1 (token_budget = {}, max_running = {}, \
                 prefill_while_decoding = {})",
                config.token_budget, config.max_running, config.prefill_while_decoding
            )));
        }
        // A block holds one layer group's keys (every layer, for a model without sliding
        // layers): a pool of `n` tokens has room for `n` positions of every group.
        let groups = model.paged_layer_groups();
        let layers_per_block = groups.iter().map(|g| g.layers.len()).max().unwrap_or(1);
        let block_bytes = config.block_size
            * layers_per_block
            * model.kv_bytes_per_layer_position_in(config.kv_dtype);
        let blocks = match config.pool {
            PoolSize::Blocks(n) => n,
            PoolSize::Tokens(n) => n.div_ceil(config.block_size) * groups.len(),
            PoolSize::Bytes(n) => n / block_bytes,
        };
        if blocks == 0 {
            return Err(GenerateError::InvalidRequest(format!(
                "a KV pool of {:?} holds no block of {} positions ({block_bytes} bytes): give \
                 it more room",
                config.pool, config.block_size
            )));
        }
        let store = model
            .new_paged_store_in(
                blocks,
                config.block_size,
                config.block_order,
                config.kv_dtype,
            )
            .ok_or_else(|| {
                GenerateError::InvalidRequest(format!(
                    "a KV pool of {} needs a model computed on the host (a CPU backend): the \
                     device pool stores f32 only",
                    config.kv_dtype
                ))
            })?;
        let kv_dtype = config.kv_dtype;
        let scheduler = Scheduler::new(config.token_budget, config.max_running)
            .with_prefill_while_decoding(config.prefill_while_decoding);
        Ok(Self {
            model,
            tokenizer,
            store,
            scheduler,
            next_id: 0,
            stats: EngineStats::default(),
            speculation: None,
            drafting: HashMap::new(),
            kv_dtype,
        })
    }

    /// This engine, decoding speculatively: each request added from now on drafts guesses
    /// that its steps verify in the batched pass ([`EngineSpeculation`]). Tokens are those of
    /// plain decoding when greedy, and have the model's distribution when sampled.
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_generate::engine::{Engine, EngineConfig, EngineSpeculation, PoolSize, Request};
    /// use kv_generate::speculative::PromptLookup;
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
    /// let speculation = EngineSpeculation::prompt_lookup(PromptLookup::default(), 4);
    /// let mut engine = Engine::new(&model, None, config).unwrap().with_speculation(speculation).unwrap();
    /// let prompt = vec![5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7];
    /// engine.add_request(Request { eos: EosPolicy::Ignore, ..Request::greedy(prompt, 12) }).unwrap();
    /// while engine.has_work() {
    ///     engine.step().unwrap();
    /// }
    /// let counts = engine.stats().speculation;
    /// assert!(counts.accepted_tokens <= counts.drafted_tokens);
    /// assert_eq!(engine.stats().generated_tokens, 12);
    /// ```
    ///
    /// # Errors
    /// A speculation of no guesses.
    pub fn with_speculation(mut self, speculation: EngineSpeculation<'a>) -> Result<Self> {
        if speculation.draft_tokens == 0 {
            return Err(GenerateError::InvalidRequest(
                "speculation needs at least one guess a step (draft_tokens = 0)".into(),
            ));
        }
        self.speculation = Some(speculation);
        Ok(self)
    }

    /// The pool's size in blocks, bytes and full-length sequences.
    pub fn pool_summary(&self) -> PoolSummary {
        let pool = self.store.pool();
        let max_positions = self.model.config().max_positions;
        let block_bytes = pool.block_size()
            * self.store.layers_per_block()
            * self.model.kv_bytes_per_layer_position_in(self.kv_dtype);
        PoolSummary {
            dtype: self.kv_dtype,
            blocks: pool.num_blocks(),
            block_size: pool.block_size(),
            bytes: pool.num_blocks() * block_bytes,
            max_positions,
            full_length_sequences: pool.num_blocks() / self.store.decode_blocks(max_positions),
        }
    }

    /// The store (its pool's counters and invariants).
    pub fn store(&self) -> &PagedStore<B> {
        &self.store
    }

    /// Starts logging the prefix cache's block events ([`PagedStore::record_events`]): what a
    /// server publishes so that a router sends each prompt where its prefix is cached.
    pub fn record_block_events(&mut self) {
        self.store.record_events();
    }

    /// The block events logged since the last call, oldest first (none unless recording).
    pub fn take_block_events(&mut self) -> Vec<BlockEvent> {
        self.store.take_events()
    }

    /// Forgets every cached prefix, logging [`BlockEvent::Cleared`]: running requests keep
    /// their blocks, later prompts compute theirs again. Returns how many blocks were
    /// forgotten.
    pub fn reset_prefix_cache(&mut self) -> usize {
        self.store.clear_cache()
    }

    /// Counters since the engine started.
    pub fn stats(&self) -> EngineStats {
        let scheduled = self.scheduler.stats();
        EngineStats {
            prefix_query_tokens: scheduled.prefix_query_tokens,
            prefix_hit_tokens: scheduled.prefix_hit_tokens,
            preemptions: scheduled.preemptions,
            ..self.stats
        }
    }

    /// Requests waiting to be admitted (new or preempted).
    pub fn waiting(&self) -> usize {
        self.scheduler.waiting()
    }

    /// Requests running (holding blocks).
    pub fn running(&self) -> usize {
        self.scheduler.running()
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        self.waiting() + self.running() > 0
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
        let blocks = self.store.blocks_for(positions);
        if blocks > pool.num_blocks() {
            return Err(GenerateError::LargerThanPool {
                positions,
                blocks,
                pool_blocks: pool.num_blocks(),
                block_size: pool.block_size(),
            });
        }
        let id = RequestId(self.next_id);
        if let Some(speculation) = &mut self.speculation {
            let drafting = Drafting {
                drafter: (speculation.drafter)(&request)?,
                schedule: Schedule::new(speculation.draft_tokens),
            };
            self.drafting.insert(id, drafting);
        }
        self.next_id += 1;
        let eos = match &request.eos {
            EosPolicy::Model => self.model.config().eos_token_ids.clone(),
            EosPolicy::Ids(ids) => ids.clone(),
            EosPolicy::Ignore => Vec::new(),
        };
        self.scheduler.add(RequestState {
            id,
            row: Row::new(id.0 as usize, request.prompt, request.sampling)?,
            max_new_tokens: request.max_new_tokens,
            eos,
            stops: StopStrings::new(request.stop_strings),
            top_logprobs: request.top_logprobs,
            sequence: None,
            computed: 0,
            cached_prompt_tokens: None,
            guesses: Draft::default(),
        });
        Ok(id)
    }

    /// Drops `request` wherever it is; its blocks are back in the pool when this returns.
    /// Whether it was held (a finished or unknown request is not).
    pub fn cancel(&mut self, request: RequestId) -> bool {
        self.drafting.remove(&request);
        self.scheduler.remove(request, &mut self.store)
    }

    /// Each decoding request's guesses for this step from its drafter, while few enough
    /// requests decode ([`EngineSpeculation::max_decoding`]); at most what its remaining tokens
    /// can keep (a pass keeps its kept guesses and one token of its own), ids within the
    /// vocabulary.
    fn draft(&mut self) -> Result<()> {
        let Some(speculation) = &self.speculation else {
            return Ok(());
        };
        let vocab = self.model.config().vocab_size;
        let running = self.scheduler.running_requests();
        let decoding = running.iter().filter(|r| r.decoding()).count();
        for request in running {
            request.guesses = Draft::default();
            let Some(drafting) = self.drafting.get_mut(&request.id) else {
                continue;
            };
            if !request.decoding() || decoding > speculation.max_decoding {
                continue;
            }
            let room = request.max_new_tokens - request.row.generated.len();
            let most = drafting.schedule.guesses().min(room.saturating_sub(1));
            if most == 0 {
                continue;
            }
            let mut guesses = drafting.drafter.draft(&request.tokens(), most)?;
            let valid = guesses
                .tokens
                .iter()
                .take(most)
                .take_while(|&&t| (t as usize) < vocab)
                .count();
            guesses.truncate(valid);
            request.guesses = guesses;
        }
        Ok(())
    }

    /// One step: schedules, runs one forward pass over everything scheduled, samples where a
    /// sequence reached its end, and reports what happened. A step with nothing to do returns
    /// no events.
    ///
    /// # Errors
    /// The model's errors (none expected for requests [`Engine::add_request`] accepted).
    pub fn step(&mut self) -> Result<Vec<EngineEvent>> {
        self.draft()?;
        let plan: StepPlan = self.scheduler.schedule(&mut self.store)?;
        if plan.pieces.is_empty() {
            return Ok(Vec::new());
        }
        // The ragged batch: each scheduled request's next tokens (its guesses after them when
        // it speculates), logits where it samples (a row per position when it speculates).
        let inputs: Vec<PieceInput> = plan
            .pieces
            .iter()
            .map(|&(id, n)| {
                let request = self.scheduler.request(id);
                let guesses = request.guesses.len();
                PieceInput {
                    sequence: request
                        .sequence
                        .expect("scheduled requests hold a sequence"),
                    tokens: request.feed(n),
                    start: request.computed,
                    samples: request.pending() + guesses == n,
                    guesses,
                }
            })
            .collect();
        let pieces: Vec<BatchPiece<'_>> = inputs
            .iter()
            .map(|input| BatchPiece {
                sequence: input.sequence,
                tokens: &input.tokens,
                start: input.start,
                logits: match (input.samples, input.guesses) {
                    (false, _) => None,
                    (true, 0) => Some(Logits::Last),
                    (true, _) => Some(Logits::All),
                },
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
        // Sample where a sequence reached its end, in plan order (one logits row each, one per
        // position for a speculating piece).
        let mut events = Vec::new();
        let mut row_logits = logits.chunks_exact(vocab.max(1)).take(rows);
        for (&(id, n), input) in plan.pieces.iter().zip(&inputs) {
            self.stats.computed_tokens += n;
            if !input.samples {
                self.scheduler.request_mut(id).computed += n;
                continue;
            }
            let rows: Vec<&[f32]> = row_logits.by_ref().take(1 + input.guesses).collect();
            let kept = self.verify(id, &rows, &mut events)?;
            let request = self.scheduler.request_mut(id);
            // The pass's first token and the kept guesses stay; the rest never happened.
            request.computed = input.start + n - (input.guesses - kept);
            if input.guesses > 0 {
                let sequence = input.sequence;
                self.store.truncate(sequence, request.computed);
                self.stats.speculation.drafts += 1;
                self.stats.speculation.drafted_tokens += input.guesses;
                self.stats.speculation.accepted_tokens += kept;
                if let Some(drafting) = self.drafting.get_mut(&id) {
                    drafting.schedule.update(input.guesses, kept);
                }
            }
            let request = self.scheduler.request(id);
            if let Some(reason) = request.row.finish {
                let usage = Usage {
                    prompt_tokens: request.row.prompt.len(),
                    completion_tokens: request.row.generated.len(),
                    cached_prompt_tokens: request.cached_prompt_tokens.unwrap_or(0),
                };
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

    /// Chooses `id`'s tokens from its logits `rows` (one, or one per position of a speculating
    /// piece: row `i` checks guess `i`, and the row after the last kept guess gives a token of
    /// the model's own), stopping at a rejected guess or where the request finishes; pushes a
    /// token event for each. Returns the guesses kept.
    fn verify(
        &mut self,
        id: RequestId,
        rows: &[&[f32]],
        events: &mut Vec<EngineEvent>,
    ) -> Result<usize> {
        let tokenizer = self.tokenizer;
        let request = self.scheduler.request_mut(id);
        let guesses = std::mem::take(&mut request.guesses);
        let mut kept = 0;
        for (i, logits) in rows.iter().enumerate() {
            let context = request.row.context();
            let (token, rejected) = match guesses.tokens.get(i) {
                Some(&guess) => {
                    let proposal = guesses.proposals.as_ref().map(|q| q[i].as_slice());
                    let (keep, token) =
                        check(&mut request.row.sampler, logits, &context, guess, proposal);
                    kept += usize::from(keep);
                    (token, !keep)
                }
                None => (request.row.sampler.sample(logits, &context), false),
            };
            request
                .row
                .push(token, &request.eos, request.max_new_tokens, tokenizer)?;
            let logprobs = request
                .top_logprobs
                .map(|top| TokenLogprobs::new(logits, token, top));
            let text = request.row.publish(&request.stops).to_string();
            events.push(EngineEvent::Token {
                request: id,
                token,
                text,
                logprobs,
            });
            self.stats.generated_tokens += 1;
            if rejected || request.row.finish.is_some() {
                break;
            }
        }
        Ok(kept)
    }
}

/// One scheduled piece of the ragged pass, as the engine assembles it.
struct PieceInput {
    sequence: SequenceId,
    /// Tokens fed: pending ones, then guesses.
    tokens: Vec<u32>,
    /// Position of `tokens[0]`.
    start: usize,
    /// Whether the piece reaches the sequence's end, so its logits choose tokens.
    samples: bool,
    /// Guesses at the end of `tokens`.
    guesses: usize,
}
