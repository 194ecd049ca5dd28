//! The engine's thread: it owns the model and kv-generate's [`Engine`], takes [`Job`]s from
//! the HTTP side over a channel and sends each job's events back over the job's own channel.
//!
//! The HTTP side never waits on the engine and the engine never waits on a client: a job's
//! events go into an unbounded channel that the job's handler drains at its own pace (a
//! stream's events are a few bytes per token, bounded by the job's `max_tokens`). When a client
//! goes away its handler drops the receiving end, and the engine, which checks every job
//! before each step, cancels the job's requests, whose blocks are back in the pool before the
//! next step runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use burn::tensor::backend::Backend;
use kv_generate::engine::{
    Engine, EngineConfig, EngineEvent, EngineSpeculation, PoolSummary, Request, RequestId,
    SavedPrefix, Usage,
};
use kv_generate::speculative::PromptLookup;
use kv_generate::{FinishReason, GenerateError, TokenLogprobs};
use kv_model::{Tokenizer, Transformer};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::kv_events::KvEventSink;
use crate::metrics::Metrics;

/// What the HTTP side knows of the model once it has loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The id clients name it by (`/v1/models`).
    pub id: String,
    /// Tokens in its vocabulary (ids must be below).
    pub vocab_size: usize,
    /// Positions it was built for: a prompt plus its new tokens must fit.
    pub max_positions: usize,
    /// Its tokenizer with the chat template, if it has one.
    pub tokenizer: Option<Tokenizer>,
    /// When it loaded, in seconds since the Unix epoch (`/v1/models`'s `created`).
    pub created: u64,
    /// The KV pool.
    pub pool: PoolSummary,
    /// What saved prompt caches must match ([`crate::model_fingerprint`]).
    pub fingerprint: String,
}

/// State the HTTP side and the engine's thread share.
#[derive(Default)]
pub struct Shared {
    /// Set once the model has loaded.
    pub model: OnceLock<ModelInfo>,
    /// Set if the model failed to load.
    pub failed: OnceLock<String>,
    /// What `/metrics` reports.
    pub metrics: Metrics,
    in_flight: AtomicUsize,
}

impl Shared {
    /// The model, or why there is none yet.
    pub fn model(&self) -> Result<&ModelInfo, ApiError> {
        if let Some(info) = self.model.get() {
            return Ok(info);
        }
        match self.failed.get() {
            Some(message) => Err(ApiError::LoadFailed(message.clone())),
            None => Err(ApiError::Loading),
        }
    }

    /// Requests (choices) admitted by the HTTP side and not yet done.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A model and its tokenizer, as the loading closure gives them to the engine's thread.
pub struct Loaded<B: Backend> {
    /// The network.
    pub model: Transformer<B>,
    /// Its tokenizer.
    pub tokenizer: Option<Tokenizer>,
    /// The id clients name it by.
    pub id: String,
    /// What its saved prompt caches must match ([`crate::model_fingerprint`]).
    pub fingerprint: String,
    /// How the engine speculates, if it does.
    pub speculation: Option<LoadedSpeculation<B>>,
}

/// Who guesses for a speculating server, as loaded.
pub enum Drafting<B: Backend> {
    /// Prompt lookup over each request's own text.
    PromptLookup(PromptLookup),
    /// A draft model (same token ids as the model), each request decoding ahead with it
    /// through its own cache.
    DraftModel {
        /// The draft (boxed: a model is large beside a lookup's two numbers).
        model: Box<Transformer<B>>,
        /// A draft stops where its largest next-token probability is below this.
        min_probability: f64,
    },
}

/// How a server speculates ([`EngineSpeculation`]), its draft model loaded.
pub struct LoadedSpeculation<B: Backend> {
    /// Who guesses.
    pub drafting: Drafting<B>,
    /// Most guesses a request feeds a step.
    pub draft_tokens: usize,
    /// Speculate only while at most this many requests decode.
    pub max_decoding: usize,
}

impl<B: Backend> LoadedSpeculation<B> {
    /// The engine's speculation, borrowing the draft model.
    pub fn engine(&self) -> EngineSpeculation<'_> {
        let speculation = match &self.drafting {
            Drafting::PromptLookup(lookup) => {
                EngineSpeculation::prompt_lookup(*lookup, self.draft_tokens)
            }
            Drafting::DraftModel {
                model,
                min_probability,
            } => EngineSpeculation::draft_model(model, *min_probability, self.draft_tokens),
        };
        speculation.with_max_decoding(self.max_decoding)
    }
}

