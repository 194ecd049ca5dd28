//! Greedy speculative decoding against plain greedy decoding: the same tokens with any
//! drafter (right, wrong or prompt lookup), on the fixtures and every cache kind that can drop
//! its last positions. A drafter that is always wrong makes every pass crop its guesses back
//! out of the cache: a key left behind would change every later token.

use crate::fixtures::fixtures;
use burn_ndarray::NdArray;
use kv_core::{CacheConfig, PagedCacheConfig};
use kv_generate::speculative::{
    Draft, DraftModel, Drafter, PromptLookup, Speculation, SpeculativeOutput,
};
use kv_generate::{CacheChoice, EosPolicy, GenerationConfig, Generator, SamplingConfig};
use kv_model::{
    load_model, load_model_placed, LoadedModel, Transformer, WeightFormat, WeightPlacement,
};

type B = NdArray;

fn load(name: &str) -> LoadedModel<B> {
    load_model::<B>(&fixtures().join(name), &Default::default()).unwrap()
}

/// Plain greedy decoding's tokens (EOS ignored).
fn greedy(loaded: &LoadedModel<B>, prompt: &[u32], n: usize) -> Vec<u32> {
    greedy_through(loaded, prompt, n, &CacheConfig::Dynamic { capacity: 16 })
}

/// Plain greedy decoding's tokens through a cache of kind `cache`.
fn greedy_through(
    loaded: &LoadedModel<B>,
    prompt: &[u32],
    n: usize,
    cache: &CacheConfig,
) -> Vec<u32> {
    let config = GenerationConfig {
        max_new_tokens: n,
        eos: EosPolicy::Ignore,
        cache: CacheChoice::Cache(cache.clone()),
        ..Default::default()
    };
    Generator::new(&loaded.model, None)
        .generate(&[prompt.to_vec()], &config, &mut |_, _| {})
        .unwrap()
        .rows
        .remove(0)
        .generated_ids
}

/// Guesses the given continuation of a known context: every guess right.
struct Oracle(Vec<u32>);

impl Drafter for Oracle {
    fn draft(&mut self, context: &[u32], max: usize) -> kv_generate::Result<Draft> {
        let at = context.len();
        Ok(self
            .0
            .iter()
            .skip(at)
            .take(max)
            .copied()
            .collect::<Vec<_>>()
            .into())
    }
}

/// Guesses a token the model never picks next, then right ones: every guess rejected.
struct Wrong(Vec<u32>);

impl Drafter for Wrong {
    fn draft(&mut self, context: &[u32], max: usize) -> kv_generate::Result<Draft> {
        let at = context.len();
        let right = self.0.get(at).copied().unwrap_or(0);
        let mut draft = vec![(right + 1) % 96];
        draft.extend(self.0.iter().skip(at + 1).take(max.saturating_sub(1)));
        draft.truncate(max);
        Ok(draft.into())
    }
}

/// Passes that generate `tokens` after the first when every guess is kept: the schedule's two
/// guesses, then two more a pass up to `most`, each pass adding its guesses and its own token.
fn passes_when_all_kept(tokens: usize, most: usize) -> usize {
    let (mut left, mut length, mut passes) = (tokens, most.min(2), 0);
    while left > 0 {
        left -= (length + 1).min(left);
        length = (length + 2).min(most);
        passes += 1;
    }
    passes
}

/// Greedy speculation of `n` tokens with up to `draft` guesses a step.
fn speculate(
    loaded: &LoadedModel<B>,
    prompt: &[u32],
    cache: &CacheConfig,
    n: usize,
    eos: &[u32],
    drafter: &mut dyn Drafter,
    draft: usize,
) -> SpeculativeOutput {
    let speculation = Speculation {
        max_new_tokens: n,
        eos: eos.to_vec(),
        sampling: SamplingConfig::greedy(),
        draft_tokens: draft,
    };
    Generator::new(&loaded.model, None)
        .speculate(prompt, cache, &speculation, drafter)
        .unwrap()
}

/// Kinds that crop by moving their end back or freeing blocks.
fn cache_kinds() -> Vec<CacheConfig> {
    vec![
        CacheConfig::Dynamic { capacity: 4 },
        CacheConfig::Static {
            max_batch: 1,
            max_len: 64,
        },
        CacheConfig::Paged(PagedCacheConfig {
            block_size: 3,
            ..Default::default()
        }),
    ]
}

