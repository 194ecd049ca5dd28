//! Speculative decoding inside the continuous-batching engine: requests that draft guesses,
//! verified as extra rows of the ragged pass, give plain greedy decoding's tokens alone and
//! batched, through shuffled blocks, chunked prompts and preemption; sampled runs reproduce;
//! the pool ends whole.

use kv_core::{BlockEvent, BlockOrder};
use kv_generate::engine::{Engine, EngineConfig, EngineSpeculation, PoolSize, Request};
use kv_generate::speculative::PromptLookup;
use kv_generate::{EosPolicy, FinishReason, SamplingConfig};
use kv_model::Transformer;

use crate::engine::{
    alone, assert_events_mirror_pool, assert_pool_whole, load, mixed_request, run,
    thousand_random_requests, Outcome, Speculate, B,
};

/// The drafters every test speculates with: prompt lookup; the model itself as its draft
/// (nearly every guess kept); a random model of the same shape (most guesses rejected). All on while
/// any number of requests decode.
fn speculations<'a>(
    model: &'a Transformer<B>,
    other: &'a Transformer<B>,
) -> Vec<(&'static str, EngineSpeculation<'a>)> {
    let every = usize::MAX;
    vec![
        (
            "lookup",
            EngineSpeculation::prompt_lookup(PromptLookup::default(), 6).with_max_decoding(every),
        ),
        (
            "itself",
            EngineSpeculation::draft_model(model, 0.0, 4).with_max_decoding(every),
        ),
        (
            "random draft",
            EngineSpeculation::draft_model(other, 0.0, 3).with_max_decoding(every),
        ),
    ]
}

/// Greedy request `i`: a prompt that repeats a phrase (so lookups find guesses), 6 to 27 new
/// tokens, the model's EOS or none.
fn repeating_request(i: usize, vocab: usize) -> Request {
    let phrase: Vec<u32> = (0..3 + i % 4)
        .map(|p| ((i * 11 + p * 17 + 2) % vocab) as u32)
        .collect();
    let prompt = [
        phrase.clone(),
        vec![(i % vocab) as u32],
        phrase.clone(),
        phrase,
    ]
    .concat();
    Request {
        eos: match i % 3 {
            0 => EosPolicy::Model,
            _ => EosPolicy::Ignore,
        },
        ..Request::greedy(prompt, 6 + (i * 7) % 22)
    }
}

fn assert_same(outcomes: &[Outcome], expected: &[(Vec<u32>, Option<String>, FinishReason)]) {
    for (i, (outcome, (tokens, _, reason))) in outcomes.iter().zip(expected).enumerate() {
        assert_eq!(&outcome.tokens, tokens, "request {i}'s tokens");
        assert_eq!(&outcome.reason, reason, "request {i}'s finish");
        assert_eq!(outcome.usage.completion_tokens, tokens.len());
    }
}

#[test]
fn speculating_requests_equal_plain_greedy_alone_on_every_fixture() {
    for name in [
        "gpt2", "llama", "qwen2", "qwen3", "gemma3", "phi3", "gemma2",
    ] {
        let loaded = load(name);
        let model = &loaded.model;
        let other = Transformer::<B>::random(model.config(), 77, &Default::default()).unwrap();
        let vocab = model.config().vocab_size;
        let requests: Vec<Request> = (0..12).map(|i| repeating_request(i, vocab)).collect();
        let expected: Vec<_> = requests.iter().map(|r| alone(model, None, r)).collect();
        // Two at a time over the first steps.
        let arrivals: Vec<(usize, Request)> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| (i / 2 * 2, r.clone()))
            .collect();
        for (block_size, budget, order) in [
            (3, 9, BlockOrder::Shuffled { seed: 4 }),
            (16, 64, BlockOrder::Ascending),
        ] {
            for (drafter, speculation) in speculations(model, &other) {
                let what = format!("{name}, {drafter}, blocks of {block_size}");
                let config = EngineConfig {
                    pool: PoolSize::Tokens(2048),
                    block_size,
                    max_running: 6,
                    token_budget: budget,
                    block_order: order,
                    ..EngineConfig::default()
                };
                let mut engine = Engine::new(model, None, config)
                    .unwrap()
                    .with_speculation(speculation)
                    .unwrap();
                let outcomes = run(&mut engine, &arrivals);
                assert_same(&outcomes, &expected);
                let counts = engine.stats().speculation;
                assert!(counts.drafted_tokens > 0, "{what}: {counts:?}");
                match drafter {
                    // The draft decodes alone through a dense cache, the model batched through
                    // the pool: rounding may flip a near tie, so nearly every guess is kept.
                    "itself" => assert!(
                        counts.accepted_tokens * 10 >= counts.drafted_tokens * 9,
                        "{what}: {counts:?}"
                    ),
                    "random draft" => {
                        assert!(counts.accepted_tokens < counts.drafted_tokens, "{what}")
                    }
                    _ => {}
                }
                // Every token, a kept guess or the model's own, is counted once.
                let generated: usize = outcomes.iter().map(|o| o.tokens.len()).sum();
                assert_eq!(engine.stats().generated_tokens, generated, "{what}");
                assert_pool_whole(&engine, &what);
            }
        }
    }
}

