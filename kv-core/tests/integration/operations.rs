//! Unit tests of each operation of each kind, their edge cases and their errors.

use crate::common::{assert_legacy_equal, device, max_diff, rand4, Host, Reference, B};
use burn::tensor::Tensor;
use kv_core::{
    attention_mask, causal_mask, grouped_query_attention, padding_mask, reference_attention,
    window_mask, AttentionMask, AttentionPattern, CacheConfig, CacheError, DynamicCache,
    KeyPositions, KeyRotation, KvCache, LayerShape, ModelCache, QuantBits, QuantizedCache,
    QuantizedCacheConfig, RotaryTable, SinkCache, SlidingWindowCache, SoftCap, StaticCache,
    StaticCacheConfig,
};

const SHAPE: LayerShape = LayerShape {
    kv_heads: 2,
    head_dim: 4,
};

fn kv(batch: usize, new: usize, seed: u64) -> (Tensor<B, 4>, Tensor<B, 4>) {
    (
        rand4([batch, 2, new, 4], seed),
        rand4([batch, 2, new, 4], seed + 1),
    )
}

fn every_kind() -> Vec<CacheConfig> {
    vec![
        CacheConfig::Dynamic { capacity: 4 },
        CacheConfig::Static {
            max_batch: 2,
            max_len: 32,
        },
        CacheConfig::SlidingWindow { window: 3 },
        CacheConfig::Sink {
            sinks: 1,
            window: 3,
            positions: kv_core::SinkPositions::TextPositions,
        },
        CacheConfig::Quantized(QuantizedCacheConfig {
            bits: QuantBits::Int8,
            group_size: 2,
            residual_len: 2,
        }),
        CacheConfig::Paged(kv_core::PagedCacheConfig {
            block_size: 3,
            initial_blocks: 1,
            order: kv_core::BlockOrder::Shuffled { seed: 5 },
        }),
    ]
}

#[test]
fn empty_caches_report_nothing_and_accept_batch_ops() {
    for config in every_kind() {
        let mut cache = config.build::<B>(SHAPE, None, &device()).unwrap();
        assert_eq!(
            (cache.seq_len(), cache.held_len(), cache.batch_size()),
            (0, 0, None),
            "{config:?}"
        );
        cache.crop(0).unwrap();
        cache.select_batch(&[0]).unwrap();
        cache.repeat_batch(2).unwrap();
        assert_eq!(cache.seq_len(), 0);
    }
}

#[test]
fn every_kind_rejects_bad_updates_with_the_numbers() {
    for config in every_kind() {
        let mut cache = config.build::<B>(SHAPE, None, &device()).unwrap();
        let (k, v) = kv(1, 2, 1);
        let err = cache.update(k.clone(), rand4([1, 2, 3, 4], 9)).unwrap_err();
        assert_eq!(
            err,
            CacheError::KeyValueMismatch {
                keys: [1, 2, 2, 4],
                values: [1, 2, 3, 4]
            }
        );
        assert!(err.to_string().contains("[1, 2, 2, 4]"));
        cache.update(k, v).unwrap();
        let wrong = rand4([1, 3, 1, 4], 5);
        let err = cache.update(wrong.clone(), wrong).unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::ShapeMismatch {
                    kv_heads: 2,
                    got: [1, 3, 1, 4],
                    ..
                }
            ),
            "{config:?}: {err}"
        );
        let empty = Tensor::<B, 4>::zeros([1, 2, 0, 4], &device());
        assert_eq!(
            cache.update(empty.clone(), empty).unwrap_err(),
            CacheError::EmptyUpdate
        );
        assert_eq!(
            cache.select_batch(&[1]).unwrap_err(),
            CacheError::BatchIndexOutOfRange { index: 1, batch: 1 }
        );
        assert_eq!(
            cache.select_batch(&[]).unwrap_err(),
            CacheError::EmptyBatchSelection
        );
        assert_eq!(cache.repeat_batch(0).unwrap_err(), CacheError::ZeroRepeat);
        assert_eq!(cache.seq_len(), 2, "a refused update changes nothing");
    }
}

