//! [`Scheduler`]: the waiting and running requests plus the block budget, turned into one
//! step's plan ([`StepPlan`]), as vLLM v1's scheduler does.
//!
//! Each step takes the running requests, decoders first (one token each), then those still in
//! their prompts (a chunk each), oldest first, within a budget of tokens; then it admits waiting
//! requests, front first, while the budget and the running limit allow, each starting from the
//! blocks the prefix cache holds for its tokens. A running request that cannot reserve its
//! next positions preempts the youngest running request not yet planned (itself, when it is
//! the youngest): its blocks go back to the pool and it returns to the waiting queue, in age
//! order ahead of new requests, to recompute its sequence (mostly from the prefix cache) when
//! admitted again.
//!
//! The scheduler decides and reserves; it runs nothing. Blocks come from a
//! [`CacheManager`] (the engine's [`PagedStore`]), so its decisions can be tested without a
//! model.

use std::collections::VecDeque;

use burn::tensor::backend::Backend;
use kv_core::{CacheError, PagedStore, SequenceId};

use super::request::{RequestId, RequestState};
use crate::error::{GenerateError, Result};

/// What the scheduler asks of the block pool: sequences made from their tokens (starting from
/// the prefix cache), room reserved all or nothing, blocks given back.
pub trait CacheManager {
    /// Adds a sequence for `tokens`, starting from its longest run of cached full blocks
    /// (never its last token): `(sequence, cached positions)`.
    fn add_sequence(&mut self, tokens: &[u32]) -> (SequenceId, usize);

    /// Makes room for `tokens` after the sequence's positions, all or nothing.
    ///
    /// # Errors
    /// [`CacheError::PoolExhausted`] when the pool has no room, nothing reserved.
    fn reserve(&mut self, sequence: SequenceId, tokens: &[u32]) -> kv_core::Result<()>;

    /// [`CacheManager::reserve`] for a pass whose tokens end in guesses: no block joins the
    /// prefix cache until the pass's outcome is known.
    ///
    /// # Errors
    /// As [`CacheManager::reserve`].
    fn reserve_unverified(&mut self, sequence: SequenceId, tokens: &[u32]) -> kv_core::Result<()>;

    /// Gives the sequence's blocks back (its full blocks stay cached).
    fn free(&mut self, sequence: SequenceId);

    /// Positions per block.
    fn block_size(&self) -> usize;

    /// Blocks in the pool.
    fn num_blocks(&self) -> usize;

    /// Blocks a sequence of `positions` positions takes at most.
    fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size())
    }
}

impl<B: Backend> CacheManager for PagedStore<B> {
    fn add_sequence(&mut self, tokens: &[u32]) -> (SequenceId, usize) {
        PagedStore::add_sequence(self, tokens)
    }

    fn reserve(&mut self, sequence: SequenceId, tokens: &[u32]) -> kv_core::Result<()> {
        PagedStore::reserve(self, sequence, tokens)
    }

    fn reserve_unverified(&mut self, sequence: SequenceId, tokens: &[u32]) -> kv_core::Result<()> {
        PagedStore::reserve_unverified(self, sequence, tokens)
    }

    fn free(&mut self, sequence: SequenceId) {
        PagedStore::free(self, sequence);
    }

    fn block_size(&self) -> usize {
        PagedStore::block_size(self)
    }

    fn num_blocks(&self) -> usize {
        self.pool().num_blocks()
    }

    fn blocks_for(&self, positions: usize) -> usize {
        PagedStore::blocks_for(self, positions)
    }
}

/// One step's work: each scheduled request and how many of its pending tokens the step feeds,
/// in the order the forward pass takes them. Every position is reserved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StepPlan {
    pub(crate) pieces: Vec<(RequestId, usize)>,
}

impl StepPlan {
    fn contains(&self, id: RequestId) -> bool {
        self.pieces.iter().any(|&(p, _)| p == id)
    }
}

