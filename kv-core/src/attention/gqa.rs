//! Scaled dot-product attention over cached keys and values, grouped-query aware.

use burn::tensor::{
    activation::softmax, backend::Backend, module::attention, ops::AttentionModuleOptions, Bool,
    Tensor,
};

use kv_kernels::attention::SoftCap;

use crate::{error::Result, CacheError};

/// `cap · tanh(scores / cap)` where `cap` is set (Gemma 2's attention-logit soft-capping).
fn soft_cap<B: Backend>(scores: Tensor<B, 4>, cap: Option<SoftCap>) -> Tensor<B, 4> {
    match cap {
        Some(cap) => scores.div_scalar(cap.get()).tanh().mul_scalar(cap.get()),
        None => scores,
    }
}

/// Checks `q` `[b, h, n, d]`, `k`/`v` `[b, kv, s, d]` and returns `(heads / kv_heads)`.
fn groups(q: &[usize; 4], k: &[usize; 4], v: &[usize; 4]) -> Result<usize> {
    let fits = q[0] == k[0] && k == v && q[3] == k[3] && k[1] > 0 && q[1].is_multiple_of(k[1]);
    if !fits {
        return Err(CacheError::AttentionShape {
            query: *q,
            key: *k,
            value: *v,
        });
    }
    Ok(q[1] / k[1])
}

/// Repeats each key/value head `groups` times: `[b, kv, s, d]` to `[b, kv * groups, s, d]`,
/// head `i` of the result being head `i / groups` of the input.
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
    if groups == 1 {
        return x;
    }
    let [b, kv, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, groups, s, d])
        .reshape([b, kv * groups, s, d])
}

/// The textbook computation, for tests to compare against:
/// `softmax(cap(q kᵀ / sqrt(d)) + mask) v`, with key/value heads repeated for grouped-query
/// attention and `cap` the soft-capping where one is given.
///
/// Shapes: `q` `[batch, heads, queries, head_dim]`, `k`/`v` `[batch, kv_heads, keys, head_dim]`,
/// `mask` `[batch or 1, 1, queries, keys]` with `true` = hidden. Returns
/// `[batch, heads, queries, head_dim]`.
pub fn reference_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    cap: Option<SoftCap>,
) -> Result<Tensor<B, 4>> {
    let [b, h, n, d] = q.dims();
    let groups = groups(&q.dims(), &k.dims(), &v.dims())?;
    let s = k.dims()[2];
    let (k, v) = (repeat_kv(k, groups), repeat_kv(v, groups));
    let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((d as f32).sqrt());
    let scores = soft_cap(scores, cap);
    let scores = match mask {
        Some(mask) => scores.mask_fill(mask.expand([b, h, n, s]), f32::MIN),
        None => scores,
    };
    Ok(softmax(scores, 3).matmul(v))
}

/// Lays a `[batch or 1, 1, queries, keys]` mask out for [`grouped_query_attention`]'s folded
/// query rows: `[batch, kv_heads, groups * queries, keys]`, with `groups = heads / kv_heads`.
///
/// [`grouped_query_attention`] does this itself for an unfolded mask, on every call: a copy of
/// `kv_heads * groups` masks (2.4 MB per layer for a 512-token prompt of SmolLM2-135M). A model
/// whose layers share one mask folds it once per forward pass and gives every layer the result.
///
/// ```
/// use burn::tensor::{Bool, Tensor};
/// use burn_ndarray::NdArray;
/// use kv_core::{fold_mask_for_groups, grouped_query_attention};
///
/// let device = Default::default();
/// let q = Tensor::<NdArray, 4>::ones([1, 6, 3, 8], &device); // 6 query heads, 3 queries
/// let k = Tensor::<NdArray, 4>::ones([1, 2, 5, 8], &device); // 2 key/value heads, 5 keys
/// let mask = Tensor::<NdArray, 4, Bool>::from_data([[[[false; 5]; 3]]], &device);
/// let folded = fold_mask_for_groups(mask.clone(), 1, 2, 3);
/// assert_eq!(folded.dims(), [1, 2, 9, 5]);
/// let a = grouped_query_attention(q.clone(), k.clone(), k.clone(), Some(mask), None).unwrap();
/// let b = grouped_query_attention(q, k.clone(), k, Some(folded), None).unwrap();
/// assert_eq!(a.into_data(), b.into_data());
/// ```
pub fn fold_mask_for_groups<B: Backend>(
    mask: Tensor<B, 4, Bool>,
    batch: usize,
    kv_heads: usize,
    groups: usize,
) -> Tensor<B, 4, Bool> {
    let [rows, _, queries, keys] = mask.dims();
    mask.reshape([rows, 1, 1, queries, keys])
        .expand([batch, kv_heads, groups, queries, keys])
        .reshape([batch, kv_heads, groups * queries, keys])
}