#[test]
fn reset_forgets_everything_but_the_configuration() {
    for config in every_kind() {
        let mut cache = config.build::<B>(SHAPE, None, &device()).unwrap();
        let (k, v) = kv(2, 5, 3);
        cache.update(k, v).unwrap();
        cache.reset();
        assert_eq!(
            (cache.seq_len(), cache.batch_size()),
            (0, None),
            "{config:?}"
        );
        // A new batch size is accepted after a reset.
        let (k, v) = kv(1, 2, 4);
        let view = cache.update(k.clone(), v).unwrap();
        // Exact, but for the quantized kind's f16 residual (values in [-1, 1]: 2^-11 apart).
        let tolerance = match config {
            CacheConfig::Quantized(_) => 2f32.powi(-11),
            _ => 0.0,
        };
        assert!(max_diff(&view.keys, &k) <= tolerance, "{config:?}");
    }
}

#[test]
fn crop_to_zero_then_refill() {
    for config in [
        CacheConfig::Dynamic { capacity: 4 },
        CacheConfig::Static {
            max_batch: 1,
            max_len: 8,
        },
    ] {
        let mut cache = config.build::<B>(SHAPE, None, &device()).unwrap();
        let (k, v) = kv(1, 6, 1);
        cache.update(k, v).unwrap();
        cache.crop(0).unwrap();
        assert_eq!(cache.seq_len(), 0);
        let (k, v) = kv(1, 3, 2);
        let view = cache.update(k.clone(), v).unwrap();
        assert_eq!(view.positions, KeyPositions::Contiguous(0..3));
        assert_eq!(max_diff(&view.keys, &k), 0.0);
    }
}

#[test]
fn dynamic_grows_geometrically_and_reports_its_buffer() {
    let mut cache = DynamicCache::<B>::new();
    let mut capacities = vec![];
    for step in 0..300 {
        let (k, v) = kv(1, 1, step);
        cache.update(k, v).unwrap();
        if capacities.last() != Some(&cache.capacity()) {
            capacities.push(cache.capacity());
        }
    }
    assert_eq!(capacities, vec![64, 128, 256, 512]);
    // [1, 2, 512, 4] keys and values in f32.
    assert_eq!(cache.memory_bytes(), 2 * 2 * 512 * 4 * 4);
    let preallocated = DynamicCache::<B>::with_capacity(300);
    assert_eq!(
        preallocated.capacity(),
        0,
        "nothing is allocated before the first update"
    );
}

#[test]
fn static_cache_full_and_gap_errors_say_what_fits() {
    let config = StaticCacheConfig {
        max_batch: 2,
        kv_heads: 2,
        max_len: 5,
        head_dim: 4,
    };
    let mut cache = StaticCache::<B>::new(config, &device()).unwrap();
    assert_eq!(
        cache.memory_bytes(),
        2 * 2 * 2 * 5 * 4 * 4,
        "preallocated in full"
    );
    let (k, v) = kv(1, 4, 1);
    cache.update(k, v).unwrap();
    let (k, v) = kv(1, 2, 2);
    let err = cache.update(k, v).unwrap_err();
    assert_eq!(
        err,
        CacheError::CapacityExceeded {
            capacity: 5,
            held: 4,
            requested: 2
        }
    );
    assert!(
        err.to_string()
            .contains("room for 5 positions, 4 are in use and 2 more"),
        "{err}"
    );
    let (k, v) = kv(1, 1, 3);
    assert_eq!(
        cache.write_at(6, k.clone(), v.clone()).unwrap_err(),
        CacheError::PositionGap {
            position: 6,
            held: 4
        }
    );
    // The last free slot, then full.
    cache.update(k.clone(), v.clone()).unwrap();
    assert!(matches!(
        cache.update(k, v),
        Err(CacheError::CapacityExceeded {
            held: 5,
            requested: 1,
            ..
        })
    ));
    let (k, v) = kv(3, 1, 4);
    let mut fresh = StaticCache::<B>::new(config, &device()).unwrap();
    assert_eq!(
        fresh.update(k, v).unwrap_err(),
        CacheError::BatchTooLarge {
            max_batch: 2,
            requested: 3
        }
    );
    assert!(StaticCache::<B>::new(
        StaticCacheConfig {
            max_len: 0,
            ..config
        },
        &device()
    )
    .is_err());
}

