//! The continuous-batching engine: requests that join and leave a running batch, are cut into
//! chunks, hit the prefix cache or are preempted get the tokens they get alone; cancelled
//! requests leave nothing behind; bad requests are errors.

use std::collections::{HashMap, HashSet};

use crate::fixtures::fixtures;
use burn_ndarray::NdArray;
use kv_core::{BlockEvent, BlockHash, BlockId, BlockOrder, CacheConfig, KvDtype};
use kv_generate::engine::{
    Engine, EngineConfig, EngineEvent, EngineSpeculation, PoolSize, Request, RequestId, Usage,
};
use kv_generate::speculative::PromptLookup;
use kv_generate::{
    CacheChoice, EosPolicy, FinishReason, GenerateError, GenerationConfig, Generator,
    SamplingConfig,
};
use kv_model::{load_model, LoadedModel, ModelConfig, Tokenizer, Transformer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub(crate) type B = NdArray<f32>;

pub(crate) fn load(name: &str) -> LoadedModel<B> {
    load_model::<B>(&fixtures().join(name), &Default::default()).unwrap()
}

/// What a request produced through the engine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub(crate) tokens: Vec<u32>,
    pub(crate) text: String,
    pub(crate) reason: FinishReason,
    pub(crate) usage: Usage,
}

/// Runs the engine until it is idle, adding `arrivals[i].1` at step `arrivals[i].0`; returns
/// each request's outcome, in arrival order.
pub(crate) fn run(engine: &mut Engine<'_, B>, arrivals: &[(usize, Request)]) -> Vec<Outcome> {
    let mut ids = Vec::new();
    let mut outcomes: HashMap<RequestId, Outcome> = HashMap::new();
    let mut tokens: HashMap<RequestId, (Vec<u32>, String)> = HashMap::new();
    let mut step = 0;
    while ids.len() < arrivals.len() || engine.has_work() {
        for (_, request) in arrivals.iter().filter(|(at, _)| *at == step) {
            ids.push(engine.add_request(request.clone()).unwrap());
        }
        for event in engine.step().unwrap() {
            match event {
                EngineEvent::Token {
                    request,
                    token,
                    text,
                    ..
                } => {
                    let entry = tokens.entry(request).or_default();
                    entry.0.push(token);
                    entry.1.push_str(&text);
                }
                EngineEvent::Finished {
                    request,
                    reason,
                    usage,
                } => {
                    let (tokens, text) = tokens.remove(&request).unwrap_or_default();
                    outcomes.insert(
                        request,
                        Outcome {
                            tokens,
                            text,
                            reason,
                            usage,
                        },
                    );
                }
            }
        }
        step += 1;
        assert!(step < 100_000, "the engine does not finish");
    }
    ids.iter().map(|id| outcomes.remove(id).unwrap()).collect()
}

/// Every block of `engine`'s pool is back and its counts hold together (after `what`).
pub(crate) fn assert_pool_whole(engine: &Engine<'_, B>, what: &str) {
    let pool = engine.store().pool();
    assert_eq!(pool.free_blocks(), pool.num_blocks(), "{what}");
    pool.audit().unwrap();
}