/// The scheduler's counters since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SchedulerStats {
    /// Positions looked up in the prefix cache at admissions.
    pub(crate) prefix_query_tokens: usize,
    /// Positions the prefix cache held at admissions.
    pub(crate) prefix_hit_tokens: usize,
    /// Running requests that gave their blocks back.
    pub(crate) preemptions: usize,
}

/// The waiting and running requests, and the rules that plan each step (see the module docs).
pub(crate) struct Scheduler {
    token_budget: usize,
    max_running: usize,
    /// Most prompt tokens a step feeds once a decoder is planned in it.
    prefill_while_decoding: usize,
    /// Requests not holding blocks (new, or preempted), to be admitted front first.
    waiting: VecDeque<RequestState>,
    /// Requests holding blocks, oldest first.
    running: Vec<RequestState>,
    stats: SchedulerStats,
}

impl Scheduler {
    /// A scheduler feeding at most `token_budget` tokens a step and running at most
    /// `max_running` requests at once (both at least 1, checked by the engine).
    pub(crate) fn new(token_budget: usize, max_running: usize) -> Self {
        Self {
            token_budget,
            max_running,
            prefill_while_decoding: usize::MAX,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: SchedulerStats::default(),
        }
    }

    /// This scheduler, feeding at most `n` prompt tokens in a step that also decodes.
    pub(crate) fn with_prefill_while_decoding(mut self, n: usize) -> Self {
        self.prefill_while_decoding = n;
        self
    }

    /// Queues a new request behind every waiting one.
    pub(crate) fn add(&mut self, request: RequestState) {
        self.waiting.push_back(request);
    }

    /// Requests waiting (new or preempted).
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests running (holding blocks).
    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    /// Counters since the scheduler started.
    pub(crate) fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// A running request.
    ///
    /// # Panics
    /// If `id` is not running (a plan names only running requests).
    pub(crate) fn request(&self, id: RequestId) -> &RequestState {
        self.running
            .iter()
            .find(|r| r.id == id)
            .expect("a running request")
    }

    /// A running request, to advance.
    ///
    /// # Panics
    /// If `id` is not running.
    pub(crate) fn request_mut(&mut self, id: RequestId) -> &mut RequestState {
        self.running
            .iter_mut()
            .find(|r| r.id == id)
            .expect("a running request")
    }

    /// The running requests, oldest first, to draft for.
    pub(crate) fn running_requests(&mut self) -> &mut [RequestState] {
        &mut self.running
    }

    /// Drops `id` wherever it is, its blocks back in `cache`. Whether it was held.
    pub(crate) fn remove(&mut self, id: RequestId, cache: &mut impl CacheManager) -> bool {
        if let Some(at) = self.waiting.iter().position(|r| r.id == id) {
            self.waiting.remove(at);
            return true;
        }
        if let Some(at) = self.running.iter().position(|r| r.id == id) {
            if let Some(sequence) = self.running.remove(at).sequence {
                cache.free(sequence);
            }
            return true;
        }
        false
    }

