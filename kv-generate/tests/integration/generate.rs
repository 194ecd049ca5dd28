//! The generation engine on the tiny reference models: greedy tokens equal transformers' with
//! no cache and every exact cache kind, batches equal single runs, prompt caches continue
//! without recomputation, stop strings and streaming behave.

use crate::fixtures::{expected, fixtures, ids};
use burn_ndarray::NdArray;
use kv_core::{CacheConfig, QuantBits, QuantizedCacheConfig};
use kv_generate::{
    BeamSearchConfig, CacheChoice, EarlyStopping, EosPolicy, FinishReason, GenerationConfig,
    Generator, SamplingConfig, TextStream,
};
use kv_model::{load_model, LoadedModel};

type B = NdArray<f32>;

fn load(name: &str) -> LoadedModel<B> {
    load_model::<B>(&fixtures().join(name), &Default::default()).unwrap()
}

fn every_cache(len: usize) -> Vec<CacheChoice> {
    vec![
        CacheChoice::None,
        CacheChoice::Cache(CacheConfig::Dynamic { capacity: 4 }),
        CacheChoice::Cache(CacheConfig::Static {
            max_batch: 4,
            max_len: len,
        }),
        CacheChoice::Cache(CacheConfig::SlidingWindow { window: len }),
        CacheChoice::Cache(CacheConfig::Sink {
            sinks: 2,
            window: len,
            positions: kv_core::SinkPositions::TextPositions,
        }),
        CacheChoice::Cache(CacheConfig::Paged(kv_core::PagedCacheConfig {
            block_size: 1,
            initial_blocks: 2,
            order: kv_core::BlockOrder::Shuffled { seed: 3 },
        })),
        CacheChoice::Cache(CacheConfig::Paged(kv_core::PagedCacheConfig {
            block_size: 3,
            initial_blocks: 2,
            order: kv_core::BlockOrder::Shuffled { seed: 4 },
        })),
        CacheChoice::Cache(CacheConfig::Paged(
            kv_core::PagedCacheConfig::for_sequences(16, 1, len),
        )),
    ]
}

fn greedy(max_new_tokens: usize, cache: CacheChoice) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        eos: EosPolicy::Ignore,
        cache,
        ..GenerationConfig::default()
    }
}

#[test]
fn greedy_tokens_equal_transformers_with_and_without_every_cache() {
    for name in ["gpt2", "llama", "qwen2"] {
        let loaded = load(name);
        let generator = Generator::new(&loaded.model, None);
        let expected = expected(name);
        let prompt = ids(&expected["prompt"]);
        let reference = ids(&expected["greedy_with_cache"]);
        for cache in every_cache(prompt.len() + reference.len()) {
            let out = generator
                .generate(
                    std::slice::from_ref(&prompt),
                    &greedy(reference.len(), cache.clone()),
                    &mut |_, _| {},
                )
                .unwrap();
            assert_eq!(out.rows[0].generated_ids, reference, "{name}, {cache:?}");
            assert_eq!(out.rows[0].finish_reason, FinishReason::Length);
            assert_eq!(out.cache_kind, cache.name());
            assert_eq!(
                out.cache_bytes == 0,
                cache == CacheChoice::None,
                "{cache:?}"
            );
            assert_eq!(out.timings.generated, reference.len());
        }
    }
}

#[test]
fn eos_ends_a_row_and_is_kept() {
    // The llama fixture's greedy continuation reaches token 1 (its EOS) at step 8.
    let loaded = load("llama");
    let generator = Generator::new(&loaded.model, None);
    let expected = expected("llama");
    let prompt = ids(&expected["prompt"]);
    let reference = ids(&expected["greedy_with_cache"]);
    let first_eos = reference.iter().position(|&id| id == 1).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 32,
        ..GenerationConfig::default()
    };
    let out = generator
        .generate(&[prompt], &config, &mut |_, _| {})
        .unwrap();
    assert_eq!(out.rows[0].generated_ids, reference[..=first_eos]);
    assert_eq!(out.rows[0].finish_reason, FinishReason::Eos);
}

