//! One forward pass over a ragged batch through a paged store
//! (`Transformer::forward_ragged`): sequences of different lengths, joining at different
//! steps, fed in chunks of different sizes beside single decode tokens, get the logits each
//! gets alone; and what the pass cannot honour is an error.

use crate::common::*;
use burn::tensor::backend::Backend;
use kv_core::{BlockOrder, KvDtype, SequenceId};
use kv_model::{
    BatchPiece, Logits, ModelConfig, ModelError, Transformer, WeightFormat, WeightPlacement,
};

/// Token ids of sequence `i`: lengths 7, 12, 5, 9, drawn from the vocabulary.
fn sequence(i: usize, vocab: usize) -> Vec<u32> {
    let len = [7, 12, 5, 9][i % 4];
    (0..len)
        .map(|p| ((i * 31 + p * 17 + 3) % vocab) as u32)
        .collect()
}

/// The chunk sizes sequence `i` is fed in: a prompt chunk, then single tokens and chunks mixed.
fn chunks(i: usize, len: usize) -> Vec<usize> {
    let pattern = [
        [4, 1, 3, 1, 2],
        [12, 1, 1, 1, 1],
        [1, 2, 2, 1, 1],
        [5, 1, 3, 1, 1],
    ][i % 4];
    let mut sizes = Vec::new();
    let mut at = 0;
    for &size in pattern.iter().cycle() {
        if at == len {
            break;
        }
        let size = size.min(len - at);
        sizes.push(size);
        at += size;
    }
    sizes
}

/// Feeds four sequences through `store` in ragged steps (sequence `i` joins at step `i`, one
/// chunk per step), every position's logits asked for, and returns the largest difference
/// from each sequence's logits computed alone without a cache.
fn worst_difference<Bk: Backend>(
    model: &Transformer<Bk>,
    block_size: usize,
    order: BlockOrder,
) -> f32 {
    worst_difference_in(model, block_size, order, KvDtype::F32)
}

/// [`worst_difference`] with the store's keys and values kept as `dtype`.
fn worst_difference_in<Bk: Backend>(
    model: &Transformer<Bk>,
    block_size: usize,
    order: BlockOrder,
    dtype: KvDtype,
) -> f32 {
    let vocab = model.config().vocab_size;
    let sequences: Vec<Vec<u32>> = (0..4).map(|i| sequence(i, vocab)).collect();
    let plans: Vec<Vec<usize>> = sequences
        .iter()
        .enumerate()
        .map(|(i, s)| chunks(i, s.len()))
        .collect();
    let alone: Vec<Vec<Vec<f32>>> = sequences
        .iter()
        .map(|s| {
            host_logits(
                model
                    .forward_uncached(std::slice::from_ref(s), None, Logits::All)
                    .unwrap(),
            )
            .remove(0)
        })
        .collect();
    let mut store = model
        .new_paged_store_in(64, block_size, order, dtype)
        .expect("a host model's pool takes any dtype");
    let ids: Vec<SequenceId> = sequences
        .iter()
        .map(|s| store.add_sequence(&s[..1]).0)
        .collect();
    let mut done = vec![0; 4];
    let mut worst = 0.0f32;
    for step in 0..20 {
        let mut pieces = Vec::new();
        for i in 0..4 {
            let chunk = step as isize - i as isize;
            if chunk < 0 || chunk as usize >= plans[i].len() {
                continue;
            }
            let n = plans[i][chunk as usize];
            let start = done[i];
            store
                .reserve(ids[i], &sequences[i][start..start + n])
                .unwrap();
            pieces.push((i, start, n));
            done[i] += n;
        }
        if pieces.is_empty() {
            continue;
        }
        let batch: Vec<BatchPiece<'_>> = pieces
            .iter()
            .map(|&(i, start, n)| BatchPiece {
                sequence: ids[i],
                tokens: &sequences[i][start..start + n],
                start,
                logits: Some(Logits::All),
            })
            .collect();
        let logits = model.forward_ragged(&mut store, &batch).unwrap();
        let rows: Vec<f32> = logits.into_data().convert::<f32>().into_vec().unwrap();
        let mut row = rows.chunks_exact(vocab);
        for &(i, start, n) in &pieces {
            for expected in &alone[i][start..start + n] {
                worst = worst.max(max_abs_diff(row.next().unwrap(), expected));
            }
        }
    }
    assert_eq!(done, sequences.iter().map(Vec::len).collect::<Vec<_>>());
    for id in ids {
        store.free(id);
    }
    assert_eq!(store.pool().free_blocks(), 64);
    store.pool().audit().unwrap();
    worst
}