/// The prefix cache's events since recording began (`events`, oldest first) against what the
/// requests computed (`sequences`: each prompt and its generated tokens): every block
/// reported holds verified tokens (its chain of parents spells a prefix of some sequence, so
/// no rejected guess was ever reported), no block is reported twice while cached, each removal
/// names a reported block, and what a router mirrors from the events alone is exactly what the
/// pool has cached.
pub(crate) fn assert_events_mirror_pool(
    engine: &Engine<'_, B>,
    events: &[BlockEvent],
    sequences: &[Vec<u32>],
    what: &str,
) {
    let mut spelled: HashMap<BlockHash, Vec<u32>> = HashMap::new();
    let mut mirror: HashSet<BlockHash> = HashSet::new();
    for event in events {
        match event {
            BlockEvent::Stored {
                hash,
                parent,
                tokens,
            } => {
                let mut prefix = match parent {
                    Some(parent) => spelled[parent].clone(),
                    None => Vec::new(),
                };
                prefix.extend_from_slice(tokens);
                assert!(
                    sequences.iter().any(|s| s.starts_with(&prefix)),
                    "{what}: a reported block spells {prefix:?}, which no request computed"
                );
                spelled.insert(*hash, prefix);
                assert!(mirror.insert(*hash), "{what}: {hash:?} reported twice");
            }
            BlockEvent::Removed { hash } => {
                assert!(
                    mirror.remove(hash),
                    "{what}: {hash:?} removed, never stored"
                );
            }
            BlockEvent::Cleared => mirror.clear(),
        }
    }
    let pool = engine.store().pool();
    let cached: HashSet<BlockHash> = (0..pool.num_blocks())
        .filter_map(|b| pool.hash_of(BlockId(b as u32)))
        .collect();
    assert_eq!(
        mirror, cached,
        "{what}: the events' mirror is the pool's cache"
    );
}

/// The same request through `Generator` alone, with a dynamic cache.
pub(crate) fn alone(
    model: &Transformer<B>,
    tokenizer: Option<&Tokenizer>,
    request: &Request,
) -> (Vec<u32>, Option<String>, FinishReason) {
    let config = GenerationConfig {
        max_new_tokens: request.max_new_tokens,
        sampling: request.sampling.clone(),
        eos: request.eos.clone(),
        stop_strings: request.stop_strings.clone(),
        cache: CacheChoice::Cache(CacheConfig::Dynamic { capacity: 16 }),
    };
    let out = Generator::new(model, tokenizer)
        .generate(
            std::slice::from_ref(&request.prompt),
            &config,
            &mut |_, _| {},
        )
        .unwrap();
    let row = out.rows.into_iter().next().unwrap();
    (row.generated_ids, row.text, row.finish_reason)
}

/// Request `i` of a mixed workload: prompts of 1 to 23 tokens, 1 to 12 new tokens, greedy or
/// seeded sampling, the model's EOS or none.
pub(crate) fn mixed_request(i: usize, vocab: usize) -> Request {
    let len = 1 + (i * 7) % 23;
    let prompt = (0..len)
        .map(|p| ((i * 13 + p * 29 + 1) % vocab) as u32)
        .collect();
    let sampling = if i.is_multiple_of(2) {
        SamplingConfig::greedy()
    } else {
        SamplingConfig {
            temperature: Some(0.9),
            top_k: Some(20),
            top_p: Some(0.95),
            seed: 100 + i as u64,
            ..SamplingConfig::greedy()
        }
    };
    Request {
        sampling,
        eos: if i.is_multiple_of(3) {
            EosPolicy::Model
        } else {
            EosPolicy::Ignore
        },
        ..Request::greedy(prompt, 1 + (i * 5) % 12)
    }
}

fn assert_equal_alone(
    model: &Transformer<B>,
    tokenizer: Option<&Tokenizer>,
    requests: &[Request],
    outcomes: &[Outcome],
    what: &str,
) {
    for (i, (request, outcome)) in requests.iter().zip(outcomes).enumerate() {
        let (tokens, text, reason) = alone(model, tokenizer, request);
        assert_eq!(outcome.tokens, tokens, "{what}: request {i}'s tokens");
        assert_eq!(outcome.reason, reason, "{what}: request {i}'s finish");
        if let Some(text) = text {
            assert_eq!(outcome.text, text, "{what}: request {i}'s text");
        }
        assert_eq!(outcome.usage.prompt_tokens, request.prompt.len());
        assert_eq!(outcome.usage.completion_tokens, tokens.len());
    }
}