    /// Plans one step, reserving its positions in `cache`: running decoders first (one token
    /// each), then running prompts' chunks, oldest first, then admissions, within the token
    /// budget; preempting where a running request cannot reserve.
    ///
    /// # Errors
    /// A request that could not run even alone (never one the engine accepted), or a cache
    /// error other than exhaustion.
    pub(crate) fn schedule(&mut self, cache: &mut impl CacheManager) -> Result<StepPlan> {
        let mut budget = self.token_budget;
        // Prompt tokens left this step: capped once a decoder is planned.
        let mut prefill = usize::MAX;
        let mut plan = StepPlan::default();
        let order: Vec<RequestId> = {
            let (decode, prompt): (Vec<&RequestState>, Vec<&RequestState>) =
                self.running.iter().partition(|r| r.decoding());
            decode.iter().chain(&prompt).map(|r| r.id).collect()
        };
        for id in order {
            if budget == 0 {
                break;
            }
            // Preempted by an earlier request of this loop.
            if !self.running.iter().any(|r| r.id == id) {
                continue;
            }
            // A speculating decoder feeds its guesses too, as many as the budget leaves.
            let request = self.request_mut(id);
            let (pending, decoding) = (request.pending(), request.decoding());
            request.guesses.truncate(budget.saturating_sub(pending));
            let n = match decoding {
                true => (pending + request.guesses.len()).min(budget),
                false => pending.min(budget).min(prefill),
            };
            if n == 0 {
                continue;
            }
            if self.reserve_or_preempt(id, n, &plan, cache)? {
                plan.pieces.push((id, n));
                budget -= n;
                prefill = match decoding {
                    true => prefill.min(self.prefill_while_decoding),
                    false => prefill - n,
                };
            }
        }
        let mut admitted = budget.min(prefill);
        self.admit(&mut admitted, &mut plan, cache);
        self.running.sort_by_key(|r| r.id);
        if plan.pieces.is_empty() && !self.waiting.is_empty() && self.running.is_empty() {
            // Unreachable for requests the engine accepted (each fits the pool alone); an
            // error rather than a silent hang if that ever changes.
            let front = &self.waiting[0];
            return Err(GenerateError::LargerThanPool {
                positions: front.row.prompt.len() + front.max_new_tokens - 1,
                blocks: cache.blocks_for(front.tokens().len()),
                pool_blocks: cache.num_blocks(),
                block_size: cache.block_size(),
            });
        }
        Ok(plan)
    }

    /// Admits waiting requests, front first, while the budget, the running limit and the pool
    /// allow; each starts from the prefix cache and plans its first chunk.
    fn admit(&mut self, budget: &mut usize, plan: &mut StepPlan, cache: &mut impl CacheManager) {
        while *budget > 0 && self.running.len() < self.max_running {
            let Some(mut request) = self.waiting.pop_front() else {
                break;
            };
            let tokens = request.tokens();
            let (sequence, cached) = cache.add_sequence(&tokens);
            let n = (tokens.len() - cached).min(*budget);
            if cache
                .reserve(sequence, &tokens[cached..cached + n])
                .is_err()
            {
                // No room now: it waits for running requests to finish or be preempted.
                cache.free(sequence);
                self.waiting.push_front(request);
                break;
            }
            self.stats.prefix_query_tokens += tokens.len();
            self.stats.prefix_hit_tokens += cached;
            request.cached_prompt_tokens.get_or_insert(cached);
            request.sequence = Some(sequence);
            request.computed = cached;
            plan.pieces.push((request.id, n));
            *budget -= n;
            self.running.push(request);
        }
    }

    /// Reserves `id`'s next `n` positions, preempting the youngest running requests not in
    /// `plan` until it fits. Whether `id` is still running (it preempts itself when it is the
    /// youngest).
    fn reserve_or_preempt(
        &mut self,
        id: RequestId,
        n: usize,
        plan: &StepPlan,
        cache: &mut impl CacheManager,
    ) -> Result<bool> {
        loop {
            let request = self.request(id);
            let sequence = request.sequence.expect("running requests hold a sequence");
            let tokens = request.feed(n);
            let reserved = match request.guesses.is_empty() {
                true => cache.reserve(sequence, &tokens),
                false => cache.reserve_unverified(sequence, &tokens),
            };
            match reserved {
                Ok(()) => return Ok(true),
                Err(CacheError::PoolExhausted { .. }) => {
                    let victim = self
                        .running
                        .iter()
                        .rev()
                        .find(|r| !plan.contains(r.id))
                        .map(|r| r.id)
                        .expect("`id` itself is running and not planned");
                    self.preempt(victim, cache);
                    if victim == id {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(kv_model::ModelError::Cache(e).into()),
            }
        }
    }

    /// Gives `id`'s blocks back and queues it, in age order ahead of new requests, to
    /// recompute its sequence when readmitted.
    fn preempt(&mut self, id: RequestId, cache: &mut impl CacheManager) {
        let at = self
            .running
            .iter()
            .position(|r| r.id == id)
            .expect("preempting a running request");
        let mut request = self.running.remove(at);
        if let Some(sequence) = request.sequence.take() {
            cache.free(sequence);
        }
        request.computed = 0;
        request.guesses = Default::default();
        self.stats.preemptions += 1;
        let at = self
            .waiting
            .iter()
            .position(|w| w.id > id)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, request);
    }
}

#[cfg(test)]
mod tests {
    use burn_ndarray::NdArray;
    use kv_core::{BlockOrder, LayerShape};