/// A pool of 12 blocks of 4 for six requests of up to 38 positions: requests are preempted
/// with guesses pending and recompute; the tokens are still plain greedy's, and the prefix
/// cache's events report verified blocks only and mirror the pool.
#[test]
fn speculating_requests_preempted_in_a_tiny_pool_still_equal_plain_greedy() {
    let loaded = load("qwen2");
    let model = &loaded.model;
    let other = Transformer::<B>::random(model.config(), 5, &Default::default()).unwrap();
    let vocab = model.config().vocab_size;
    let requests: Vec<Request> = (0..6)
        .map(|i| Request {
            eos: EosPolicy::Ignore,
            max_new_tokens: 20,
            ..repeating_request(i + 1, vocab)
        })
        .collect();
    let expected: Vec<_> = requests.iter().map(|r| alone(model, None, r)).collect();
    let arrivals: Vec<(usize, Request)> = requests.iter().map(|r| (0, r.clone())).collect();
    for (drafter, speculation) in speculations(model, &other) {
        let config = EngineConfig {
            pool: PoolSize::Blocks(12),
            block_size: 4,
            max_running: 6,
            token_budget: 16,
            block_order: BlockOrder::Shuffled { seed: 5 },
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(model, None, config)
            .unwrap()
            .with_speculation(speculation)
            .unwrap();
        engine.record_block_events();
        let outcomes = run(&mut engine, &arrivals);
        let stats = engine.stats();
        assert!(stats.preemptions > 0, "{drafter}: {stats:?}");
        assert!(stats.speculation.drafted_tokens > 0, "{drafter}: {stats:?}");
        assert_same(&outcomes, &expected);
        assert_pool_whole(&engine, drafter);
        let computed: Vec<Vec<u32>> = requests
            .iter()
            .zip(&outcomes)
            .map(|(r, o)| [r.prompt.clone(), o.tokens.clone()].concat())
            .collect();
        let events = engine.take_block_events();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, BlockEvent::Removed { .. })),
            "{drafter}: the tiny pool evicts cached blocks"
        );
        assert_events_mirror_pool(&engine, &events, &computed, drafter);
        engine.reset_prefix_cache();
        assert_eq!(engine.take_block_events(), [BlockEvent::Cleared]);
        assert_eq!(engine.store().pool().cached_blocks(), 0);
    }
}

/// Sampled requests that speculate: the same seeds give the same tokens run after run (their
/// distribution is the model's, shown by the speculative sampler's chi-square tests), each
/// request generates what it asked for, and the pool ends whole.
#[test]
fn sampled_speculating_requests_reproduce() {
    let loaded = load("llama");
    let model = &loaded.model;
    let other = Transformer::<B>::random(model.config(), 9, &Default::default()).unwrap();
    let vocab = model.config().vocab_size;
    let requests: Vec<Request> = (0..10)
        .map(|i| Request {
            sampling: SamplingConfig {
                temperature: Some(0.8),
                top_k: Some(40),
                seed: 300 + i as u64,
                ..SamplingConfig::greedy()
            },
            eos: EosPolicy::Ignore,
            ..mixed_request(i, vocab)
        })
        .collect();
    let arrivals: Vec<(usize, Request)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.clone()))
        .collect();
    let mut drafters = 0;
    for make in [0, 1, 2] {
        let outcomes: Vec<Vec<Outcome>> = (0..2)
            .map(|_| {
                let (_, speculation) = speculations(model, &other).swap_remove(make);
                let config = EngineConfig {
                    pool: PoolSize::Tokens(1024),
                    block_size: 4,
                    ..EngineConfig::default()
                };
                let mut engine = Engine::new(model, None, config)
                    .unwrap()
                    .with_speculation(speculation)
                    .unwrap();
                let outcomes = run(&mut engine, &arrivals);
                drafters += usize::from(engine.stats().speculation.drafted_tokens > 0);
                assert_pool_whole(&engine, "sampled");
                outcomes
            })
            .collect();
        assert_eq!(outcomes[0], outcomes[1], "drafter {make}");
        for (request, outcome) in requests.iter().zip(&outcomes[0]) {
            assert_eq!(outcome.tokens.len(), request.max_new_tokens);
        }
    }
    assert_eq!(drafters, 6, "every drafter guessed");
}