#[test]
fn twenty_requests_joining_and_leaving_equal_each_alone_on_every_fixture() {
    // gemma3's sliding layers (window 4) see less than the requests' prompts: the paged
    // store's full-length blocks are masked to the window, the cache alone is a ring.
    for name in [
        "gpt2", "llama", "qwen2", "qwen3", "gemma3", "phi3", "gemma2",
    ] {
        let loaded = load(name);
        let model = &loaded.model;
        let vocab = model.config().vocab_size;
        let requests: Vec<Request> = (0..20).map(|i| mixed_request(i, vocab)).collect();
        // Arrivals spread over the first steps, two at a time; chunks of at most 7 tokens a
        // step; blocks of 3 handed out shuffled.
        let arrivals: Vec<(usize, Request)> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| (i / 2 * 3, r.clone()))
            .collect();
        for (block_size, budget, order) in [
            (3, 7, BlockOrder::Shuffled { seed: 9 }),
            (1, 5, BlockOrder::Shuffled { seed: 1 }),
            (16, 64, BlockOrder::Ascending),
        ] {
            let config = EngineConfig {
                pool: PoolSize::Tokens(2048),
                block_size,
                max_running: 8,
                token_budget: budget,
                block_order: order,
                ..EngineConfig::default()
            };
            let mut engine = Engine::new(model, None, config).unwrap();
            let outcomes = run(&mut engine, &arrivals);
            let what = format!("{name}, blocks of {block_size}, budget {budget}");
            assert_equal_alone(model, None, &requests, &outcomes, &what);
            assert_pool_whole(&engine, &what);
        }
    }
}

#[test]
fn a_shared_prefix_is_found_in_the_cache_skipped_and_gives_the_same_output() {
    let loaded = load("llama");
    let model = &loaded.model;
    let vocab = model.config().vocab_size as u32;
    let prefix: Vec<u32> = (0..40).map(|p| (p * 7 + 3) % vocab).collect();
    let first = Request::greedy([prefix.clone(), vec![1, 2, 3]].concat(), 6);
    let second = Request::greedy([prefix.clone(), vec![4, 5]].concat(), 6);
    let config = EngineConfig {
        pool: PoolSize::Tokens(512),
        block_size: 4,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, None, config).unwrap();
    let a = run(&mut engine, &[(0, first.clone())]);
    assert_eq!(a[0].usage.cached_prompt_tokens, 0);
    let computed = engine.stats().computed_tokens;
    let b = run(&mut engine, &[(0, second.clone())]);
    // The prefix's ten full blocks were cached; only the suffix and the decode steps ran.
    assert_eq!(b[0].usage.cached_prompt_tokens, 40);
    assert_eq!(engine.stats().prefix_hit_tokens, 40);
    // Both prompts were looked up whole; the hits are a share of that.
    assert_eq!(
        engine.stats().prefix_query_tokens,
        first.prompt.len() + second.prompt.len()
    );
    assert_eq!(
        engine.stats().computed_tokens - computed,
        2 + (b[0].tokens.len() - 1)
    );
    // The same prompt again: everything but its last block is cached, and its last token is
    // computed for its logits.
    let c = run(&mut engine, &[(0, first.clone())]);
    assert_eq!(c[0].usage.cached_prompt_tokens, 40);
    assert_equal_alone(
        model,
        None,
        &[first.clone(), second, first],
        &[a[0].clone(), b[0].clone(), c[0].clone()],
        "prefix",
    );
    assert_eq!(engine.store().stats().hits, 20);
}