#[test]
fn a_batch_equals_each_prompt_alone() {
    for name in ["gpt2", "llama"] {
        let loaded = load(name);
        let generator = Generator::new(&loaded.model, None);
        let prompts = vec![
            vec![5, 17, 42, 8, 63, 29, 77, 11],
            vec![9, 33, 50],
            vec![70, 2, 44, 13, 6],
        ];
        // Row 1 stops early at its own EOS choice: the first token it generates alone.
        let alone_1 = generator
            .generate(
                &prompts[1..2],
                &greedy(12, CacheChoice::None),
                &mut |_, _| {},
            )
            .unwrap();
        let eos = EosPolicy::Ids(vec![alone_1.rows[0].generated_ids[3]]);
        for cache in [
            CacheChoice::None,
            CacheChoice::Cache(CacheConfig::Dynamic { capacity: 8 }),
        ] {
            let config = GenerationConfig {
                eos: eos.clone(),
                ..greedy(12, cache.clone())
            };
            let batch = generator
                .generate(&prompts, &config, &mut |_, _| {})
                .unwrap();
            for (i, prompt) in prompts.iter().enumerate() {
                let alone = generator
                    .generate(std::slice::from_ref(prompt), &config, &mut |_, _| {})
                    .unwrap();
                assert_eq!(
                    batch.rows[i].generated_ids, alone.rows[0].generated_ids,
                    "{name} row {i} {cache:?}"
                );
                assert_eq!(batch.rows[i].finish_reason, alone.rows[0].finish_reason);
            }
            assert!(
                batch.rows[1].generated_ids.len() <= 4,
                "row 1 stopped early"
            );
        }
    }
}