#[test]
fn static_write_at_rewinds_like_crop_then_append() {
    let config = StaticCacheConfig {
        max_batch: 1,
        kv_heads: 2,
        max_len: 8,
        head_dim: 4,
    };
    let mut cache = StaticCache::<B>::new(config, &device()).unwrap();
    let mut reference = Reference::default();
    let (k, v) = kv(1, 6, 1);
    reference.append(k.clone(), v.clone());
    cache.update(k, v).unwrap();
    let (k, v) = kv(1, 2, 2);
    reference.crop(3);
    reference.append(k.clone(), v.clone());
    let view = cache.write_at(3, k, v).unwrap();
    assert_eq!(cache.seq_len(), 5);
    reference.assert_matches(&view);
}

#[test]
fn sliding_window_prefill_longer_than_window() {
    let mut cache = SlidingWindowCache::<B>::new(3).unwrap();
    let mut reference = Reference::default();
    let (k, v) = kv(1, 7, 1);
    reference.append(k.clone(), v.clone());
    let view = cache.update(k, v).unwrap();
    // The prefill's queries see the whole prompt (under the window mask)...
    assert_eq!(view.positions.to_vec(), (0..7).collect::<Vec<_>>());
    reference.assert_matches(&view);
    // ...and only the last 3 positions are kept.
    assert_eq!(cache.held_positions(), vec![4, 5, 6]);
    assert_eq!(cache.memory_bytes(), 2 * 2 * 3 * 4 * 4);
    let (k, v) = kv(1, 1, 2);
    reference.append(k.clone(), v.clone());
    let view = cache.update(k, v).unwrap();
    // Ring order: slot 7 % 3 = 1 holds the new token.
    assert_eq!(view.positions, KeyPositions::Slots(vec![6, 7, 5]));
    reference.assert_matches(&view);
    assert_eq!(
        cache.crop(2).unwrap_err(),
        CacheError::CropEvicted {
            requested: 2,
            oldest_kept: 5,
            seen: 8
        }
    );
    assert!(SlidingWindowCache::<B>::new(0).is_err());
}

#[test]
fn sink_cache_keeps_sinks_and_window() {
    let mut cache = SinkCache::<B>::new(2, 3).unwrap();
    let mut reference = Reference::default();
    for step in 0..9 {
        let (k, v) = kv(1, 1, step);
        reference.append(k.clone(), v.clone());
        let view = cache.update(k, v).unwrap();
        reference.assert_matches(&view);
    }
    assert_eq!(cache.held_positions(), vec![0, 1, 6, 7, 8]);
    assert_eq!(cache.max_len(), Some(5));
    assert_eq!(cache.key_rotation(), KeyRotation::AppliedByCaller);
}