/// Every kind: the dense ones, rings that wrap while guessing (a sliding window and
/// StreamingLLM sinks, shorter than one pass's five positions, so a pass evicts its own
/// guesses), and an int8 cache whose recent positions wait in its f16 residual.
/// Sink positions are the model's own (re-rotated cache ranks for rotary models).
fn every_cache_kind(model: &Transformer<B>) -> Vec<CacheConfig> {
    let mut kinds = cache_kinds();
    kinds.extend([
        CacheConfig::SlidingWindow { window: 4 },
        CacheConfig::Sink {
            sinks: 2,
            window: 4,
            positions: model.config().sink_positions(),
        },
        CacheConfig::Quantized(kv_core::QuantizedCacheConfig::default()),
    ]);
    kinds
}

#[test]
fn speculative_greedy_equals_plain_greedy_with_any_drafter_and_cache_kind() {
    // gemma2 and gemma3 have sliding layers of 4 positions, rings in the default hybrid cache.
    for name in [
        "gpt2", "llama", "qwen2", "qwen3", "phi4", "gemma2", "gemma3",
    ] {
        let loaded = load(name);
        let prompt: Vec<u32> = vec![5, 17, 42, 8, 63, 29, 77, 11, 5, 17, 42];
        let n = 24;
        for cache in every_cache_kind(&loaded.model) {
            let config = loaded.model.config();
            let has_window = (0..config.num_layers).any(|l| config.layer_window(l).is_some());
            if has_window && matches!(cache, CacheConfig::Sink { .. }) {
                continue; // refused: StreamingLLM's window over a model with its own
            }
            let expected = greedy_through(&loaded, &prompt, n, &cache);
            let whole: Vec<u32> = prompt.iter().chain(&expected).copied().collect();
            let drafters: Vec<(&str, Box<dyn Drafter>)> = vec![
                ("oracle", Box::new(Oracle(whole.clone()))),
                ("wrong", Box::new(Wrong(whole.clone()))),
                ("lookup", Box::new(PromptLookup::default())),
            ];
            for (drafter_name, mut drafter) in drafters {
                let out = speculate(&loaded, &prompt, &cache, n, &[], drafter.as_mut(), 4);
                let what = format!("{name}, {cache:?}, {drafter_name}");
                assert_eq!(out.tokens, expected, "{what}");
                let stats = out.stats;
                match drafter_name {
                    // Right guesses (2, 4, 4, ...) and one own token a pass.
                    "oracle" => {
                        assert_eq!(stats.accepted, stats.drafted, "{what}");
                        assert_eq!(stats.passes, passes_when_all_kept(n - 1, 4), "{what}");
                    }
                    "wrong" => {
                        assert_eq!(stats.accepted, 0, "{what}");
                        assert_eq!(stats.passes, n - 1, "{what}");
                    }
                    _ => assert!(stats.accepted <= stats.drafted, "{what}"),
                }
            }
        }
    }
}

/// An end-of-sequence id among a pass's accepted guesses ends generation right after it.
#[test]
fn end_of_sequence_among_accepted_guesses_ends_generation_there() {
    let loaded = load("llama");
    let prompt: Vec<u32> = vec![5, 17, 42, 8];
    let expected = greedy(&loaded, &prompt, 12);
    let whole: Vec<u32> = prompt.iter().chain(&expected).copied().collect();
    // The fifth generated token as EOS: generation stops right after it, though guesses ran on.
    let eos = expected[4];
    // (Its first occurrence, if the model produced it earlier.)
    let first = expected.iter().position(|&t| t == eos).unwrap();
    let cache = CacheConfig::Dynamic { capacity: 16 };
    let out = speculate(&loaded, &prompt, &cache, 12, &[eos], &mut Oracle(whole), 6);
    assert_eq!(out.tokens, expected[..=first]);
}

#[test]
fn prompt_lookup_finds_guesses_in_repeated_text_and_they_are_kept() {
    // The model's own greedy continuation placed in the prompt: prompt lookup guesses it.
    let loaded = load("llama");
    let seed: Vec<u32> = vec![5, 17, 42, 8, 63, 29];
    let continuation = greedy(&loaded, &seed, 20);
    let prompt: Vec<u32> = seed
        .iter()
        .chain(&continuation)
        .chain(&seed)
        .copied()
        .collect();
    let expected = greedy(&loaded, &prompt, 16);
    let cache = CacheConfig::Dynamic { capacity: 16 };
    let out = speculate(
        &loaded,
        &prompt,
        &cache,
        16,
        &[],
        &mut PromptLookup::default(),
        4,
    );
    assert_eq!(out.tokens, expected);
    assert!(
        out.stats.accepted > 0 && out.stats.passes < 15,
        "{:?}",
        out.stats
    );
}