#[test]
fn a_prompt_cache_continues_several_ways_without_recomputing_the_prefix() {
    let loaded = load("llama");
    let generator = Generator::new(&loaded.model, None);
    let prefix = vec![5, 17, 42, 8, 63, 29];
    let continuations = vec![vec![], vec![77], vec![11, 40, 3]];
    let prefilled = generator
        .prefill(&prefix, &CacheConfig::Dynamic { capacity: 8 })
        .unwrap();
    let held = prefilled.cache().memory_bytes();
    let config = greedy(10, CacheChoice::Cache(CacheConfig::Dynamic { capacity: 8 }));
    let together = generator
        .continue_from(&prefilled, &continuations, &config, &mut |_, _| {})
        .unwrap();
    for (i, suffix) in continuations.iter().enumerate() {
        let full = [prefix.clone(), suffix.clone()].concat();
        let alone = generator
            .generate(std::slice::from_ref(&full), &config, &mut |_, _| {})
            .unwrap();
        assert_eq!(
            together.rows[i].generated_ids, alone.rows[0].generated_ids,
            "row {i}"
        );
        assert_eq!(together.rows[i].prompt_ids, full);
        // Forking one at a time works too, and leaves the prefix untouched.
        let one = generator
            .continue_from(
                &prefilled,
                std::slice::from_ref(suffix),
                &config,
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!(one.rows[0].generated_ids, alone.rows[0].generated_ids);
    }
    assert_eq!(prefilled.cache().seq_len(), prefix.len());
    assert_eq!(prefilled.cache().memory_bytes(), held);
}

#[test]
fn quantized_caches_generate_and_report_their_bytes() {
    let loaded = load("llama");
    let generator = Generator::new(&loaded.model, None);
    let prompt = ids(&expected("llama")["prompt"]);
    let mut bytes = Vec::new();
    for bits in [QuantBits::Int8, QuantBits::Int4] {
        let cache = CacheChoice::Cache(CacheConfig::Quantized(QuantizedCacheConfig {
            bits,
            group_size: 8,
            residual_len: 8,
        }));
        let out = generator
            .generate(
                std::slice::from_ref(&prompt),
                &greedy(24, cache),
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!(out.rows[0].generated_ids.len(), 24);
        bytes.push(out.cache_bytes);
    }
    assert!(
        bytes[1] < bytes[0],
        "int4 holds fewer bytes than int8: {bytes:?}"
    );
}

#[test]
fn seeded_sampling_repeats_and_differs_by_seed() {
    let loaded = load("llama");
    let generator = Generator::new(&loaded.model, None);
    let prompt = ids(&expected("llama")["prompt"]);
    let sampled = |seed: u64| {
        let config = GenerationConfig {
            sampling: SamplingConfig {
                temperature: Some(1.5),
                top_k: Some(20),
                seed,
                ..SamplingConfig::greedy()
            },
            ..greedy(24, CacheChoice::Cache(CacheConfig::Dynamic { capacity: 8 }))
        };
        generator
            .generate(std::slice::from_ref(&prompt), &config, &mut |_, _| {})
            .unwrap()
            .rows[0]
            .generated_ids
            .clone()
    };
    assert_eq!(sampled(1), sampled(1));
    assert_ne!(sampled(1), sampled(2));
}

#[test]
fn stop_strings_spanning_tokens_end_the_row_and_streaming_matches_the_text() {
    // The tiny GGUF's vocabulary is one character per token.
    let loaded = load("tiny-llama.gguf");
    let tokenizer = loaded.tokenizer.as_ref().unwrap();
    let generator = Generator::new(&loaded.model, Some(tokenizer));
    let prompt = vec![5, 17, 42, 8, 63, 29, 77, 11];
    let free = generator
        .generate(
            std::slice::from_ref(&prompt),
            &greedy(20, CacheChoice::None),
            &mut |_, _| {},
        )
        .unwrap();
    let text = free.rows[0].text.clone().unwrap();
    assert_eq!(text.chars().count(), 20);
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[6..9].iter().collect();
    let cut = text.find(&stop).unwrap();

    let mut streamed = String::new();
    let config = GenerationConfig {
        stop_strings: vec![stop.clone()],
        ..greedy(20, CacheChoice::Cache(CacheConfig::Dynamic { capacity: 8 }))
    };
    let out = generator
        .generate(&[prompt], &config, &mut |_, piece| streamed.push_str(piece))
        .unwrap();
    let row = &out.rows[0];
    assert_eq!(row.finish_reason, FinishReason::StopString);
    assert_eq!(row.text.as_deref(), Some(&text[..cut]));
    assert_eq!(
        streamed,
        text[..cut],
        "streamed text never shows the stop string"
    );
}

#[test]
fn bad_requests_are_errors() {
    let loaded = load("llama");
    let generator = Generator::new(&loaded.model, None);
    let run = |prompts: &[Vec<u32>], config: &GenerationConfig| {
        generator
            .generate(prompts, config, &mut |_, _| {})
            .unwrap_err()
            .to_string()
    };
    let config = GenerationConfig::default();
    assert!(run(&[vec![]], &config).contains("at least one token"));
    assert!(run(&[vec![1, 500]], &config).contains("token id 500"));
    let stops = GenerationConfig {
        stop_strings: vec!["x".into()],
        ..config.clone()
    };
    assert!(run(&[vec![1]], &stops).contains("tokenizer"));
    let small = GenerationConfig {
        cache: CacheChoice::Cache(CacheConfig::Static {
            max_batch: 1,
            max_len: 10,
        }),
        max_new_tokens: 8,
        ..config.clone()
    };
    assert!(run(&[vec![1; 4]], &small).contains("static cache of 10"));
    let top_p = GenerationConfig {
        sampling: SamplingConfig {
            temperature: Some(1.0),
            top_p: Some(2.0),
            ..SamplingConfig::greedy()
        },
        ..config
    };
    assert!(run(&[vec![1]], &top_p).contains("top-p"));
}

#[test]
fn streaming_emits_whole_characters_only() {
    // SmolLM2's byte-level tokens split CJK characters and emoji across tokens.
    let path = kv_model::default_model(&mut |_| {}).expect("default model");
    let file = kv_model::gguf::GgufFile::open(&path).unwrap();
    let tokenizer = kv_model::Tokenizer::from_gguf(&file).unwrap();
    let text = "你好，世界 🦀🚀 naïve";
    let ids = tokenizer.encode(text).unwrap();
    assert!(ids.len() > text.chars().count() / 2);
    let mut stream = TextStream::new();
    let mut pieces = Vec::new();
    for id in ids {
        if let Some(piece) = stream.push(&tokenizer, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "half a character in {piece:?}");
            pieces.push(piece);
        }
    }
    pieces.extend(stream.flush(&tokenizer).unwrap());
    assert_eq!(pieces.concat(), text);
    assert!(pieces.len() > 1);
}

/// The llama fixture was built for 128 positions. Through a sink cache that re-rotates its
/// keys, generation runs on past them with the tokens of the model's own sink loop; through a
/// dynamic cache or none it is refused before any work, with an error naming the limit, and
/// allowed right up to it.
#[test]
fn a_sink_cache_generates_past_the_model_context_and_other_caches_refuse() {
    let loaded = load("llama");
    let model = &loaded.model;
    let max = model.config().max_positions;
    assert_eq!(max, 128);
    let generator = Generator::new(model, None);
    let prompt: Vec<u32> = (0..100u32).map(|i| (i * 11 + 5) % 90).collect();
    let sink = CacheConfig::Sink {
        sinks: 4,
        window: 28,
        positions: model.config().sink_positions(),
    };
    let out = generator
        .generate(
            std::slice::from_ref(&prompt),
            &greedy(60, CacheChoice::Cache(sink.clone())),
            &mut |_, _| {},
        )
        .unwrap();
    let generated = &out.rows[0].generated_ids;
    assert_eq!(generated.len(), 60);

    // The same loop by hand: the prompt, then each greedy token, through the model's cache.
    let mut cache = model.new_cache(&sink).unwrap();
    let mut input = prompt.clone();
    let mut by_hand = Vec::new();
    for _ in 0..60 {
        let logits = model
            .forward(&[input], None, Some(&mut cache), kv_model::Logits::Last)
            .unwrap();
        let row = logits.into_data().to_vec::<f32>().unwrap();
        let next = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap() as u32;
        by_hand.push(next);
        input = vec![next];
    }
    assert_eq!(generated, &by_hand);

    for cache in [
        CacheChoice::None,
        CacheChoice::Cache(CacheConfig::Dynamic { capacity: 16 }),
    ] {
        let err = generator
            .generate(
                std::slice::from_ref(&prompt),
                &greedy(60, cache.clone()),
                &mut |_, _| {},
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                kv_generate::GenerateError::PastModelContext {
                    prompt: 100,
                    new: 60,
                    max: 128
                }
            ),
            "{cache:?}: {err}"
        );
        assert!(err.to_string().contains("128"), "{err}");
        // 100 prompt positions and 28 fed-back tokens fill exactly 128 positions.
        let fits = generator
            .generate(
                std::slice::from_ref(&prompt),
                &greedy(29, cache.clone()),
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!(fits.rows[0].generated_ids.len(), 29, "{cache:?}");
    }
}

/// One beam-search case from `scripts/make_fixtures.py`.
fn beam_case(case: &serde_json::Value) -> (GenerationConfig, BeamSearchConfig) {
    let early = match &case["early_stopping"] {
        serde_json::Value::Bool(true) => EarlyStopping::WhenFull,
        serde_json::Value::Bool(false) => EarlyStopping::Heuristic,
        other => other.as_str().unwrap().parse().unwrap(),
    };
    let settings = GenerationConfig {
        max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
        eos: EosPolicy::Ids(ids(&case["eos_token_ids"])),
        ..GenerationConfig::default()
    };
    let beams = BeamSearchConfig {
        num_beams: case["num_beams"].as_u64().unwrap() as usize,
        num_return_sequences: case["num_return_sequences"].as_u64().unwrap() as usize,
        length_penalty: case["length_penalty"].as_f64().unwrap() as f32,
        early_stopping: early,
    };
    (settings, beams)
}

#[test]
fn beam_search_equals_transformers_with_and_without_every_cache() {
    for name in ["gpt2", "llama", "qwen2"] {
        let loaded = load(name);
        let generator = Generator::new(&loaded.model, None);
        let fixture = crate::fixtures::read_json(&format!("{name}/beam.json"));
        let prompt = ids(&fixture["prompt"]);
        for case in fixture["cases"].as_array().unwrap() {
            let (settings, beams) = beam_case(case);
            let len = prompt.len() + settings.max_new_tokens;
            let mut caches = every_cache(len);
            caches[2] = CacheChoice::Cache(CacheConfig::Static {
                max_batch: beams.num_beams,
                max_len: len,
            });
            let expected = case["sequences"].as_array().unwrap();
            for cache in caches {
                let settings = GenerationConfig {
                    cache: cache.clone(),
                    ..settings.clone()
                };
                let out = generator.beam_search(&prompt, &settings, &beams).unwrap();
                let what = format!("{name}, {beams:?}, {cache:?}");
                assert_eq!(out.sequences.len(), expected.len(), "{what}");
                for (got, want) in out.sequences.iter().zip(expected) {
                    assert_eq!(got.generated_ids, ids(&want["generated_ids"]), "{what}");
                    let score = want["score"].as_f64().unwrap() as f32;
                    assert!(
                        (got.score - score).abs() <= 1e-4 * score.abs().max(1.0),
                        "{what}: score {} against transformers' {score}",
                        got.score
                    );
                    let eos =
                        settings.eos == EosPolicy::Ids(vec![*got.generated_ids.last().unwrap()]);
                    assert_eq!(got.finish_reason == FinishReason::Eos, eos, "{what}");
                }
                assert_eq!(out.cache_bytes == 0, cache == CacheChoice::None, "{what}");
            }
        }
    }
}

#[test]
fn beam_search_refuses_what_it_cannot_honour() {
    let loaded = load("llama");
    let generator = Generator::new(&loaded.model, None);
    let settings = greedy(4, CacheChoice::Cache(CacheConfig::Dynamic { capacity: 4 }));
    let beams = BeamSearchConfig::default();
    let refused = |settings: &GenerationConfig, beams: &BeamSearchConfig| {
        generator
            .beam_search(&[5, 17, 42], settings, beams)
            .unwrap_err()
            .to_string()
    };
    let message = refused(
        &settings,
        &BeamSearchConfig {
            num_return_sequences: 5,
            ..beams.clone()
        },
    );
    assert!(
        message.contains("between 1 and num_beams (4), got 5"),
        "{message}"
    );
    let message = refused(
        &settings,
        &BeamSearchConfig {
            num_beams: 0,
            ..beams.clone()
        },
    );
    assert!(
        message.contains("num_beams must be at least 1"),
        "{message}"
    );
    // 49 beams need 98 candidates; the fixture's vocabulary has 96.
    let message = refused(
        &settings,
        &BeamSearchConfig {
            num_beams: 49,
            ..beams.clone()
        },
    );
    assert!(message.contains("vocabulary has 96"), "{message}");
    let sampled = GenerationConfig {
        sampling: SamplingConfig {
            temperature: Some(0.7),
            ..SamplingConfig::greedy()
        },
        ..settings.clone()
    };
    assert!(refused(&sampled, &beams).contains("chooses by score"));
    let small_static = greedy(
        4,
        CacheChoice::Cache(CacheConfig::Static {
            max_batch: 2,
            max_len: 16,
        }),
    );
    let message = refused(&small_static, &beams);
    assert!(
        message.contains("4 rows do not fit a static cache of 2 rows"),
        "{message}"
    );
}