/// With a rotary table, the sink cache rotates stored (unrotated) keys at their rank in the
/// cache: before eviction that equals rotating at text positions; after, the window's keys sit
/// right after the sinks.
#[test]
fn sink_cache_rotates_keys_at_cache_positions() {
    let rope = || RotaryTable::<B>::new(4, 10_000.0, &device()).unwrap();
    let mut cache = SinkCache::with_rotary(2, 3, rope()).unwrap();
    assert_eq!(cache.key_rotation(), KeyRotation::AppliedByCache);
    let mut reference = Reference::default();
    let mut rotary = rope();
    for step in 0..8 {
        let (k, v) = kv(1, 1, step);
        reference.append(k.clone(), v.clone());
        let view = cache.update(k, v).unwrap();
        let held = cache.held_positions();
        // Expected: the held unrotated keys, in cache order, rotated at ranks 0..held.
        let index = Tensor::from_data(
            burn::tensor::TensorData::new(
                held.iter().map(|&p| p as i64).collect::<Vec<_>>(),
                [held.len()],
            ),
            &device(),
        );
        let expected = rotary.apply(
            reference.keys().select(2, index),
            &(0..held.len()).collect::<Vec<_>>(),
        );
        // The view is in slot order: compare slot by slot through the positions.
        let (got, want) = (Host::of(&view.keys), Host::of(&expected));
        for slot in 0..view.slots() {
            let rank = held
                .iter()
                .position(|&p| p == view.positions.get(slot))
                .unwrap();
            for h in 0..2 {
                let diff = got
                    .row(0, h, slot)
                    .iter()
                    .zip(want.row(0, h, rank))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-6, "step {step} slot {slot}: {diff}");
            }
        }
        assert_eq!(
            view.query_rotary_positions,
            Some(held.len() - 1..held.len())
        );
    }
}

#[test]
fn quantized_int4_packs_two_elements_per_byte() {
    let config = QuantizedCacheConfig {
        bits: QuantBits::Int4,
        group_size: 4,
        residual_len: 4,
    };
    let mut cache = QuantizedCache::<B>::new(config).unwrap();
    let (k, v) = kv(1, 12, 1);
    cache.update(k, v).unwrap();
    assert_eq!(cache.quantized_len(), 8);
    // Codes: 8 tokens x 2 heads x 4 channels / 2 per byte, for keys and values.
    let codes = 2 * (8 * 2 * 4 / 2);
    // f16 key scale+min: 2 groups x 2 heads x 4 channels; value scale+min: 8 tokens x 2 heads
    // x 1 group.
    let params = 2 * 2 * (2 * 2 * 4 + 8 * 2);
    // f16 keys and values of 4 tokens x 2 heads x 4 channels.
    let residual = 2 * 4 * 2 * 4 * 2;
    assert_eq!(cache.memory_bytes(), codes + params + residual);
    let int8 = QuantizedCacheConfig {
        bits: QuantBits::Int8,
        ..config
    };
    let mut cache8 = QuantizedCache::<B>::new(int8).unwrap();
    let (k, v) = kv(1, 12, 1);
    cache8.update(k, v).unwrap();
    assert_eq!(cache8.memory_bytes(), 2 * codes + params + residual);
}

#[test]
fn quantized_crop_inside_a_group_keeps_the_bound() {
    let config = QuantizedCacheConfig {
        bits: QuantBits::Int8,
        group_size: 4,
        residual_len: 2,
    };
    let mut cache = QuantizedCache::<B>::new(config).unwrap();
    let (k, v) = kv(1, 14, 1);
    let before = cache.update(k, v).unwrap();
    assert_eq!(cache.quantized_len(), 12);
    cache.crop(6).unwrap();
    assert_eq!((cache.seq_len(), cache.quantized_len()), (6, 4));
    let (k, v) = kv(1, 1, 2);
    let after = cache.update(k, v).unwrap();
    // Positions 0..6 read back as they did before the crop: 0..4 exactly (still codes), 4..6
    // within f16 rounding (their group was cut, so they went back to the f16 residual).
    for (after, before) in [(&after.keys, &before.keys), (&after.values, &before.values)] {
        let (after, before) = (after.clone(), before.clone());
        assert_eq!(
            max_diff(
                &after.clone().narrow(2, 0, 4),
                &before.clone().narrow(2, 0, 4)
            ),
            0.0
        );
        assert!(max_diff(&after.narrow(2, 4, 2), &before.narrow(2, 4, 2)) <= 2f32.powi(-11));
    }
}

#[test]
fn quantized_rejects_group_sizes_that_do_not_fit() {
    let config = QuantizedCacheConfig {
        bits: QuantBits::Int4,
        group_size: 3,
        residual_len: 0,
    };
    let mut cache = QuantizedCache::<B>::new(config).unwrap();
    let (k, v) = kv(1, 2, 1);
    let err = cache.update(k, v).unwrap_err();
    assert!(
        err.to_string()
            .contains("head_dim 4 is not a multiple of the value group size 3"),
        "{err}"
    );
    assert!(QuantizedCache::<B>::new(QuantizedCacheConfig {
        group_size: 0,
        ..config
    })
    .is_err());
}