const ORDERS: [(usize, BlockOrder); 3] = [
    (1, BlockOrder::Shuffled { seed: 1 }),
    (3, BlockOrder::Shuffled { seed: 2 }),
    (16, BlockOrder::Ascending),
];

#[test]
fn ragged_steps_equal_each_sequence_alone_on_every_fixture() {
    for name in ["gpt2", "llama", "qwen2"] {
        let model = load(name);
        for (block_size, order) in ORDERS {
            let worst = worst_difference(&model, block_size, order);
            assert!(worst < 1e-4, "{name}, blocks of {block_size}: {worst}");
        }
    }
}

/// The host path (matrices in host memory, kv-kernels' products, as CPU binaries run).
#[test]
fn ragged_steps_equal_each_sequence_alone_with_host_matrices() {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128
    });
    let config = ModelConfig::from_hf_json(&json, "host").unwrap();
    for format in [WeightFormat::F32, WeightFormat::Q8_0] {
        let model =
            Transformer::<B>::random_placed(&config, 5, WeightPlacement::Host(format), &device())
                .unwrap();
        for (block_size, order) in ORDERS {
            let worst = worst_difference(&model, block_size, order);
            assert!(worst < 1e-4, "{format:?}, blocks of {block_size}: {worst}");
        }
    }
}

/// A pool of `f16`s or 8-bit rows: every position's logits stay within a stated distance of
/// the uncached model's (f32 keys and values: under 1e-4), through chunks, single tokens and
/// scattered blocks; a device model's pool refuses them.
#[test]
fn narrow_pools_stay_within_their_bound() {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128
    });
    let config = ModelConfig::from_hf_json(&json, "host").unwrap();
    let model = Transformer::<B>::random_placed(
        &config,
        5,
        WeightPlacement::Host(WeightFormat::F32),
        &device(),
    )
    .unwrap();
    for (dtype, bound) in [(KvDtype::F16, 2e-3), (KvDtype::Int8, 2e-2)] {
        for (block_size, order) in ORDERS {
            let worst = worst_difference_in(&model, block_size, order, dtype);
            eprintln!("{dtype} pool, blocks of {block_size}: largest logit difference {worst}");
            assert!(
                worst < bound,
                "{dtype}, blocks of {block_size}: {worst} (bound {bound})"
            );
            assert!(worst > 0.0, "{dtype} changes the numbers at all");
        }
    }
    let device_model = load("llama");
    assert!(device_model
        .new_paged_store_in(8, 4, BlockOrder::Ascending, KvDtype::Int8)
        .is_none());
}

#[test]
fn what_a_ragged_pass_cannot_honour_is_an_error() {
    let model = load("llama");
    let mut store = model.new_paged_store(8, 4, BlockOrder::Ascending);
    let (a, _) = store.add_sequence(&[1, 2, 3]);
    store.reserve(a, &[1, 2, 3]).unwrap();
    let piece = |tokens: &'static [u32], start| BatchPiece {
        sequence: a,
        tokens,
        start,
        logits: Some(Logits::Last),
    };
    // Positions 3..5 were never reserved.
    let err = model
        .forward_ragged(&mut store, &[piece(&[4, 5], 3)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::UnreservedPositions {
                piece: 0,
                start: 3,
                end: 5,
                held: 3
            }
        ),
        "{err}"
    );
    // One sequence twice in a batch.
    let err = model
        .forward_ragged(&mut store, &[piece(&[1], 0), piece(&[2], 1)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::RepeatedSequence {
                first: 0,
                piece: 1,
                ..
            }
        ),
        "{err}"
    );
    // A freed sequence, an empty piece, an id outside the vocabulary.
    store.free(a);
    let err = model
        .forward_ragged(&mut store, &[piece(&[1], 0)])
        .unwrap_err();
    assert!(err.to_string().contains("sequence"), "{err}");
    let (b, _) = store.add_sequence(&[1]);
    store.reserve(b, &[1]).unwrap();
    let empty = BatchPiece {
        sequence: b,
        tokens: &[],
        start: 0,
        logits: None,
    };
    assert!(matches!(
        model.forward_ragged(&mut store, &[empty]).unwrap_err(),
        ModelError::NoTokens
    ));
    let vocab = model.config().vocab_size as u32;
    let outside = [vocab];
    let bad = BatchPiece {
        sequence: b,
        tokens: &outside,
        start: 0,
        logits: None,
    };
    assert!(model.forward_ragged(&mut store, &[bad]).is_err());
    // Nothing was written or leaked: the store still serves the good piece.
    let good = BatchPiece {
        sequence: b,
        tokens: &[1],
        start: 0,
        logits: Some(Logits::Last),
    };
    assert_eq!(
        model.forward_ragged(&mut store, &[good]).unwrap().dims(),
        [1, vocab as usize]
    );
}