#[test]
fn a_saved_prefix_restored_into_a_fresh_engine_is_a_cache_hit_with_the_same_output() {
    let loaded = load("llama");
    let model = &loaded.model;
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..22).map(|p| (p * 5 + 1) % vocab).collect();
    let request = Request::greedy(prompt.clone(), 6);
    let config = EngineConfig {
        pool: PoolSize::Tokens(256),
        block_size: 4,
        ..EngineConfig::default()
    };
    let mut first = Engine::new(model, None, config.clone()).unwrap();
    let before = run(&mut first, &[(0, request.clone())]);
    // Nothing of an unseen prompt is cached: nothing to save.
    assert!(first.save_prefix(&[9, 9, 9, 9, 9]).tokens.is_empty());
    let saved = first.save_prefix(&prompt);
    // The prompt's five full blocks.
    assert_eq!(saved.tokens, prompt[..20]);
    assert_eq!(saved.layers.len(), model.config().num_layers);

    // A fresh engine (another process, in effect) with the prefix put back.
    let mut second = Engine::new(model, None, config.clone()).unwrap();
    assert_eq!(second.restore_prefix(&saved).unwrap(), 20);
    assert_eq!(
        second.store().pool().free_blocks(),
        second.store().pool().num_blocks(),
        "restored blocks are cached, not held"
    );
    let after = run(&mut second, &[(0, request.clone())]);
    assert_eq!(after[0].usage.cached_prompt_tokens, 20);
    assert_eq!(after[0].tokens, before[0].tokens);
    // Restoring twice changes nothing.
    assert_eq!(second.restore_prefix(&saved).unwrap(), 20);

    // A prefix of another shape is refused with the numbers.
    let mut wrong = saved.clone();
    wrong.layers.pop();
    let error = second.restore_prefix(&wrong).unwrap_err().to_string();
    assert!(
        error.contains("layers 1") && error.contains("need 2"),
        "{error}"
    );
    let mut other_blocks = saved.clone();
    other_blocks.block_size = 16;
    assert!(second.restore_prefix(&other_blocks).is_err());
    let mut short = saved;
    short.layers[0].0.pop();
    assert!(second.restore_prefix(&short).is_err());
}

/// Gemma 3's sliding layers (window 4) in blocks of 4: their groups give back the blocks that
/// slide out of the window as a request decodes, so its blocks grow at the full layers' rate
/// only; its tokens are those of the model alone through a dense hybrid cache.
#[test]
fn sliding_layer_groups_give_back_blocks_past_their_window() {
    let loaded = load("gemma3");
    let model = &loaded.model;
    let groups = model.paged_layer_groups();
    // Two full layers (2, 5), four sliding ones in two groups of two.
    assert_eq!(groups.len(), 3);
    assert_eq!(groups[0].layers, [2, 5]);
    let prompt: Vec<u32> = (0..8).map(|p| (p * 7 + 3) % 96).collect();
    let config = EngineConfig {
        pool: PoolSize::Tokens(64),
        block_size: 4,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, None, config).unwrap();
    let request = Request {
        eos: EosPolicy::Ignore,
        ..Request::greedy(prompt.clone(), 32)
    };
    let id = engine.add_request(request.clone()).unwrap();
    let pool_blocks = engine.store().pool().num_blocks();
    // 64 positions of every group: 16 blocks each.
    assert_eq!(pool_blocks, 3 * 16);
    let mut tokens = Vec::new();
    let mut most_held = 0;
    while engine.has_work() {
        for event in engine.step().unwrap() {
            if let EngineEvent::Token { token, .. } = event {
                tokens.push(token);
            }
        }
        let held = pool_blocks - engine.store().pool().free_blocks();
        most_held = most_held.max(held);
        if engine.running() > 0 && tokens.len() >= 2 {
            // Positions written so far: the prompt and every token fed back (past the
            // prompt's step, whose chunk the sliding groups hold whole).
            let positions = prompt.len() + tokens.len() - 1;
            assert_eq!(
                held,
                engine.store().decode_blocks(positions),
                "{positions} positions"
            );
        }
    }
    let _ = id;
    // 39 positions: 10 blocks of full layers, 2 per sliding group at most; one table for
    // every layer would hold 30.
    assert_eq!(engine.store().decode_blocks(39), 10 + 2 + 2);
    assert_eq!(engine.store().blocks_for(39), 30);
    assert!(most_held <= 14, "held {most_held} blocks");
    assert_eq!(tokens, alone(model, None, &request).0);
}