#[test]
fn quantized_refuses_values_past_f16_and_mismatched_queries_and_stays_unchanged() {
    let config = QuantizedCacheConfig {
        bits: QuantBits::Int8,
        group_size: 2,
        residual_len: 2,
    };
    let mut cache = QuantizedCache::<B>::new(config).unwrap();
    let (k, v) = kv(1, 5, 1);
    cache.update(k, v).unwrap();
    let bytes = cache.memory_bytes();
    // A value past f16 in the second head only: nothing of the update is stored.
    let (k, _) = kv(1, 1, 2);
    let big = Tensor::<B, 4>::ones([1, 1, 1, 4], &device()).mul_scalar(1e5);
    let v = Tensor::cat(vec![k.clone().narrow(1, 0, 1), big], 1);
    assert_eq!(
        cache.update(k.clone(), v).unwrap_err(),
        CacheError::OutOfHalfRange { value: 1e5 }
    );
    assert_eq!((cache.seq_len(), cache.memory_bytes()), (5, bytes));
    // Five query heads cannot share two key/value heads.
    let q = rand4([1, 5, 1, 4], 3);
    assert!(matches!(
        cache
            .update_and_attend(q, k.clone(), k.clone())
            .unwrap_err(),
        CacheError::QueryShape {
            queries: [1, 5, 1, 4],
            keys: [1, 2, 1, 4]
        }
    ));
    assert_eq!(cache.seq_len(), 5);
}

#[test]
fn legacy_round_trip_is_lossless_and_continues() {
    let layers: Vec<_> = (0..3).map(|l| kv(2, 5, l)).collect();
    let mut cache = ModelCache::<B, DynamicCache<B>>::from_legacy(layers.clone()).unwrap();
    assert_legacy_equal(&cache, &layers);
    assert_eq!(cache.next_positions(1), 5..6);
    let step: Vec<_> = (0..3).map(|l| kv(2, 1, 10 + l)).collect();
    for (layer, (k, v)) in step.iter().enumerate() {
        cache.update(layer, k.clone(), v.clone()).unwrap();
    }
    let expected: Vec<_> = layers
        .iter()
        .zip(&step)
        .map(|((k, v), (nk, nv))| {
            (
                Tensor::cat(vec![k.clone(), nk.clone()], 2),
                Tensor::cat(vec![v.clone(), nv.clone()], 2),
            )
        })
        .collect();
    assert_legacy_equal(&cache, &expected);
    let bad = vec![kv(1, 5, 1), kv(1, 4, 2)];
    assert_eq!(
        ModelCache::<B, DynamicCache<B>>::from_legacy(bad).unwrap_err(),
        CacheError::LegacyLengthMismatch {
            layer: 1,
            expected: 5,
            got: 4
        }
    );
}

#[test]
fn model_cache_applies_operations_to_every_layer() {
    let config = CacheConfig::Dynamic { capacity: 8 };
    let mut cache = ModelCache::<B>::new(&config, 3, SHAPE, None, &device()).unwrap();
    for layer in 0..3 {
        let (k, v) = kv(2, 4, layer as u64);
        cache.update(layer, k, v).unwrap();
    }
    let (k, v) = kv(2, 1, 0);
    assert_eq!(
        cache.update(3, k, v).unwrap_err(),
        CacheError::LayerOutOfRange {
            layer: 3,
            layers: 3
        }
    );
    cache.repeat_batch(2).unwrap();
    cache.crop(2).unwrap();
    assert!(cache
        .layers()
        .iter()
        .all(|l| l.batch_size() == Some(4) && l.seq_len() == 2));
    assert_eq!(cache.memory_bytes(), 3 * 2 * 4 * 2 * 64 * 4 * 4);
    cache.reset();
    assert_eq!(cache.seq_len(), 0);
}

