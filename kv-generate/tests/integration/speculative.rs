//! Greedy speculative decoding against plain greedy decoding: the same tokens with any
//! drafter (right, wrong or prompt lookup), on the fixtures and every cache kind that can drop
//! its last positions. A drafter that is always wrong makes every pass crop its guesses back
//! out of the cache: a key left behind would change every later token.

use crate::fixtures::fixtures;
use burn_ndarray::NdArray;
use kv_core::{CacheConfig, PagedCacheConfig};
use kv_generate::speculative::{Drafter, PromptLookup, Speculation, SpeculativeOutput};
use kv_generate::{CacheChoice, EosPolicy, GenerationConfig, Generator, SamplingConfig};
use kv_model::{load_model, LoadedModel};

type B = NdArray;

fn load(name: &str) -> LoadedModel<B> {
    load_model::<B>(&fixtures().join(name), &Default::default()).unwrap()
}

/// Plain greedy decoding's tokens (EOS ignored).
fn greedy(loaded: &LoadedModel<B>, prompt: &[u32], n: usize) -> Vec<u32> {
    let config = GenerationConfig {
        max_new_tokens: n,
        eos: EosPolicy::Ignore,
        cache: CacheChoice::Cache(CacheConfig::Dynamic { capacity: 16 }),
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
    fn draft(&mut self, context: &[u32], max: usize) -> Vec<u32> {
        let at = context.len();
        self.0.iter().skip(at).take(max).copied().collect()
    }
}

/// Guesses a token the model never picks next, then right ones: every guess rejected.
struct Wrong(Vec<u32>);

impl Drafter for Wrong {
    fn draft(&mut self, context: &[u32], max: usize) -> Vec<u32> {
        let at = context.len();
        let right = self.0.get(at).copied().unwrap_or(0);
        let mut draft = vec![(right + 1) % 96];
        draft.extend(self.0.iter().skip(at + 1).take(max.saturating_sub(1)));
        draft.truncate(max);
        draft
    }
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

#[test]
fn speculative_greedy_equals_plain_greedy_with_any_drafter_and_cache_kind() {
    for name in ["gpt2", "llama", "qwen2", "qwen3", "phi4"] {
        let loaded = load(name);
        let prompt: Vec<u32> = vec![5, 17, 42, 8, 63, 29, 77, 11, 5, 17, 42];
        let n = 24;
        let expected = greedy(&loaded, &prompt, n);
        let whole: Vec<u32> = prompt.iter().chain(&expected).copied().collect();
        for cache in cache_kinds() {
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
                    // Four right guesses and one own token a pass.
                    "oracle" => {
                        assert_eq!(stats.accepted, stats.drafted, "{what}");
                        assert_eq!(stats.passes, (n - 1).div_ceil(5), "{what}");
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