    use super::*;
    use crate::generate::Row;
    use crate::sampling::SamplingConfig;
    use crate::stream::StopStrings;

    /// A pool of `blocks` blocks of 4 positions, with the smallest layer there is: the
    /// scheduler only counts its blocks.
    fn pool(blocks: usize) -> PagedStore<NdArray> {
        let shape = LayerShape {
            kv_heads: 1,
            head_dim: 1,
        };
        let device = Default::default();
        PagedStore::new(1, shape, blocks, 4, BlockOrder::Ascending, b"test", &device)
    }

    /// Request `id` with a prompt of `prompt` distinct tokens (no prefix shared with another
    /// request), to generate up to `new` tokens.
    fn request(id: u64, prompt: usize, new: usize) -> RequestState {
        let tokens = (0..prompt as u32).map(|t| 1000 * id as u32 + t).collect();
        RequestState {
            id: RequestId(id),
            row: Row::new(id as usize, tokens, SamplingConfig::greedy()).unwrap(),
            max_new_tokens: new,
            eos: Vec::new(),
            stops: StopStrings::new(Vec::new()),
            top_logprobs: None,
            sequence: None,
            computed: 0,
            cached_prompt_tokens: None,
            guesses: Default::default(),
        }
    }

    /// Runs `plan` as the engine would: every piece's positions computed, and a token
    /// generated for each request that reached the end of what it holds.
    fn run(scheduler: &mut Scheduler, plan: &StepPlan) {
        for &(id, n) in &plan.pieces {
            let request = scheduler.request_mut(id);
            request.computed += n;
            if request.pending() == 0 {
                request.row.generated.push(7);
            }
        }
    }

    fn ids(plan: &StepPlan) -> Vec<(u64, usize)> {
        plan.pieces.iter().map(|&(id, n)| (id.0, n)).collect()
    }