/// A Gemma 3 prefix longer than the window saved and restored: the sliding layers keep only
/// their window's blocks before the prefix's end, and a fresh engine given them back answers
/// as the first did.
#[test]
fn a_saved_hybrid_prefix_keeps_its_windows_and_restores() {
    let loaded = load("gemma3");
    let model = &loaded.model;
    let prompt: Vec<u32> = (0..22).map(|p| (p * 5 + 1) % 96).collect();
    let request = Request::greedy(prompt.clone(), 6);
    let config = EngineConfig {
        pool: PoolSize::Tokens(256),
        block_size: 4,
        ..EngineConfig::default()
    };
    let mut first = Engine::new(model, None, config.clone()).unwrap();
    let before = run(&mut first, &[(0, request.clone())]);
    // The same prompt again: its cached blocks match, the sliding groups' window among them.
    let again = run(&mut first, &[(0, request.clone())]);
    assert_eq!(again[0].usage.cached_prompt_tokens, 20);
    assert_eq!(again[0].tokens, before[0].tokens);
    let saved = first.save_prefix(&prompt);
    assert_eq!(saved.tokens, prompt[..20]);
    // Position 20's window of 4 starts at 17, in the block of 16..20.
    let starts: Vec<usize> = (0..6).map(|l| if l % 3 == 2 { 0 } else { 16 }).collect();
    assert_eq!(saved.layer_starts, starts);
    let mut second = Engine::new(model, None, config.clone()).unwrap();
    assert_eq!(second.restore_prefix(&saved).unwrap(), 20);
    let after = run(&mut second, &[(0, request)]);
    assert_eq!(after[0].usage.cached_prompt_tokens, 20);
    assert_eq!(after[0].tokens, before[0].tokens);
    // A prefix whose sliding layers start later than this pool needs is refused.
    let mut late = saved;
    late.layer_starts[0] = 20;
    let config = EngineConfig {
        pool: PoolSize::Tokens(256),
        block_size: 4,
        ..EngineConfig::default()
    };
    let mut third = Engine::new(model, None, config).unwrap();
    let error = third.restore_prefix(&late).unwrap_err().to_string();
    assert!(error.contains("layer 0 from position 20"), "{error}");
}

#[test]
fn a_tiny_pool_preempts_and_outputs_still_equal_each_alone() {
    let loaded = load("qwen2");
    let model = &loaded.model;
    let vocab = model.config().vocab_size;
    // Six requests of up to 30 positions in a pool of 48: at most one or two fit at a time.
    let requests: Vec<Request> = (0..6)
        .map(|i| Request {
            eos: EosPolicy::Ignore,
            ..mixed_request(i * 4 + 1, vocab)
        })
        .map(|r| Request {
            max_new_tokens: 18,
            ..r
        })
        .collect();
    let arrivals: Vec<(usize, Request)> = requests.iter().map(|r| (0, r.clone())).collect();
    let config = EngineConfig {
        pool: PoolSize::Blocks(12),
        block_size: 4,
        max_running: 6,
        token_budget: 16,
        block_order: BlockOrder::Shuffled { seed: 5 },
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, None, config).unwrap();
    let outcomes = run(&mut engine, &arrivals);
    assert!(engine.stats().preemptions > 0, "{:?}", engine.stats());
    assert_equal_alone(model, None, &requests, &outcomes, "tiny pool");
    assert_pool_whole(&engine, "tiny pool");
}

/// 1000 random requests (a few shared prefixes, random lengths and arrivals), 30% cancelled
/// at a random step while waiting or mid-stream, through a pool small enough to preempt: the
/// pool ends as it started. On a Llama and on a Gemma 3 whose sliding layers (window 4) give
/// blocks back as they go (three layer groups, so three times the blocks).
#[test]
fn a_thousand_random_requests_with_cancellations_leave_the_pool_as_it_started() {
    let llama = serde_json::json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    });
    let gemma3 = serde_json::json!({
        "model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "intermediate_size": 64, "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]
    });
    for (json, blocks) in [(llama, 24), (gemma3, 72)] {
        thousand_random_requests(&json, blocks, Speculate::No);
    }
}

/// Whether [`thousand_random_requests`] runs its engine speculatively (prompt lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Speculate {
    No,
    PromptLookup,
}