/// What the HTTP side asks of the engine's thread.
pub enum Command {
    /// Generate.
    Generate(Job),
    /// Copy out the cached blocks of a prompt's longest cached prefix.
    SavePrefix {
        /// The prompt.
        tokens: Vec<u32>,
        /// Where the copy goes.
        reply: oneshot::Sender<SavedPrefix>,
    },
    /// Put saved blocks back in the pool as cached blocks.
    RestorePrefix {
        /// The blocks.
        saved: SavedPrefix,
        /// Positions restored, or why not.
        reply: oneshot::Sender<Result<usize, ApiError>>,
    },
    /// Forget every cached prefix (running requests keep their blocks).
    ResetPrefixCache {
        /// How many cached blocks were forgotten.
        reply: oneshot::Sender<usize>,
    },
}

/// One HTTP request's work: one engine request per choice.
pub struct Job {
    /// The choices' requests, choice `i` at index `i`.
    pub requests: Vec<Request>,
    /// Where the engine sends this job's events.
    pub events: UnboundedSender<JobEvent>,
    /// When the HTTP request arrived (time to first token counts from here).
    pub arrived: Instant,
}

/// What happens to a job, choice by choice.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// Choice `choice` generated `token`.
    Token {
        /// Which choice.
        choice: usize,
        /// The token.
        token: u32,
        /// Text that became showable with it (UTF-8, never part of a stop string).
        text: String,
        /// Its log-probabilities, if the job asked.
        logprobs: Option<TokenLogprobs>,
    },
    /// Choice `choice` is done.
    Finished {
        /// Which choice.
        choice: usize,
        /// Why.
        reason: FinishReason,
        /// Its token counts.
        usage: Usage,
    },
    /// The job failed as a whole (the engine refused a request, or a step failed).
    Failed(ApiError),
}

/// Holds `count` of the server's in-flight slots until dropped.
pub struct InFlight {
    shared: Arc<Shared>,
    count: usize,
}