/// Sampled speculation through a paged cache: a seed gives the same tokens every run, another
/// seed others (the distribution itself is tested on the check of one guess, in the crate).
#[test]
fn sampled_speculation_is_reproducible_by_seed() {
    let loaded = load("llama");
    let prompt: Vec<u32> = vec![5, 17, 42, 8, 63, 29, 77, 11, 5, 17, 42];
    let cache = CacheConfig::Paged(PagedCacheConfig {
        block_size: 3,
        ..Default::default()
    });
    let run = |seed: u64| {
        let speculation = Speculation {
            max_new_tokens: 24,
            eos: vec![],
            sampling: SamplingConfig {
                temperature: Some(0.8),
                top_p: Some(0.95),
                seed,
                ..SamplingConfig::greedy()
            },
            draft_tokens: 4,
        };
        Generator::new(&loaded.model, None)
            .speculate(&prompt, &cache, &speculation, &mut PromptLookup::default())
            .unwrap()
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!((&a.tokens, a.stats), (&b.tokens, b.stats));
    assert_eq!(a.tokens.len(), 24);
    assert_ne!(a.tokens, c.tokens);
}

/// A draft model with its own cache: the same model (every guess kept), the same weights in
/// another format (most kept), and a model with random weights (most rejected, so the draft's
/// cache is cropped back every pass) all give plain greedy's tokens, on every cache kind.
#[test]
fn draft_model_speculation_equals_plain_greedy() {
    for name in ["llama", "qwen2", "phi4"] {
        let loaded = load(name);
        let path = fixtures().join(name);
        let rounded = load_model_placed::<B>(
            &path,
            WeightPlacement::Host(WeightFormat::Q8_0),
            &Default::default(),
        )
        .unwrap();
        let random =
            Transformer::<B>::random(loaded.model.config(), 3, &Default::default()).unwrap();
        let prompt: Vec<u32> = vec![5, 17, 42, 8, 63, 29, 77, 11];
        let n = 20;
        let expected = greedy(&loaded, &prompt, n);
        let draft_cache = CacheConfig::Dynamic { capacity: 8 };
        for cache in cache_kinds() {
            for (draft_name, draft) in [
                ("same", &loaded.model),
                ("q8_0", &rounded.model),
                ("random", &random),
            ] {
                let mut drafter =
                    DraftModel::new(draft, &draft_cache, SamplingConfig::greedy()).unwrap();
                let out = speculate(&loaded, &prompt, &cache, n, &[], &mut drafter, 4);
                let what = format!("{name}, {cache:?}, draft {draft_name}");
                assert_eq!(out.tokens, expected, "{what}");
                let stats = out.stats;
                assert!(stats.drafted > 0, "{what}");
                if draft_name == "same" {
                    assert_eq!(stats.accepted, stats.drafted, "{what}");
                    assert_eq!(stats.passes, passes_when_all_kept(n - 1, 4), "{what}");
                }
            }
        }
    }
}

/// A draft model's guesses after its context changed (rejected guesses replaced) are those of a
/// fresh drafter given the new context: the tokens its cache held past the shared prefix are
/// cropped, not attended to.
#[test]
fn a_draft_model_follows_a_changed_context() {
    let loaded = load("llama");
    let cache = CacheConfig::Dynamic { capacity: 8 };
    let mut drafter = DraftModel::new(&loaded.model, &cache, SamplingConfig::greedy()).unwrap();
    let first = drafter.draft(&[5, 17, 42, 8], 5).unwrap();
    assert_eq!(drafter.held(), 8);
    // The model kept two guesses, then chose a token other than the third.
    let other = (first.tokens[2] + 1) % 96;
    let context = [&[5, 17, 42, 8], &first.tokens[..2], &[other]].concat();
    let again = drafter.draft(&context, 3).unwrap();
    let mut fresh = DraftModel::new(&loaded.model, &cache, SamplingConfig::greedy()).unwrap();
    assert_eq!(again, fresh.draft(&context, 3).unwrap());
    assert_eq!(drafter.held(), context.len() + 2);
    // A context the drafter has wholly seen (every guess kept) still gets guesses.
    let seen = [&context[..], &again.tokens[..2]].concat();
    let next = drafter.draft(&seen, 2).unwrap();
    assert_eq!(next, fresh.draft(&seen, 2).unwrap());
}

/// Sampled speculation with a sampling draft model (guesses drawn from the draft's
/// distribution, checked with min(1, p/q)): reproducible by seed.
#[test]
fn sampled_speculation_with_a_draft_model_is_reproducible_by_seed() {
    let loaded = load("llama");
    let random = Transformer::<B>::random(loaded.model.config(), 3, &Default::default()).unwrap();
    let prompt: Vec<u32> = vec![5, 17, 42, 8, 63, 29];
    let cache = CacheConfig::Dynamic { capacity: 8 };
    let run = |seed: u64, draft: &Transformer<B>| {
        let sampling = SamplingConfig {
            temperature: Some(0.8),
            seed,
            ..SamplingConfig::greedy()
        };
        let mut drafter = DraftModel::new(
            draft,
            &cache,
            SamplingConfig {
                seed: seed ^ 0x5eed,
                ..sampling.clone()
            },
        )
        .unwrap();
        let speculation = Speculation {
            max_new_tokens: 20,
            eos: vec![],
            sampling,
            draft_tokens: 4,
        };
        Generator::new(&loaded.model, None)
            .speculate(&prompt, &cache, &speculation, &mut drafter)
            .unwrap()
    };
    for draft in [&loaded.model, &random] {
        let (a, b, c) = (run(1, draft), run(1, draft), run(2, draft));
        assert_eq!((&a.tokens, a.stats), (&b.tokens, b.stats));
        assert_eq!(a.tokens.len(), 20);
        assert!(a.stats.drafted > 0);
        assert_ne!(a.tokens, c.tokens);
    }
    // The same model as its own draft: p == q up to rounding, so nearly every guess is kept.
    let same = run(4, &loaded.model);
    assert!(
        same.stats.accepted * 10 >= same.stats.drafted * 9,
        "{:?}",
        same.stats
    );
}

/// The default model (SmolLM2-135M-Instruct, Q4_1) on a chat prompt whose answer repeats it:
/// speculation with prompt lookup and with the model's own weights in Q4_0 as the draft gives
/// plain greedy's tokens, through a dynamic and a paged cache.
#[test]
fn smollm2_speculation_equals_plain_greedy() {
    use kv_model::{default_model, ChatMessage, GenerationPrompt};
    let path = default_model(&mut |_| {}).expect("fetch the default model");
    let loaded = load_model::<B>(&path, &Default::default()).unwrap();
    let draft = load_model_placed::<B>(
        &path,
        WeightPlacement::Host(WeightFormat::Q4_0),
        &Default::default(),
    )
    .unwrap();
    let tokenizer = loaded.tokenizer.as_ref().unwrap();
    let text = tokenizer
        .apply_chat_template(
            &[ChatMessage::new(
                "user",
                "Repeat exactly: the keeper climbed the hundred steps, trimmed the wick and \
                 wound the clockwork that turned the lens.",
            )],
            GenerationPrompt::Add,
        )
        .unwrap();
    let prompt = tokenizer.encode(&text).unwrap();
    let n = 40;
    let expected = greedy(&loaded, &prompt, n);
    for cache in [
        CacheConfig::Dynamic { capacity: 64 },
        CacheConfig::Paged(PagedCacheConfig::default()),
    ] {
        let mut lookup = PromptLookup::default();
        let out = speculate(&loaded, &prompt, &cache, n, &[], &mut lookup, 8);
        assert_eq!(out.tokens, expected, "lookup, {cache:?}");
        assert!(out.stats.accepted > 0, "{:?}", out.stats);
        let mut drafter = DraftModel::new(&draft.model, &cache, SamplingConfig::greedy()).unwrap();
        let out = speculate(&loaded, &prompt, &cache, n, &[], &mut drafter, 4);
        assert_eq!(out.tokens, expected, "draft, {cache:?}");
        // The same weights in another block format agree on most tokens.
        assert!(
            out.stats.accepted * 2 > out.stats.drafted,
            "{:?}",
            out.stats
        );
    }
}