#[test]
fn masks_have_the_documented_shapes_and_values() {
    let mask: Vec<bool> = causal_mask::<B>(2, 3, &device())
        .to_data()
        .to_vec()
        .unwrap();
    // Queries at 3 and 4 over keys 0..5: true = hidden.
    assert_eq!(
        mask,
        vec![false, false, false, false, true, false, false, false, false, false]
    );
    let mask: Vec<bool> = window_mask::<B>(1, 4, 2, &device())
        .to_data()
        .to_vec()
        .unwrap();
    assert_eq!(mask, vec![true, true, true, false, false]);
    let pattern = AttentionPattern::Sinks {
        sinks: 1,
        window: 2,
    };
    assert_eq!(
        (0..6).filter(|&k| pattern.allows(5, k)).collect::<Vec<_>>(),
        vec![0, 4, 5]
    );
    let padding = AttentionMask::left_padded(&[2, 3], 3).unwrap();
    let dims = padding_mask::<B>(&padding, &device()).dims();
    assert_eq!(dims, [2, 1, 1, 3]);
}

#[test]
fn padded_queries_never_see_an_empty_row() {
    // Row 0 is left-padded by two: its first two queries would see no key at all.
    let padding = AttentionMask::left_padded(&[1, 3], 3).unwrap();
    let mask = attention_mask::<B>(
        0..3,
        &KeyPositions::Contiguous(0..3),
        AttentionPattern::Causal,
        Some(&padding),
        &device(),
    );
    let data: Vec<bool> = mask.clone().to_data().to_vec().unwrap();
    assert_eq!(
        &data[..9],
        &[false, false, false, false, false, false, true, true, false]
    );
    let q = rand4([2, 2, 3, 4], 1);
    let (k, v) = kv(2, 3, 2);
    let out: Vec<f32> = grouped_query_attention(q, k, v, Some(mask), None)
        .unwrap()
        .to_data()
        .to_vec()
        .unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
}

#[test]
fn position_ids_skip_padding_and_extend() {
    let mut mask = AttentionMask::left_padded(&[2, 4], 4).unwrap();
    assert_eq!(
        mask.position_ids(0..4),
        vec![vec![1, 1, 0, 1], vec![0, 1, 2, 3]]
    );
    mask.extend(2);
    assert_eq!(mask.len(), 6);
    assert_eq!(mask.position_ids(4..6), vec![vec![2, 3], vec![4, 5]]);
    assert!(AttentionMask::left_padded(&[5], 4).is_err());
    assert_eq!(
        AttentionMask::from_rows(vec![vec![true], vec![true, false]]).unwrap_err(),
        CacheError::MaskRowLength {
            row: 1,
            expected: 1,
            got: 2
        }
    );
}

#[test]
fn grouped_query_attention_equals_the_reference_with_repeated_heads() {
    let q = rand4([2, 6, 3, 8], 1);
    let (k, v) = (rand4([2, 2, 7, 8], 2), rand4([2, 2, 7, 8], 3));
    let mask = causal_mask::<B>(3, 4, &device());
    let fast =
        grouped_query_attention(q.clone(), k.clone(), v.clone(), Some(mask.clone()), None).unwrap();
    let slow = reference_attention(q, k, v, Some(mask), None).unwrap();
    assert!(max_diff(&fast, &slow) < 1e-5);
    let err = reference_attention(
        rand4([1, 3, 1, 8], 1),
        rand4([1, 2, 4, 8], 2),
        rand4([1, 2, 4, 8], 3),
        None,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, CacheError::AttentionShape { .. }));
}