pub(crate) fn thousand_random_requests(
    json: &serde_json::Value,
    blocks: usize,
    speculate: Speculate,
) {
    let config = ModelConfig::from_hf_json(json, "random").unwrap();
    let model = Transformer::<B>::random(&config, 3, &Default::default()).unwrap();
    let engine_config = EngineConfig {
        pool: PoolSize::Blocks(blocks),
        block_size: 4,
        max_running: 12,
        token_budget: 24,
        block_order: BlockOrder::Shuffled { seed: 11 },
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&model, None, engine_config).unwrap();
    if speculate == Speculate::PromptLookup {
        let lookup = EngineSpeculation::prompt_lookup(PromptLookup::default(), 4);
        engine = engine
            .with_speculation(lookup.with_max_decoding(usize::MAX))
            .unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let prefixes: Vec<Vec<u32>> = (0..4)
        .map(|_| {
            (0..rng.random_range(4..24))
                .map(|_| rng.random_range(0..64))
                .collect()
        })
        .collect();
    let mut live: Vec<RequestId> = Vec::new();
    let (mut added, mut cancelled, mut finished) = (0, 0, 0);
    while added < 1000 || engine.has_work() {
        for _ in 0..rng.random_range(0..4) {
            if added == 1000 {
                break;
            }
            let mut prompt = prefixes[rng.random_range(0..4)].clone();
            prompt.extend((0..rng.random_range(1..12)).map(|_| rng.random_range(0..64u32)));
            let request = Request {
                eos: EosPolicy::Ignore,
                sampling: SamplingConfig {
                    temperature: Some(1.0),
                    seed: added as u64,
                    ..SamplingConfig::greedy()
                },
                ..Request::greedy(prompt, rng.random_range(1..20))
            };
            live.push(engine.add_request(request).unwrap());
            added += 1;
        }
        if !live.is_empty() && rng.random_bool(0.3) {
            let id = live.swap_remove(rng.random_range(0..live.len()));
            assert!(engine.cancel(id));
            cancelled += 1;
            // Its blocks are back now, not at the next step.
            engine.store().pool().audit().unwrap();
        }
        for event in engine.step().unwrap() {
            if let EngineEvent::Finished { request, .. } = event {
                live.retain(|&id| id != request);
                finished += 1;
            }
        }
    }
    assert_eq!(added, 1000);
    assert_eq!(cancelled + finished, 1000);
    assert!(cancelled > 200, "{cancelled} cancelled");
    let stats = engine.stats();
    assert!(
        stats.preemptions > 0 && stats.prefix_hit_tokens > 0,
        "{stats:?}"
    );
    if speculate == Speculate::PromptLookup {
        let counts = stats.speculation;
        assert!(counts.accepted_tokens > 0, "{counts:?}");
        assert!(counts.accepted_tokens < counts.drafted_tokens, "{counts:?}");
    }
    let pool = engine.store().pool();
    assert_eq!(engine.store().sequences(), 0);
    assert_eq!(pool.free_blocks(), pool.num_blocks());
    pool.audit().unwrap();
    assert!(
        !engine.cancel(RequestId(0)),
        "finished or cancelled requests are gone"
    );
}

#[test]
fn bad_requests_are_refused_with_the_reason_and_the_engine_runs_on() {
    let loaded = load("gpt2");
    let model = &loaded.model;
    let config = EngineConfig {
        pool: PoolSize::Blocks(4),
        block_size: 4,
        ..EngineConfig::default()
    };
    let narrow = EngineConfig {
        kv_dtype: KvDtype::Int8,
        ..config.clone()
    };
    let error = Engine::new(model, None, narrow).err().expect("refused");
    assert!(
        error.to_string().contains("int8") && error.to_string().contains("host"),
        "{error}"
    );
    let mut engine = Engine::new(model, None, config.clone()).unwrap();
    let vocab = model.config().vocab_size as u32;
    let refused = |engine: &mut Engine<'_, B>, request: Request| {
        engine.add_request(request).unwrap_err().to_string()
    };
    assert!(refused(&mut engine, Request::greedy(vec![], 3)).contains("at least one token"));
    assert!(refused(&mut engine, Request::greedy(vec![1], 0)).contains("max_new_tokens"));
    assert!(refused(&mut engine, Request::greedy(vec![vocab], 3)).contains(&vocab.to_string()));
    let err = engine
        .add_request(Request::greedy(vec![1; 10], 10))
        .unwrap_err();
    assert!(
        matches!(
            err,
            GenerateError::LargerThanPool {
                positions: 19,
                blocks: 5,
                pool_blocks: 4,
                block_size: 4
            }
        ),
        "{err}"
    );
    let max = model.config().max_positions;
    let mut big = Engine::new(
        model,
        None,
        EngineConfig {
            pool: PoolSize::Tokens(4 * max),
            ..config.clone()
        },
    )
    .unwrap();
    assert!(matches!(
        big.add_request(Request::greedy(vec![1; max], 2))
            .unwrap_err(),
        GenerateError::PastModelContext { .. }
    ));
    let stops = Request {
        stop_strings: vec!["x".into()],
        ..Request::greedy(vec![1], 2)
    };
    assert!(refused(&mut engine, stops).contains("tokenizer"));
    let hot = Request {
        sampling: SamplingConfig {
            temperature: Some(-1.0),
            ..SamplingConfig::greedy()
        },
        ..Request::greedy(vec![1], 2)
    };
    assert!(matches!(
        engine.add_request(hot).unwrap_err(),
        GenerateError::InvalidSampling(_)
    ));
    for bad in [
        EngineConfig {
            token_budget: 0,
            ..config.clone()
        },
        EngineConfig {
            block_size: 0,
            ..config.clone()
        },
        EngineConfig {
            pool: PoolSize::Bytes(1),
            ..config.clone()
        },
    ] {
        assert!(Engine::new(model, None, bad).is_err());
    }
    // Nothing was queued; a good request still runs.
    assert!(!engine.has_work());
    let out = run(&mut engine, &[(0, Request::greedy(vec![1, 2, 3], 4))]);
    assert_eq!(out[0].usage.prompt_tokens, 3);
}