/// Attention for inference through burn's fused `attention` op, grouped-query aware without
/// copying keys or values: the `heads / kv_heads` query heads that share a key/value head are
/// folded into its query rows, `[b, h, n, d]` to `[b, kv, (h / kv) * n, d]`.
///
/// Shapes as [`reference_attention`]; `mask` may also come folded by
/// [`fold_mask_for_groups`]. Every query row must see at least one key (the masks of
/// [`crate::attention_mask`] ensure this). Scores are `q kᵀ / sqrt(d)`, soft-capped by `cap`
/// where one is given (Gemma 2).
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::grouped_query_attention;
///
/// let device = Default::default();
/// let q = Tensor::<NdArray, 4>::ones([1, 6, 1, 8], &device); // 6 query heads
/// let k = Tensor::<NdArray, 4>::ones([1, 2, 5, 8], &device); // 2 key/value heads
/// let out = grouped_query_attention(q, k.clone(), k, None, None).unwrap();
/// assert_eq!(out.dims(), [1, 6, 1, 8]);
/// ```
pub fn grouped_query_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    cap: Option<SoftCap>,
) -> Result<Tensor<B, 4>> {
    let [b, h, n, d] = q.dims();
    let groups = groups(&q.dims(), &k.dims(), &v.dims())?;
    let [_, kv, s, _] = k.dims();
    let q = q.reshape([b, kv, groups * n, d]);
    if mask.is_none() && n == 1 {
        // A decode step: one query row per head, nothing hidden. Two batched matrix products
        // read the keys and values as they lie (the transpose is a view), which CPU backends
        // run on their vectorised product kernels; their fused attention op walks one query
        // at a time and grows costlier with every cached position.
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (d as f64).sqrt());
        let out = softmax(soft_cap(scores, cap), 3).matmul(v);
        return Ok(out.reshape([b, h, n, d]));
    }
    let mask = mask.map(|mask| {
        if mask.dims() == [b, kv, groups * n, s] {
            mask // folded already (fold_mask_for_groups)
        } else {
            fold_mask_for_groups(mask, b, kv, groups)
        }
    });
    let options = AttentionModuleOptions {
        softcap: cap.map(|cap| cap.get() as f64),
        ..Default::default()
    };
    let out = attention(q, k, v, mask, None, options);
    Ok(out.reshape([b, h, n, d]))
}

/// Attention of every query over one slice of the keys, kept apart so that slices computed
/// on different threads can be merged exactly ([`merge_partial_attention`]): the split-keys
/// scheme of flash-decoding. Each part holds its unnormalised output and the two numbers
/// softmax needs per query row, its largest score and the sum of `exp(score - largest)`.
///
/// Shapes: `[batch, heads, queries, head_dim]` for `weighted`, `[batch, heads, queries, 1]`
/// for `max` and `sum`.
#[derive(Debug, Clone)]
pub struct PartialAttention<B: Backend> {
    /// `Σ_j exp(s_j - max) v_j` over the part's keys.
    pub weighted: Tensor<B, 4>,
    /// `max_j s_j`, the largest scaled score.
    pub max: Tensor<B, 4>,
    /// `Σ_j exp(s_j - max)`.
    pub sum: Tensor<B, 4>,
}

/// [`PartialAttention`] of `q` `[batch, heads, queries, head_dim]` over `k`/`v`
/// `[batch, kv_heads, keys, head_dim]` (a slice of the cache), grouped-query aware, with no
/// mask: every query sees every key of the slice (a decode step's query sees the whole cache).
/// Scores soft-capped by `cap` where one is given.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use burn_ndarray::NdArray;
/// use kv_core::{grouped_query_attention, merge_partial_attention, partial_attention};
///
/// let device = Default::default();
/// let q = Tensor::<NdArray, 4>::random([1, 4, 1, 8], Distribution::Default, &device);
/// let k = Tensor::<NdArray, 4>::random([1, 2, 10, 8], Distribution::Default, &device);
/// let v = Tensor::<NdArray, 4>::random([1, 2, 10, 8], Distribution::Default, &device);
/// let whole = grouped_query_attention(q.clone(), k.clone(), v.clone(), None, None).unwrap();
/// let parts = vec![
///     partial_attention(q.clone(), k.clone().narrow(2, 0, 6), v.clone().narrow(2, 0, 6), None)
///         .unwrap(),
///     partial_attention(q, k.narrow(2, 6, 4), v.narrow(2, 6, 4), None).unwrap(),
/// ];
/// let merged = merge_partial_attention(parts);
/// let diff = (merged - whole).abs().max().into_scalar();
/// assert!(diff < 1e-5);
/// ```
pub fn partial_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    cap: Option<SoftCap>,
) -> Result<PartialAttention<B>> {
    let [b, h, n, d] = q.dims();
    let groups = groups(&q.dims(), &k.dims(), &v.dims())?;
    let kv = k.dims()[1];
    let q = q.reshape([b, kv, groups * n, d]);
    // [b, kv, groups * n, keys]
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (d as f64).sqrt());
    let scores = soft_cap(scores, cap);
    let max = scores.clone().max_dim(3);
    let exp = (scores - max.clone()).exp();
    let sum = exp.clone().sum_dim(3);
    Ok(PartialAttention {
        weighted: exp.matmul(v).reshape([b, h, n, d]),
        max: max.reshape([b, h, n, 1]),
        sum: sum.reshape([b, h, n, 1]),
    })
}

/// Softmax attention over all the parts' keys, from their [`PartialAttention`]s:
/// `Σ_p exp(max_p - max) weighted_p / Σ_p exp(max_p - max) sum_p`, with `max` the largest of
/// the parts' maxima. Returns `[batch, heads, queries, head_dim]`.
///
/// # Panics
/// If `parts` is empty.
pub fn merge_partial_attention<B: Backend>(parts: Vec<PartialAttention<B>>) -> Tensor<B, 4> {
    assert!(!parts.is_empty(), "at least one part of attention to merge");
    let max = parts
        .iter()
        .map(|p| p.max.clone())
        .reduce(|a, b| a.max_pair(b))
        .expect("not empty");
    let mut rescaled = parts.into_iter().map(|part| {
        let rescale = (part.max - max.clone()).exp();
        (part.weighted * rescale.clone(), part.sum * rescale)
    });
    let (mut weighted, mut sum) = rescaled.next().expect("not empty");
    for (w, s) in rescaled {
        weighted = weighted + w;
        sum = sum + s;
    }
    weighted / sum
}
