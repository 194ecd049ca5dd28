//! The article's experiment in miniature, on a stack of random attention layers: decode N steps
//! by re-feeding the whole sequence each time (no cache), then by feeding one token through each
//! cache kind, and check that every exact kind produces the same outputs.
//!
//! `cargo run --release -p kv-core --example decode_loop -- [steps]`

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;
use kv_core::{
    attention_mask, grouped_query_attention, AttentionPattern, CacheConfig, KeyPositions,
    LayerShape, ModelCache,
};

type B = NdArray<f32>;

const LAYERS: usize = 4;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const HIDDEN: usize = HEADS * HEAD_DIM;
const KV: usize = KV_HEADS * HEAD_DIM;

/// One attention block: `x + attention(x W_q, x W_k, x W_v) W_o`.
struct Layer {
    wq: Tensor<B, 2>,
    wk: Tensor<B, 2>,
    wv: Tensor<B, 2>,
    wo: Tensor<B, 2>,
}

fn weight(rows: usize, cols: usize) -> Tensor<B, 2> {
    let scale = 1.0 / (rows as f64).sqrt();
    Tensor::random(
        [rows, cols],
        Distribution::Normal(0.0, scale),
        &Default::default(),
    )
}

/// `[1, seq, width]` to `[1, heads, seq, head_dim]`.
fn heads(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, s, _] = x.dims();
    x.reshape([b, s, heads, HEAD_DIM]).swap_dims(1, 2)
}

/// Runs `x` `[1, new, HIDDEN]` at positions `start..start + new` through the layers, with a
/// cache or (re-feeding from position 0) without.
fn forward(
    layers: &[Layer],
    x: Tensor<B, 3>,
    start: usize,
    mut cache: Option<&mut ModelCache<B>>,
) -> Tensor<B, 3> {
    let new = x.dims()[1];
    let device = Default::default();
    let mut x = x;
    for (i, layer) in layers.iter().enumerate() {
        let q = heads(x.clone().matmul(layer.wq.clone().unsqueeze()), HEADS);
        let k = heads(x.clone().matmul(layer.wk.clone().unsqueeze()), KV_HEADS);
        let v = heads(x.clone().matmul(layer.wv.clone().unsqueeze()), KV_HEADS);
        let (k, v, positions) = match cache.as_deref_mut() {
            Some(cache) => {
                let view = cache.update(i, k, v).expect("cache update");
                (view.keys, view.values, view.positions)
            }
            None => (k, v, KeyPositions::Contiguous(0..start + new)),
        };
        let mask = attention_mask(
            start..start + new,
            &positions,
            AttentionPattern::Causal,
            None,
            &device,
        );
        let out = grouped_query_attention(q, k, v, Some(mask), None).expect("attention shapes");
        let out = out.swap_dims(1, 2).reshape([1, new, HIDDEN]);
        x = x + out.matmul(layer.wo.clone().unsqueeze());
    }
    x
}

fn main() {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let device = Default::default();
    let layers: Vec<Layer> = (0..LAYERS)
        .map(|_| Layer {
            wq: weight(HIDDEN, HIDDEN),
            wk: weight(HIDDEN, KV),
            wv: weight(HIDDEN, KV),
            wo: weight(HIDDEN, HIDDEN),
        })
        .collect();
    // The "tokens": one embedding per step, fixed up front so every run sees the same inputs.
    let inputs = Tensor::<B, 3>::random([1, steps, HIDDEN], Distribution::Default, &device);

    println!("{LAYERS} layers, {HEADS} heads ({KV_HEADS} kv), head_dim {HEAD_DIM}, {steps} steps");
    let started = Instant::now();
    let mut uncached = Vec::with_capacity(steps);
    for step in 0..steps {
        // Without a cache every step recomputes keys and values of the whole prefix.
        let out = forward(&layers, inputs.clone().narrow(1, 0, step + 1), 0, None);
        uncached.push(out.narrow(1, step, 1));
    }
    let baseline = started.elapsed().as_secs_f64();
    let expected = Tensor::cat(uncached, 1);
    println!("{:<22} {:>8.3} s", "no cache", baseline);

    let shape = LayerShape {
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    let kinds = [
        ("dynamic", CacheConfig::Dynamic { capacity: steps }),
        (
            "static",
            CacheConfig::Static {
                max_batch: 1,
                max_len: steps,
            },
        ),
        (
            "sliding (window=all)",
            CacheConfig::SlidingWindow { window: steps },
        ),
    ];
    for (name, config) in kinds {
        let mut cache =
            ModelCache::<B>::new(&config, LAYERS, shape, None, &device).expect("cache config");
        let started = Instant::now();
        let outs: Vec<_> = (0..steps)
            .map(|step| {
                forward(
                    &layers,
                    inputs.clone().narrow(1, step, 1),
                    step,
                    Some(&mut cache),
                )
            })
            .collect();
        let seconds = started.elapsed().as_secs_f64();
        let diff = (Tensor::cat(outs, 1) - expected.clone())
            .abs()
            .max()
            .into_scalar();
        println!(
            "{name:<22} {seconds:>8.3} s  speedup {:>5.1}x  max |diff| {diff:.1e}  cache {} KiB",
            baseline / seconds,
            cache.memory_bytes() / 1024
        );
        assert!(diff < 1e-4, "{name} differs from recomputation by {diff}");
    }
}