#[test]
fn log_probabilities_come_with_each_token_when_asked() {
    let loaded = load("llama");
    let mut engine = Engine::new(&loaded.model, None, EngineConfig::default()).unwrap();
    let request = Request {
        top_logprobs: Some(3),
        eos: EosPolicy::Ignore,
        ..Request::greedy(vec![5, 6, 7], 4)
    };
    engine.add_request(request).unwrap();
    let mut seen = 0;
    while engine.has_work() {
        for event in engine.step().unwrap() {
            if let EngineEvent::Token {
                token, logprobs, ..
            } = event
            {
                let lp = logprobs.expect("asked for");
                seen += 1;
                assert_eq!(lp.token, token);
                assert_eq!(lp.top.len(), 3);
                // Greedy: the chosen token is the most likely one.
                assert_eq!(lp.top[0], (token, lp.logprob));
                assert!(lp.logprob <= 0.0 && lp.top[1].1 <= lp.top[0].1);
            }
        }
    }
    assert_eq!(seen, 4);
}

/// The default model (SmolLM2-135M-Instruct, Q4_1 as shipped, its matrices multiplied by
/// kv-kernels as the CPU binaries run it): chat requests of different lengths, joining at
/// different steps, prompts cut into chunks of 16, greedy and seeded sampling, one with a stop
/// string: each request's tokens and text equal its run alone.
#[test]
fn smollm2_requests_batched_continuously_equal_each_alone() {
    use kv_model::{
        default_model, load_model_placed, ChatMessage, GenerationPrompt, WeightFormat,
        WeightPlacement,
    };
    let path = default_model(&mut |_| {}).expect("fetch the default model");
    let loaded = load_model_placed::<B>(
        &path,
        WeightPlacement::Host(WeightFormat::Native),
        &Default::default(),
    )
    .unwrap();
    let model = &loaded.model;
    let tokenizer = loaded.tokenizer.as_ref().expect("GGUF tokenizer");
    let questions = [
        "What is a KV cache?",
        "Name three colours.",
        "Write a haiku about autumn leaves falling on a quiet river at dusk.",
        "2+2=",
        "Why is the sky blue? Answer in one sentence.",
        "Translate 'good morning' into French.",
        "List the planets of the solar system in order from the sun.",
        "Hi",
    ];
    let requests: Vec<Request> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let prompt = tokenizer
                .apply_chat_template(&[ChatMessage::new("user", *q)], GenerationPrompt::Add)
                .and_then(|text| tokenizer.encode(&text))
                .unwrap();
            Request {
                sampling: if i.is_multiple_of(2) {
                    SamplingConfig::greedy()
                } else {
                    SamplingConfig {
                        temperature: Some(0.7),
                        top_p: Some(0.9),
                        seed: i as u64,
                        ..SamplingConfig::greedy()
                    }
                },
                stop_strings: if i == 2 {
                    vec!["\n".into()]
                } else {
                    Vec::new()
                },
                ..Request::greedy(prompt, 24)
            }
        })
        .collect();
    let arrivals: Vec<(usize, Request)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (i * 2, r.clone()))
        .collect();
    let config = EngineConfig {
        pool: PoolSize::Tokens(4096),
        block_size: 16,
        max_running: 8,
        token_budget: 16,
        block_order: BlockOrder::Shuffled { seed: 7 },
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, Some(tokenizer), config).unwrap();
    let outcomes = run(&mut engine, &arrivals);
    assert_equal_alone(model, Some(tokenizer), &requests, &outcomes, "SmolLM2");
    // Every chat prompt starts with the same system turn: later requests found it cached.
    assert!(engine.stats().prefix_hit_tokens > 0, "{:?}", engine.stats());
}