impl InFlight {
    /// Takes `count` slots, or says how many are taken when that would pass `limit`.
    pub fn acquire(shared: &Arc<Shared>, count: usize, limit: usize) -> Result<Self, usize> {
        let before = shared.in_flight.fetch_add(count, Ordering::SeqCst);
        if before + count > limit {
            shared.in_flight.fetch_sub(count, Ordering::SeqCst);
            return Err(before);
        }
        Ok(Self {
            shared: shared.clone(),
            count,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared
            .in_flight
            .fetch_sub(self.count, Ordering::SeqCst);
    }
}

/// Starts the engine's thread: it runs `load`, publishes the model in `shared`, and serves the
/// commands sent on the returned channel until every sender is dropped and no work is left.
/// With `kv_events`, each step's prefix-cache events go there ([`crate::kv_events`]).
pub fn spawn<B, L>(
    load: L,
    config: EngineConfig,
    shared: Arc<Shared>,
    kv_events: Option<KvEventSink>,
) -> (Sender<Command>, JoinHandle<()>)
where
    B: Backend,
    L: FnOnce() -> Result<Loaded<B>, String> + Send + 'static,
{
    let (sender, receiver) = std::sync::mpsc::channel::<Command>();
    let handle =
        std::thread::Builder::new()
            .name("kv-serve-engine".into())
            .spawn(move || {
                let loaded = match load() {
                    Ok(loaded) => loaded,
                    Err(message) => return refuse_all(&shared, message, receiver),
                };
                let engine = Engine::new(&loaded.model, loaded.tokenizer.as_ref(), config)
                    .and_then(|engine| match &loaded.speculation {
                        Some(speculation) => engine.with_speculation(speculation.engine()),
                        None => Ok(engine),
                    });
                let mut engine = match engine {
                    Ok(engine) => engine,
                    Err(e) => return refuse_all(&shared, e.to_string(), receiver),
                };
                if kv_events.is_some() {
                    engine.record_block_events();
                }
                let pool = engine.pool_summary();
                shared.metrics.kv_blocks_total.set(pool.blocks as i64);
                shared.metrics.set_model(&loaded.id, &pool);
                let created = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let _ = shared.model.set(ModelInfo {
                    id: loaded.id.clone(),
                    vocab_size: loaded.model.config().vocab_size,
                    max_positions: loaded.model.config().max_positions,
                    tokenizer: loaded.tokenizer.clone(),
                    created,
                    pool,
                    fingerprint: loaded.fingerprint.clone(),
                });
                Worker {
                    engine,
                    shared: &shared,
                    jobs: HashMap::new(),
                    owners: HashMap::new(),
                    next_job: 0,
                    kv_events,
                }
                .run(receiver);
            })
            .expect("spawning the engine's thread");
    (sender, handle)
}

/// After a failed load: record why, and answer every command with it.
fn refuse_all(shared: &Shared, message: String, receiver: Receiver<Command>) {
    let _ = shared.failed.set(message.clone());
    let error = ApiError::LoadFailed(message);
    for command in receiver {
        match command {
            Command::Generate(job) => {
                let _ = job.events.send(JobEvent::Failed(error.clone()));
            }
            Command::RestorePrefix { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
            }
            // Dropping the reply tells the caller there is no engine.
            Command::SavePrefix { .. } | Command::ResetPrefixCache { .. } => {}
        }
    }
}

/// A job the engine is running.
struct RunningJob {
    events: UnboundedSender<JobEvent>,
    /// Each choice's engine request.
    requests: Vec<RequestId>,
    arrived: Instant,
    /// When each choice's last token came.
    last_token: Vec<Option<Instant>>,
    /// Choices not finished.
    open: usize,
}

struct Worker<'e, 'm, B: Backend> {
    engine: Engine<'m, B>,
    shared: &'e Shared,
    jobs: HashMap<u64, RunningJob>,
    /// Each engine request's job and choice.
    owners: HashMap<RequestId, (u64, usize)>,
    next_job: u64,
    /// Where each loop's prefix-cache events go, when published.
    kv_events: Option<KvEventSink>,
}

impl<B: Backend> Worker<'_, '_, B> {
    fn run(mut self, receiver: Receiver<Command>) {
        let mut senders_gone = false;
        loop {
            if !self.engine.has_work() {
                if senders_gone {
                    return;
                }
                // Idle: sleep until a job comes.
                match receiver.recv() {
                    Ok(command) => self.command(command),
                    Err(_) => return,
                }
            }
            loop {
                match receiver.try_recv() {
                    Ok(command) => self.command(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        senders_gone = true;
                        break;
                    }
                }
            }
            self.cancel_abandoned();
            if self.engine.has_work() {
                self.step();
            }
            self.update_gauges();
            if let Some(sink) = &self.kv_events {
                // One batch per loop: the commands' events and the step's, in order.
                sink.publish(self.engine.take_block_events());
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Generate(job) => self.submit(job),
            Command::SavePrefix { tokens, reply } => {
                let _ = reply.send(self.engine.save_prefix(&tokens));
            }
            Command::RestorePrefix { saved, reply } => {
                let restored = self.engine.restore_prefix(&saved).map_err(refusal);
                let _ = reply.send(restored);
            }
            Command::ResetPrefixCache { reply } => {
                let _ = reply.send(self.engine.reset_prefix_cache());
            }
        }
    }

    /// Adds a job's requests to the engine, or fails the job as a whole.
    fn submit(&mut self, job: Job) {
        let key = self.next_job;
        self.next_job += 1;
        let prompt_tokens: usize = job.requests.iter().map(|r| r.prompt.len()).sum();
        let mut ids = Vec::with_capacity(job.requests.len());
        for request in job.requests {
            match self.engine.add_request(request) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        self.engine.cancel(id);
                    }
                    let _ = job.events.send(JobEvent::Failed(refusal(e)));
                    return;
                }
            }
        }
        let metrics = &self.shared.metrics;
        metrics.prompt_tokens.inc_by(prompt_tokens as u64);
        for (choice, id) in ids.iter().enumerate() {
            self.owners.insert(*id, (key, choice));
        }
        self.jobs.insert(
            key,
            RunningJob {
                events: job.events,
                last_token: vec![None; ids.len()],
                open: ids.len(),
                requests: ids,
                arrived: job.arrived,
            },
        );
    }

