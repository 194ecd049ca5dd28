//! Property tests: every cache kind agrees with the reference built by concatenation, and
//! attention through the cache equals attention over the full recomputation.

use crate::common::{device, max_diff, rand4, Host, Reference, B};
use kv_core::{
    attention_mask, grouped_query_attention, merge_partial_attention, partial_attention,
    reference_attention, AttentionPattern, CacheConfig, CacheError, KeyPositions, KvCache,
    LayerShape, QuantBits, QuantizedCacheConfig,
};
use proptest::prelude::*;

/// One random scenario: shapes and a sequence of update sizes (a prefill, then chunks/tokens).
#[derive(Debug, Clone)]
struct Case {
    batch: usize,
    kv_heads: usize,
    groups: usize,
    head_dim: usize,
    chunks: Vec<usize>,
    seed: u64,
}

impl Case {
    fn total(&self) -> usize {
        self.chunks.iter().sum()
    }

    fn shape(&self) -> LayerShape {
        LayerShape {
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    fn kv(
        &self,
        step: usize,
        new: usize,
    ) -> (burn::tensor::Tensor<B, 4>, burn::tensor::Tensor<B, 4>) {
        self.kv_rows(step, new, self.batch)
    }

    fn kv_rows(
        &self,
        step: usize,
        new: usize,
        batch: usize,
    ) -> (burn::tensor::Tensor<B, 4>, burn::tensor::Tensor<B, 4>) {
        let dims = [batch, self.kv_heads, new, self.head_dim];
        let seed = self.seed.wrapping_add(1000 * step as u64);
        (rand4(dims, seed), rand4(dims, seed + 1))
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        1..=2usize,
        1..=3usize,
        1..=3usize,
        prop::sample::select(vec![2usize, 4, 8]),
        1..=12usize,
        prop::collection::vec(prop_oneof![3 => Just(1usize), 1 => 2..=5usize], 1..10),
        any::<u64>(),
    )
        .prop_map(
            |(batch, kv_heads, groups, head_dim, prefill, mut rest, seed)| {
                rest.insert(0, prefill);
                Case {
                    batch,
                    kv_heads,
                    groups,
                    head_dim,
                    chunks: rest,
                    seed,
                }
            },
        )
}

/// Appends one chunk to `cache` and `reference` and checks the view and attention through it.
fn step_and_check(
    case: &Case,
    cache: &mut impl KvCache<B>,
    reference: &mut Reference,
    pattern: AttentionPattern,
    step: usize,
    new: usize,
) {
    let batch = cache.batch_size().unwrap_or(case.batch);
    let (k, v) = case.kv_rows(step, new, batch);
    let start = reference.len();
    reference.append(k.clone(), v.clone());
    let view = cache.update(k, v).unwrap();
    assert_eq!(cache.seq_len(), start + new);
    reference.assert_matches(&view);

    // Every key that a new query may see is in the view.
    let held = view.positions.to_vec();
    for q in start..start + new {
        for p in (0..=q).filter(|&p| pattern.allows(q, p)) {
            assert!(
                held.contains(&p),
                "query {q} needs position {p}, view holds {held:?}"
            );
        }
    }

    // Attention over the view equals attention over the full recomputation.
    let heads = case.kv_heads * case.groups;
    let q = rand4(
        [batch, heads, new, case.head_dim],
        case.seed ^ (step as u64 + 77),
    );
    let mask = attention_mask(
        start..start + new,
        &view.positions,
        pattern,
        None,
        &device(),
    );
    let cached =
        grouped_query_attention(q.clone(), view.keys, view.values, Some(mask), None).unwrap();
    let full = KeyPositions::Contiguous(0..start + new);
    let full_mask = attention_mask(start..start + new, &full, pattern, None, &device());
    let expected = reference_attention(
        q,
        reference.keys(),
        reference.values(),
        Some(full_mask),
        None,
    )
    .unwrap();
    let diff = max_diff(&cached, &expected);
    assert!(diff <= 1e-5, "attention differs by {diff}");
}

/// The kinds that must agree exactly, with the attention pattern each implies.
fn exact_kinds(case: &Case, window: usize, sinks: usize) -> Vec<(CacheConfig, AttentionPattern)> {
    let paged = |block_size, order| {
        (
            CacheConfig::Paged(kv_core::PagedCacheConfig {
                block_size,
                initial_blocks: 2,
                order,
            }),
            AttentionPattern::Causal,
        )
    };
    vec![
        paged(1, kv_core::BlockOrder::Shuffled { seed: case.seed }),
        paged(
            3,
            kv_core::BlockOrder::Shuffled {
                seed: case.seed + 1,
            },
        ),
        paged(16, kv_core::BlockOrder::Ascending),
        (
            CacheConfig::Dynamic { capacity: 1 },
            AttentionPattern::Causal,
        ),
        (
            CacheConfig::Dynamic { capacity: 64 },
            AttentionPattern::Causal,
        ),
        (
            CacheConfig::Static {
                max_batch: 3 * case.batch,
                max_len: case.total() + 16,
            },
            AttentionPattern::Causal,
        ),
        (
            CacheConfig::SlidingWindow { window },
            AttentionPattern::SlidingWindow { window },
        ),
        (
            CacheConfig::Sink {
                sinks,
                window,
                positions: kv_core::SinkPositions::TextPositions,
            },
            AttentionPattern::Sinks { sinks, window },
        ),
    ]
}

fn expected_held(seen: usize, sinks: usize, window: usize) -> Vec<usize> {
    let start = seen.saturating_sub(window).max(sinks);
    (0..seen.min(sinks)).chain(start..seen).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Keys/values of every kind equal the reference (bit-exact), and attention equals the
    /// full recomputation within 1e-5, over random prefill/chunk/token sequences.
    #[test]
    fn every_kind_equals_recomputation(case in case(), window in 1..8usize, sinks in 0..4usize) {
        for (config, pattern) in exact_kinds(&case, window, sinks) {
            let mut cache = config.build::<B>(case.shape(), None, &device()).unwrap();
            let mut reference = Reference::default();
            for (step, &new) in case.chunks.iter().enumerate() {
                step_and_check(&case, &mut cache, &mut reference, pattern, step, new);
            }
            let seen = case.total();
            match config {
                CacheConfig::SlidingWindow { window } => prop_assert_eq!(cache.held_len(), seen.min(window)),
                CacheConfig::Sink { sinks, window, .. } => {
                    prop_assert_eq!(cache.held_len(), expected_held(seen, sinks, window).len())
                }
                _ => prop_assert_eq!(cache.held_len(), seen),
            }
        }
    }

    /// Crop then append equals the reference rebuilt from the cropped history; windowed kinds
    /// refuse exactly the crops that need evicted positions.
    #[test]
    fn crop_then_append_equals_cropped_reference(case in case(), window in 1..8usize, sinks in 0..4usize, cut in 0.0f64..1.0) {
        for (config, pattern) in exact_kinds(&case, window, sinks) {
            let mut cache = config.build::<B>(case.shape(), None, &device()).unwrap();
            let mut reference = Reference::default();
            for (step, &new) in case.chunks.iter().enumerate() {
                step_and_check(&case, &mut cache, &mut reference, pattern, step, new);
            }
            let seen = case.total();
            let len = ((seen as f64) * cut) as usize;
            let bound = cache.max_len().filter(|_| !matches!(config, CacheConfig::Static { .. }));
            match cache.crop(len) {
                Ok(()) => {
                    prop_assert!(bound.is_none_or(|b| seen <= b) || len >= seen);
                    reference.crop(len);
                    prop_assert_eq!(cache.seq_len(), len);
                    let next = case.chunks.len();
                    step_and_check(&case, &mut cache, &mut reference, pattern, next, 1);
                    step_and_check(&case, &mut cache, &mut reference, pattern, next + 1, 3);
                }
                Err(CacheError::CropEvicted { requested, seen: s, .. }) => {
                    prop_assert_eq!((requested, s), (len, seen));
                    prop_assert!(bound.is_some_and(|b| seen > b));
                }
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
        }
    }

    /// Batch select (with repeats) and repeat equal the same operation on the reference, and
    /// later updates continue from the reordered rows.
    #[test]
    fn batch_select_and_repeat_follow_the_reference(
        case in case(),
        window in 1..8usize,
        sinks in 0..4usize,
        picks in prop::collection::vec(0..2usize, 1..4),
        times in 1..3usize,
    ) {
        let indices: Vec<usize> = picks.iter().map(|&i| i % case.batch).collect();
        for (config, pattern) in exact_kinds(&case, window, sinks) {
            let mut cache = config.build::<B>(case.shape(), None, &device()).unwrap();
            let mut reference = Reference::default();
            for (step, &new) in case.chunks.iter().enumerate() {
                step_and_check(&case, &mut cache, &mut reference, pattern, step, new);
            }
            cache.select_batch(&indices).unwrap();
            reference.select(&indices);
            prop_assert_eq!(cache.batch_size(), Some(indices.len()));
            let next = case.chunks.len();
            step_and_check(&case, &mut cache, &mut reference, pattern, next, 1);
            if indices.len() * times <= 3 * case.batch || !matches!(config, CacheConfig::Static { .. }) {
                cache.repeat_batch(times).unwrap();
                let repeated: Vec<usize> = (0..indices.len()).flat_map(|r| std::iter::repeat_n(r, times)).collect();
                reference.select(&repeated);
                step_and_check(&case, &mut cache, &mut reference, pattern, next + 1, 2);
            }
        }
    }

    /// The quantized kinds stay within their stated bound: each element within half a
    /// quantization step of its group plus its f16 rounding, the recent residual within that
    /// rounding.
    #[test]
    fn quantized_stays_within_bound(
        case in case(),
        int4 in any::<bool>(),
        group in prop::sample::select(vec![1usize, 2, 4]),
        residual in 0..6usize,
    ) {
        let bits = if int4 { QuantBits::Int4 } else { QuantBits::Int8 };
        let config = QuantizedCacheConfig { bits, group_size: group, residual_len: residual };
        let mut cache = CacheConfig::Quantized(config).build::<B>(case.shape(), None, &device()).unwrap();
        let mut reference = Reference::default();
        for (step, &new) in case.chunks.iter().enumerate() {
            let (k, v) = case.kv(step, new);
            reference.append(k.clone(), v.clone());
            let view = cache.update(k, v).unwrap();
            prop_assert_eq!(view.positions.clone(), KeyPositions::Contiguous(0..reference.len()));
            let quantized = quantized_len(&cache);
            check_bound(&Host::of(&reference.keys()), &Host::of(&view.keys), quantized, group, bits, Axis::Tokens);
            let value_group = group.min(case.head_dim);
            check_bound(&Host::of(&reference.values()), &Host::of(&view.values), quantized, value_group, bits, Axis::Channels);
            prop_assert!(reference.len() - quantized >= residual.min(reference.len()));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// `update_and_attend` answers what `update` and attention over its view answer: for the
    /// exact kinds (through the default) the attention of the full recomputation, for the
    /// quantized kinds (attention over the codes) the attention over their own widened view,
    /// through any chunking and a batch selection.
    #[test]
    fn attending_in_place_equals_attention_over_the_view(
        case in case(),
        window in 1..8usize,
        sinks in 0..4usize,
        group in prop::sample::select(vec![1usize, 2, 4]),
        residual in 0..6usize,
    ) {
        let mut kinds = exact_kinds(&case, window, sinks);
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            let config = QuantizedCacheConfig { bits, group_size: group, residual_len: residual };
            kinds.push((CacheConfig::Quantized(config), AttentionPattern::Causal));
        }
        let heads = case.kv_heads * case.groups;
        for (config, pattern) in kinds {
            let mut in_place = config.build::<B>(case.shape(), None, &device()).unwrap();
            let mut through_view = config.build::<B>(case.shape(), None, &device()).unwrap();
            prop_assert_eq!(in_place.attends_in_place(), matches!(config, CacheConfig::Quantized(_)));
            let steps = case.chunks.iter().map(|&new| (new, None)).chain([(1, Some(vec![case.batch - 1, 0])), (2, None)]);
            let mut batch = case.batch;
            for (step, (new, select)) in steps.enumerate() {
                if let Some(rows) = select {
                    in_place.select_batch(&rows).unwrap();
                    through_view.select_batch(&rows).unwrap();
                    batch = rows.len();
                }
                let (k, v) = case.kv_rows(step, new, batch);
                let q = rand4([batch, heads, new, case.head_dim], case.seed ^ (step as u64 + 91));
                let start = through_view.seq_len();
                let got = in_place.update_and_attend(q.clone(), k.clone(), v.clone()).unwrap();
                let view = through_view.update(k, v).unwrap();
                let mask = attention_mask(start..start + new, &view.positions, pattern, None, &device());
                let expected = grouped_query_attention(q, view.keys, view.values, Some(mask), None).unwrap();
                let diff = max_diff(&got, &expected);
                prop_assert!(diff <= 1e-5, "{:?} step {}: differs by {}", config, step, diff);
                prop_assert_eq!(in_place.memory_bytes(), through_view.memory_bytes());
            }
        }
    }
}

fn quantized_len(cache: &kv_core::AnyCache<B>) -> usize {
    match cache {
        kv_core::AnyCache::Quantized(q) => q.quantized_len(),
        _ => unreachable!("built as quantized"),
    }
}

/// Which axis a quantization group runs along.
#[derive(Clone, Copy)]
enum Axis {
    /// Keys: one channel over `group` tokens.
    Tokens,
    /// Values: one token over `group` channels.
    Channels,
}

/// Every element at a position below `quantized` is within half a step of its group's range
/// plus its f16 rounding; later ones within that rounding.
fn check_bound(
    exact: &Host,
    got: &Host,
    quantized: usize,
    group: usize,
    bits: QuantBits,
    axis: Axis,
) {
    let [batch, heads, seq, dim] = exact.dims;
    assert_eq!(exact.dims, got.dims);
    for b in 0..batch {
        for h in 0..heads {
            for s in 0..seq {
                for c in 0..dim {
                    let x = exact.row(b, h, s)[c];
                    let y = got.row(b, h, s)[c];
                    // Tokens wait in the f16 residual: each value is within its f16 rounding.
                    let rounding = x.abs() * 2f32.powi(-11) + 1e-7;
                    if s >= quantized {
                        assert!(
                            (x - y).abs() <= rounding,
                            "residual position {s} channel {c}: |{x} - {y}| > {rounding}"
                        );
                        continue;
                    }
                    let members: Vec<f32> = match axis {
                        Axis::Tokens => (s / group * group..s / group * group + group)
                            .map(|t| exact.row(b, h, t)[c])
                            .collect(),
                        Axis::Channels => exact.row(b, h, s)
                            [c / group * group..c / group * group + group]
                            .to_vec(),
                    };
                    let (lo, hi) = members
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(lo, hi), &m| (lo.min(m), hi.max(m)));
                    // Half a step, the step widened by rounding the stored minimum down and
                    // the scale up to f16.
                    let range = hi - lo + lo.abs().max(hi.abs()) * 2f32.powi(-10);
                    let step = range / bits.max_code() as f32 * (1.0 + 2f32.powi(-9));
                    let bound = (step + 2f32.powi(-24)) / 2.0 + rounding + 1e-6;
                    assert!(
                        (x - y).abs() <= bound,
                        "position {s} channel {c}: |{x} - {y}| > {bound}"
                    );
                }
            }
        }
    }
}

mod predicted_memory {
    use super::*;
    use kv_core::{KvCache, LayerShape, QuantBits, QuantizedCacheConfig};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

        /// The arithmetic of `CacheConfig::predicted_bytes` equals what a real cache reports
        /// after the same appends, for every kind and any chunking.
        #[test]
        fn predicted_bytes_equal_real_bytes(
            chunks in proptest::collection::vec(1usize..40, 1..12),
            batch in 1usize..3,
            capacity in 1usize..100,
        ) {
            let shape = LayerShape { kv_heads: 2, head_dim: 8 };
            let total: usize = chunks.iter().sum();
            let kinds = vec![
                CacheConfig::Dynamic { capacity },
                CacheConfig::Static { max_batch: 2, max_len: 500 },
                CacheConfig::SlidingWindow { window: 16 },
                CacheConfig::Sink { sinks: 3, window: 16, positions: kv_core::SinkPositions::TextPositions },
                CacheConfig::Quantized(QuantizedCacheConfig { bits: QuantBits::Int8, group_size: 4, residual_len: 8 }),
                CacheConfig::Quantized(QuantizedCacheConfig { bits: QuantBits::Int4, group_size: 16, residual_len: 5 }),
                CacheConfig::Paged(kv_core::PagedCacheConfig { block_size: 3, initial_blocks: 2, order: kv_core::BlockOrder::Ascending }),
            ];
            for kind in kinds {
                let mut cache = kind.build::<B>(shape, None, &device()).unwrap();
                let mut seed = 0;
                for &n in &chunks {
                    seed += 2;
                    cache.update(rand4([batch, 2, n, 8], seed), rand4([batch, 2, n, 8], seed + 1)).unwrap();
                }
                prop_assert_eq!(
                    cache.memory_bytes(),
                    kind.predicted_bytes(shape, batch, total, 4),
                    "{:?} after {:?}", kind, chunks
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Attention split by keys into parts and merged (flash-decoding's scheme, what a decode
    /// step runs on several threads) equals attention over all the keys at once.
    #[test]
    fn keys_split_into_parts_merge_to_whole_attention(
        (batch, kv_heads, groups, queries, keys, head_dim) in
            (1usize..3, 1usize..4, 1usize..4, 1usize..3, 2usize..40, 1usize..5),
        cuts in prop::collection::vec(0.0f64..1.0, 0..3),
        cap in prop::option::of(0.5f32..5.0),
        seed in 0u64..1000,
    ) {
        let cap = cap.and_then(kv_core::SoftCap::new);
        let head_dim = 2 * head_dim;
        let heads = kv_heads * groups;
        let q = rand4([batch, heads, queries, head_dim], seed);
        let k = rand4([batch, kv_heads, keys, head_dim], seed + 1).mul_scalar(3.0);
        let v = rand4([batch, kv_heads, keys, head_dim], seed + 2);
        let whole = grouped_query_attention(q.clone(), k.clone(), v.clone(), None, cap).unwrap();
        let mut bounds: Vec<usize> = cuts.iter().map(|c| 1 + (c * (keys - 1) as f64) as usize).collect();
        bounds.extend([0, keys]);
        bounds.sort_unstable();
        bounds.dedup();
        let parts = bounds
            .windows(2)
            .map(|w| {
                let slice = |t: &burn::tensor::Tensor<B, 4>| t.clone().narrow(2, w[0], w[1] - w[0]);
                partial_attention(q.clone(), slice(&k), slice(&v), cap).unwrap()
            })
            .collect();
        let merged = merge_partial_attention(parts);
        prop_assert!(max_diff(&merged, &whole) < 1e-5, "{}", max_diff(&merged, &whole));
    }
}

/// Speculative decoding's passes: each writes the current token and `guesses` guesses, then
/// keeps the token and the first `kept` guesses. `(guesses, kept)` with `kept <= guesses`.
fn passes() -> impl Strategy<Value = Vec<(usize, usize)>> {
    prop::collection::vec(
        (0..=5usize, 0..=5usize).prop_map(|(g, k)| (g, k % (g + 1))),
        1..12,
    )
}

/// The attention of one probe query at the next position over `cache`'s view after the probe
/// row is appended: what every later step reads.
fn probe(
    case: &Case,
    cache: &mut impl KvCache<B>,
    pattern: AttentionPattern,
) -> burn::tensor::Tensor<B, 4> {
    let start = cache.seq_len();
    let (k, v) = case.kv_rows(10_000, 1, case.batch);
    let view = cache.update(k, v).unwrap();
    let q = rand4(
        [case.batch, case.kv_heads * case.groups, 1, case.head_dim],
        case.seed ^ 0xabc,
    );
    let mask = attention_mask(start..start + 1, &view.positions, pattern, None, &device());
    grouped_query_attention(q, view.keys, view.values, Some(mask), None).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// After any mix of kept and rejected guesses, every exact kind (paged blocks, and rings
    /// that wrap while guessing) holds what a cache of the same kind holds when fed only the
    /// kept tokens: each pass's view equals the reference of kept rows, and a probe step
    /// attends the same over both caches. Rings keep a log of what the guesses evicted
    /// (`set_rewind`), so they rewind past wrap-around.
    #[test]
    fn rejected_guesses_leave_the_cache_as_if_never_written(
        case in case(),
        window in 1..8usize,
        sinks in 0..4usize,
        passes in passes(),
    ) {
        for (config, pattern) in exact_kinds(&case, window, sinks) {
            // A static cache with room for every pass's guesses.
            let config = match config {
                CacheConfig::Static { max_batch, .. } => CacheConfig::Static {
                    max_batch,
                    max_len: case.total() + 6 * passes.len() + 1,
                },
                other => other,
            };
            let mut cache = config.build::<B>(case.shape(), None, &device()).unwrap();
            cache.set_rewind(5);
            let mut kept_only = config.build::<B>(case.shape(), None, &device()).unwrap();
            let mut reference = Reference::default();
            for (step, &new) in case.chunks.iter().enumerate() {
                let (k, v) = case.kv(step, new);
                kept_only.update(k, v).unwrap();
                step_and_check(&case, &mut cache, &mut reference, pattern, step, new);
            }
            for (i, &(guesses, kept)) in passes.iter().enumerate() {
                let step = case.chunks.len() + i;
                let start = cache.seq_len();
                step_and_check(&case, &mut cache, &mut reference, pattern, step, 1 + guesses);
                let len = start + 1 + kept;
                cache.crop(len).unwrap();
                reference.crop(len);
                prop_assert_eq!(cache.seq_len(), len);
                let (k, v) = case.kv(step, 1 + guesses);
                kept_only.update(k.narrow(2, 0, 1 + kept), v.narrow(2, 0, 1 + kept)).unwrap();
            }
            prop_assert_eq!(cache.held_len(), kept_only.held_len());
            let diff = max_diff(&probe(&case, &mut cache, pattern), &probe(&case, &mut kept_only, pattern));
            prop_assert!(diff <= 1e-6, "{:?}: probe attention differs by {}", config, diff);
        }
    }

    /// A quantized cache whose recent residual holds a pass (`residual_len` at least the
    /// guesses) drops rejected guesses exactly: its keys and values stay within the
    /// quantization bound of the kept rows.
    #[test]
    fn rejected_guesses_leave_a_quantized_cache_within_its_bound(
        case in case(),
        int4 in any::<bool>(),
        group in prop::sample::select(vec![1usize, 2, 4]),
        passes in passes(),
    ) {
        let bits = if int4 { QuantBits::Int4 } else { QuantBits::Int8 };
        let config = QuantizedCacheConfig { bits, group_size: group, residual_len: 6 };
        let mut cache = CacheConfig::Quantized(config).build::<B>(case.shape(), None, &device()).unwrap();
        let mut reference = Reference::default();
        let chunks = case.chunks.iter().map(|&n| (n, n));
        let guessed = passes.iter().map(|&(g, k)| (1 + g, 1 + k));
        for (step, (new, keep)) in chunks.chain(guessed).enumerate() {
            let (k, v) = case.kv(step, new);
            let start = reference.len();
            reference.append(k.clone(), v.clone());
            cache.update(k, v).unwrap();
            cache.crop(start + keep).unwrap();
            reference.crop(start + keep);
        }
        let (k, v) = case.kv(10_000, 1);
        reference.append(k.clone(), v.clone());
        let view = cache.update(k, v).unwrap();
        prop_assert_eq!(view.positions.clone(), KeyPositions::Contiguous(0..reference.len()));
        let quantized = quantized_len(&cache);
        check_bound(&Host::of(&reference.keys()), &Host::of(&view.keys), quantized, group, bits, Axis::Tokens);
        check_bound(&Host::of(&reference.values()), &Host::of(&view.values), quantized, group.min(case.head_dim), bits, Axis::Channels);
    }
}