/// Gemma 3 270M (sliding layers with a window of 512) through the engine: three requests, one
/// with a 968-token prompt, batched continuously over a paged pool, give the tokens
/// transformers gives (`kv-model/tests/fixtures/gemma3-270m-q4_k_m.json`). Needs the file
/// (`kv-bench/peers/llama_cpp.sh fetch-gemma3`); says so and checks nothing without it.
#[test]
fn gemma3_requests_past_the_window_match_transformers_through_the_engine() {
    use kv_model::{load_model_placed, WeightFormat, WeightPlacement};
    let Some(path) = kv_model::cache_dir()
        .ok()
        .map(|dir| dir.join("gemma-3-270m-q4_k_m.gguf"))
        .filter(|path| path.is_file())
    else {
        eprintln!(
            "gemma-3-270m-q4_k_m.gguf is absent: run kv-bench/peers/llama_cpp.sh fetch-gemma3"
        );
        return;
    };
    let text = std::fs::read_to_string(fixtures().join("gemma3-270m-q4_k_m.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap() as u32)
            .collect()
    };
    let loaded = load_model_placed::<B>(
        &path,
        WeightPlacement::Host(WeightFormat::F32),
        &Default::default(),
    )
    .unwrap();
    let cases = expected["cases"].as_array().unwrap();
    let arrivals: Vec<(usize, Request)> = cases
        .iter()
        .enumerate()
        .map(|(i, case)| {
            let request = Request {
                eos: EosPolicy::Ignore,
                ..Request::greedy(ids(&case["prompt_ids"]), 32)
            };
            (i, request)
        })
        .collect();
    let config = EngineConfig {
        pool: PoolSize::Tokens(4096),
        block_size: 16,
        max_running: 4,
        token_budget: 256,
        block_order: BlockOrder::Shuffled { seed: 3 },
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&loaded.model, None, config).unwrap();
    let outcomes = run(&mut engine, &arrivals);
    for (case, outcome) in cases.iter().zip(&outcomes) {
        assert_eq!(
            outcome.tokens,
            ids(&case["generated_ids"]),
            "{}",
            case["prompt"]
        );
    }
}