    /// Cancels the requests of every job whose client has gone.
    fn cancel_abandoned(&mut self) {
        let gone: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, job)| job.events.is_closed())
            .map(|(key, _)| *key)
            .collect();
        for key in gone {
            let job = self.jobs.remove(&key).expect("listed above");
            for id in job.requests {
                self.owners.remove(&id);
                if self.engine.cancel(id) {
                    self.shared.metrics.requests_cancelled.inc();
                }
            }
        }
    }

    /// One engine step, its events sent to their jobs.
    fn step(&mut self) {
        let before = self.engine.stats();
        let started = Instant::now();
        let events = match self.engine.step() {
            Ok(events) => events,
            Err(e) => return self.fail_all(&e.to_string()),
        };
        let now = Instant::now();
        let metrics = &self.shared.metrics;
        metrics.step_time.observe((now - started).as_secs_f64());
        let after = self.engine.stats();
        // Both from the engine's admissions, so hits never exceed queries, preemptions included.
        metrics
            .prefix_cache_queries
            .inc_by((after.prefix_query_tokens - before.prefix_query_tokens) as u64);
        metrics
            .prefix_cache_hits
            .inc_by((after.prefix_hit_tokens - before.prefix_hit_tokens) as u64);
        metrics
            .preemptions
            .inc_by((after.preemptions - before.preemptions) as u64);
        let (spec, spec_before) = (after.speculation, before.speculation);
        metrics
            .spec_drafts
            .inc_by((spec.drafts - spec_before.drafts) as u64);
        metrics
            .spec_draft_tokens
            .inc_by((spec.drafted_tokens - spec_before.drafted_tokens) as u64);
        metrics
            .spec_accepted_tokens
            .inc_by((spec.accepted_tokens - spec_before.accepted_tokens) as u64);
        for event in events {
            let request = match &event {
                EngineEvent::Token { request, .. } | EngineEvent::Finished { request, .. } => {
                    *request
                }
            };
            let Some(&(key, choice)) = self.owners.get(&request) else {
                continue;
            };
            let job = self.jobs.get_mut(&key).expect("owners point at jobs");
            let out = match event {
                EngineEvent::Token {
                    token,
                    text,
                    logprobs,
                    ..
                } => {
                    metrics.generation_tokens.inc();
                    match job.last_token[choice].replace(now) {
                        None => metrics
                            .time_to_first_token
                            .observe((now - job.arrived).as_secs_f64()),
                        Some(last) => metrics
                            .inter_token_latency
                            .observe((now - last).as_secs_f64()),
                    }
                    JobEvent::Token {
                        choice,
                        token,
                        text,
                        logprobs,
                    }
                }
                EngineEvent::Finished { reason, usage, .. } => {
                    metrics.requests_finished.inc();
                    self.owners.remove(&request);
                    job.open -= 1;
                    JobEvent::Finished {
                        choice,
                        reason,
                        usage,
                    }
                }
            };
            // A send fails only when the client has gone; the job is cancelled next loop.
            let _ = job.events.send(out);
            if job.open == 0 {
                self.jobs.remove(&key);
            }
        }
    }

    /// A step failed: every job fails with the error, and the engine starts over empty.
    fn fail_all(&mut self, message: &str) {
        for (_, job) in self.jobs.drain() {
            for id in job.requests {
                self.engine.cancel(id);
            }
            let _ = job
                .events
                .send(JobEvent::Failed(ApiError::Engine(message.to_string())));
        }
        self.owners.clear();
    }

    fn update_gauges(&self) {
        let metrics = &self.shared.metrics;
        let pool = self.engine.store().pool();
        metrics.running.set(self.engine.running() as i64);
        metrics.waiting.set(self.engine.waiting() as i64);
        let used = pool.num_blocks() - pool.free_blocks();
        metrics.kv_blocks_used.set(used as i64);
        metrics.set_load(
            self.engine.running(),
            self.engine.waiting(),
            used as f64 / pool.num_blocks().max(1) as f64,
        );
    }
}

/// The error a client gets for a request the engine refused (the HTTP side checks the common
/// cases first, with the field's name; this covers the rest).
fn refusal(e: GenerateError) -> ApiError {
    match e {
        GenerateError::Backend(_) => ApiError::Engine(e.to_string()),
        other => ApiError::Invalid {
            message: other.to_string(),
            param: None,
        },
    }
}