/// The soak of the plain engine's tests, speculating: 1000 random sampled requests, 30%
/// cancelled mid-stream, some preempted, guesses kept and rejected: the pool ends as it
/// started, on a Llama and on a Gemma 3 whose sliding layers give blocks back as they go.
#[test]
fn a_thousand_speculating_requests_with_cancellations_leave_the_pool_as_it_started() {
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
        thousand_random_requests(&json, blocks, Speculate::PromptLookup);
    }
}

/// The second, larger real model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M as shipped): two chat
/// requests, one whose answer copies its prompt, speculating with prompt lookup through the
/// engine side by side, and the first through `Generator::speculate` alone, give plain greedy's
/// tokens. Needs the file (`kv-bench/peers/llama_cpp.sh fetch-large`, run by scripts/test.sh);
/// says so and checks nothing without it.
#[test]
fn qwen_speculation_equals_plain_greedy_alone_and_in_the_engine() {
    use kv_core::CacheConfig;
    use kv_generate::speculative::Speculation;
    use kv_generate::Generator;
    use kv_model::{
        load_model_placed, ChatMessage, GenerationPrompt, WeightFormat, WeightPlacement,
    };
    let Some(path) = kv_model::cache_dir()
        .ok()
        .map(|dir| dir.join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
        .filter(|path| path.is_file())
    else {
        eprintln!(
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf is absent: run kv-bench/peers/llama_cpp.sh \
             fetch-large"
        );
        return;
    };
    // Its Q4_K/Q6_K blocks multiplied in place by kv-kernels, as the CPU binaries run it.
    let placement = WeightPlacement::Host(WeightFormat::Native);
    let loaded = load_model_placed::<B>(&path, placement, &Default::default()).unwrap();
    let model = &loaded.model;
    let tokenizer = loaded.tokenizer.as_ref().unwrap();
    let chat = |text: &str| {
        let text = tokenizer
            .apply_chat_template(&[ChatMessage::new("user", text)], GenerationPrompt::Add)
            .unwrap();
        tokenizer.encode(&text).unwrap()
    };
    let requests = [
        chat(
            "Repeat exactly: the keeper climbed the hundred steps, trimmed the wick and wound \
             the clockwork that turned the lens.",
        ),
        chat("Rename `total` to `sum`: def f(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total"),
    ]
    .map(|prompt| Request::greedy(prompt, 32));
    let expected: Vec<_> = requests.iter().map(|r| alone(model, None, r)).collect();
    let speculation = Speculation {
        max_new_tokens: 32,
        eos: model.config().eos_token_ids.clone(),
        sampling: SamplingConfig::greedy(),
        draft_tokens: 8,
    };
    let cache = CacheConfig::Dynamic { capacity: 128 };
    let out = Generator::new(model, None)
        .speculate(
            &requests[0].prompt,
            &cache,
            &speculation,
            &mut PromptLookup::default(),
        )
        .unwrap();
    assert_eq!(out.tokens, expected[0].0);
    assert!(out.stats.accepted > 0, "{:?}", out.stats);
    let lookup = EngineSpeculation::prompt_lookup(PromptLookup::default(), 8).with_max_decoding(2);
    let mut engine = Engine::new(model, None, EngineConfig::default())
        .unwrap()
        .with_speculation(lookup)
        .unwrap();
    let arrivals: Vec<(usize, Request)> = requests.iter().map(|r| (0, r.clone())).collect();
    let outcomes = run(&mut engine, &arrivals);
    assert_same(&outcomes, &expected);
    assert!(engine.stats().speculation.accepted_tokens > 0);
}