    #[test]
    fn admission_is_first_come_first_served_within_the_running_limit() {
        let mut cache = pool(64);
        let mut scheduler = Scheduler::new(100, 2);
        for id in 0..3 {
            scheduler.add(request(id, 5, 4));
        }
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 5), (1, 5)]);
        assert_eq!((scheduler.running(), scheduler.waiting()), (2, 1));
    }

    #[test]
    fn the_budget_cuts_prompts_into_chunks_and_decoders_go_first() {
        let mut cache = pool(64);
        let mut scheduler = Scheduler::new(8, 4);
        scheduler.add(request(0, 3, 4));
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 3)]);
        run(&mut scheduler, &plan);
        // Request 1's 20-token prompt arrives: request 0 decodes one token, and 1 takes the
        // rest of the budget as its first chunk.
        scheduler.add(request(1, 20, 4));
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 1), (1, 7)]);
        run(&mut scheduler, &plan);
        // The decoder still first, then the prompt's next chunk.
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 1), (1, 7)]);
    }

    #[test]
    fn a_request_that_cannot_fit_waits_at_the_front() {
        // 4 blocks of 4: request 0 takes 3 of them, request 1's 8 positions do not fit.
        let mut cache = pool(4);
        let mut scheduler = Scheduler::new(100, 4);
        scheduler.add(request(0, 12, 2));
        scheduler.add(request(1, 8, 2));
        scheduler.add(request(2, 1, 2));
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 12)]);
        // Request 2 would fit, but admission is in order: it does not pass request 1.
        assert_eq!(scheduler.waiting(), 2);
    }

    #[test]
    fn an_older_request_preempts_the_youngest_which_waits_ahead_of_newer_ones() {
        // 5 blocks of 4: request 0's 12 prompt tokens take 3, request 1's 5 take 2.
        let mut cache = pool(5);
        let mut scheduler = Scheduler::new(100, 4);
        scheduler.add(request(0, 12, 8));
        scheduler.add(request(1, 5, 8));
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 12), (1, 5)]);
        run(&mut scheduler, &plan);
        scheduler.add(request(2, 2, 2));
        // Request 0's next position needs a fourth block and the pool is full: the youngest
        // running request (1) gives its blocks back. Request 0 decodes alone, and the freed
        // blocks cannot take request 1 back yet.
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 1)]);
        assert_eq!(scheduler.stats().preemptions, 1);
        assert_eq!(scheduler.running(), 1);
        // Request 1 waits ahead of request 2, which arrived before the preemption, to
        // recompute its prompt and the token it had generated.
        let waiting: Vec<u64> = scheduler.waiting.iter().map(|r| r.id.0).collect();
        assert_eq!(waiting, [1, 2]);
        assert_eq!(scheduler.waiting[0].computed, 0);
        assert_eq!(scheduler.waiting[0].tokens().len(), 6);
    }

    #[test]
    fn a_request_preempts_itself_when_it_is_the_youngest() {
        // 3 blocks of 4: request 0's 6 prompt tokens take 2 (room left in the second),
        // request 1's 4 take the third, full.
        let mut cache = pool(3);
        let mut scheduler = Scheduler::new(100, 4);
        scheduler.add(request(0, 6, 8));
        scheduler.add(request(1, 4, 8));
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 6), (1, 4)]);
        run(&mut scheduler, &plan);
        // Request 0 decodes into its second block; request 1 needs a fourth block, and the
        // only running request not yet planned is itself: it gives its block back and waits.
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 1)]);
        assert_eq!(scheduler.stats().preemptions, 1);
        assert_eq!((scheduler.running(), scheduler.waiting()), (1, 1));
        assert_eq!(scheduler.waiting[0].id, RequestId(1));
    }

    #[test]
    fn a_step_that_decodes_feeds_at_most_its_prompt_cap() {
        let mut cache = pool(64);
        let mut scheduler = Scheduler::new(100, 4).with_prefill_while_decoding(5);
        // Nobody decodes yet: the whole prompt in one step.
        scheduler.add(request(0, 12, 4));
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 12)]);
        run(&mut scheduler, &plan);
        // Request 0 decodes: request 1's prompt comes five tokens a step, request 2 waits for
        // its share of those five.
        scheduler.add(request(1, 7, 4));
        scheduler.add(request(2, 3, 4));
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 1), (1, 5)]);
        run(&mut scheduler, &plan);
        let plan = scheduler.schedule(&mut cache).unwrap();
        assert_eq!(ids(&plan), [(0, 1), (1, 2), (2, 3)]);
    }

    #[test]
    fn removing_a_request_gives_its_blocks_back() {
        let mut cache = pool(8);
        let mut scheduler = Scheduler::new(100, 4);
        scheduler.add(request(0, 9, 2));
        scheduler.add(request(1, 2, 2));
        scheduler.schedule(&mut cache).unwrap();
        assert_eq!(cache.pool().free_blocks(), 8 - 3 - 1);
        assert!(scheduler.remove(RequestId(0), &mut cache));
        assert!(!scheduler.remove(RequestId(0), &mut cache));
        assert_eq!(cache.pool().free_blocks(), 8 - 1);
        assert_eq!(scheduler.running(), 1);
    }
}