/// A decode step (one query, nothing masked) takes its own path through two batched products;
/// it must equal the reference, grouped heads included, and so must an unmasked prompt, with
/// and without soft-capped scores (the cap small enough to change them).
#[test]
fn unmasked_single_query_attention_equals_the_reference() {
    for cap in [None, SoftCap::new(0.5)] {
        for (queries, seed) in [(1, 10), (3, 20)] {
            let q = rand4([2, 6, queries, 8], seed);
            let (k, v) = (rand4([2, 2, 9, 8], seed + 1), rand4([2, 2, 9, 8], seed + 2));
            let fast = grouped_query_attention(q.clone(), k.clone(), v.clone(), None, cap).unwrap();
            let slow = reference_attention(q.clone(), k.clone(), v.clone(), None, cap).unwrap();
            assert_eq!(fast.dims(), [2, 6, queries, 8]);
            assert!(max_diff(&fast, &slow) < 1e-5, "{queries} queries, {cap:?}");
            if cap.is_some() {
                let plain = reference_attention(q, k, v, None, None).unwrap();
                assert!(max_diff(&plain, &slow) > 1e-3, "the cap changes the output");
            }
        }
    }
}

/// Rotary embeddings make q·k depend only on the distance between positions.
#[test]
fn rotary_scores_depend_only_on_relative_position() {
    let mut rope = RotaryTable::<B>::new(8, 10_000.0, &device()).unwrap();
    let (q, k) = (rand4([1, 1, 1, 8], 1), rand4([1, 1, 1, 8], 2));
    let score = |rope: &mut RotaryTable<B>, m: usize, n: usize| {
        let qm = rope.apply(q.clone(), &[m]);
        let kn = rope.apply(k.clone(), &[n]);
        qm.matmul(kn.swap_dims(2, 3)).into_scalar()
    };
    let near = score(&mut rope, 5, 2);
    let far = score(&mut rope, 1005, 1002);
    assert!((near - far).abs() < 1e-3, "{near} vs {far}");
    assert!((score(&mut rope, 0, 0) - q.matmul(k.swap_dims(2, 3)).into_scalar()).abs() < 1e-6);
    assert!(RotaryTable::<B>::new(7, 10_000.0, &device()).is_err());
}

#[test]
fn rotate_matches_apply_per_batch_row() {
    let mut table = RotaryTable::<B>::new(4, 10_000.0, &device()).unwrap();
    let x = rand4([2, 2, 3, 4], 90);
    let shared = table.rotate(x.clone(), &[vec![5, 6, 7]]);
    assert!(max_diff(&shared, &table.apply(x.clone(), &[5, 6, 7])) < 1e-6);

    // Per-row positions: each batch row rotated as if alone.
    let rows = [vec![0, 1, 2], vec![300, 301, 302]];
    let per_row = table.rotate(x.clone(), &rows);
    for (b, row) in rows.iter().enumerate() {
        let alone = table.apply(x.clone().narrow(0, b, 1), row);
        assert!(max_diff(&per_row.clone().narrow(0, b, 1), &alone) < 1e-5);
    }
    // And the rows really differ, so the test would notice one row's positions used for both.
    assert!(max_diff(&per_row.clone().narrow(0, 0, 1), &per_row.narrow(0, 1, 1)) > 1e-2);
}

#[test]
fn a_paged_cache_with_empty_blocks_is_an_error_not_a_panic() {
    let config = CacheConfig::Paged(kv_core::PagedCacheConfig::for_sequences(0, 2, 10));
    let error = config.build::<B>(SHAPE, None, &device()).unwrap_err();
    assert_eq!(error, CacheError::ZeroBlockSize);
    assert!(error.to_string().contains("block size must be at least 1"));
}

#[test]
fn each_kind_names_the_attention_pattern_it_matches() {
    let patterns: Vec<AttentionPattern> = every_kind()
        .iter()
        .map(|config| {
            config
                .build::<B>(SHAPE, None, &device())
                .unwrap()
                .attention_pattern()
        })
        .collect();
    assert_eq!(
        patterns,
        vec![
            AttentionPattern::Causal,
            AttentionPattern::Causal,
            AttentionPattern::SlidingWindow { window: 3 },
            AttentionPattern::Sinks {
                sinks: 1,
                window: 3
            },
            AttentionPattern::Causal,
            AttentionPattern::Causal,
        ]
    );
}
