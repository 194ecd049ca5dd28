//! Attention masks and position ids for a custom generation loop.
//!
//! Masks follow burn's convention: `true` marks a key a query must **not** see.

use std::ops::Range;

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};

use crate::{error::Result, CacheError, KeyPositions};

/// Which earlier keys a query may see (every pattern is causal: never a later key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPattern {
    /// Every earlier key.
    Causal,
    /// Keys at `query - window < key <= query`.
    SlidingWindow {
        /// Keys seen, the query's own included.
        window: usize,
    },
    /// The first `sinks` keys and the last `window` (StreamingLLM).
    Sinks {
        /// First positions always seen.
        sinks: usize,
        /// Recent positions seen, the query's own included.
        window: usize,
    },
}

impl AttentionPattern {
    /// Whether a query at position `query` may see the key at position `key`.
    pub fn allows(self, query: usize, key: usize) -> bool {
        if key > query {
            return false;
        }
        match self {
            AttentionPattern::Causal => true,
            AttentionPattern::SlidingWindow { window } => query - key < window,
            AttentionPattern::Sinks { sinks, window } => key < sinks || query - key < window,
        }
    }

    /// The slots a query at position `query` sees among keys at the contiguous positions
    /// `keys` (slot `i` holds position `keys.start + i`), when they form one range: always for
    /// [`AttentionPattern::Causal`] and [`AttentionPattern::SlidingWindow`]; for
    /// [`AttentionPattern::Sinks`] only while the sinks and the window touch. `None` also
    /// when the query sees none of the keys.
    ///
    /// ```
    /// use kv_core::AttentionPattern;
    ///
    /// // Keys at positions 10..20: a query at 14 sees slots 0..5 causally, 2..5 in a window of 3.
    /// assert_eq!(AttentionPattern::Causal.visible_slots(14, 10..20), Some(0..5));
    /// let window = AttentionPattern::SlidingWindow { window: 3 };
    /// assert_eq!(window.visible_slots(14, 10..20), Some(2..5));
    /// ```
    pub fn visible_slots(self, query: usize, keys: Range<usize>) -> Option<Range<usize>> {
        let first = match self {
            AttentionPattern::Causal => 0,
            AttentionPattern::SlidingWindow { window } => (query + 1).saturating_sub(window),
            AttentionPattern::Sinks { sinks, window } => {
                if (query + 1).saturating_sub(window) > sinks {
                    return None; // two ranges: the sinks, then the window
                }
                0
            }
        };
        let start = first.max(keys.start) - keys.start;
        let end = (query + 1).min(keys.end).saturating_sub(keys.start);
        (start < end).then_some(start..end)
    }
}

/// Which positions of each batch row hold real tokens: the `attention_mask` `[batch, past + new]`
/// of transformers (1 = token, 0 = padding), kept on the host.
///
/// ```
/// use kv_core::AttentionMask;
///
/// // Two prompts of 3 and 1 tokens, left-padded to 3.
/// let mut mask = AttentionMask::left_padded(&[3, 1], 3).unwrap();
/// assert_eq!(mask.position_ids(0..3), vec![vec![0, 1, 2], vec![1, 1, 0]]);
/// mask.extend(1); // one generated token per row
/// assert_eq!(mask.position_ids(3..4), vec![vec![3], vec![1]]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionMask {
    rows: Vec<Vec<bool>>,
}

impl AttentionMask {
    /// Every position of `batch` rows of `len` is a real token.
    pub fn ones(batch: usize, len: usize) -> Self {
        Self {
            rows: vec![vec![true; len]; batch],
        }
    }

    /// Rows of `true` (token) / `false` (padding), all of one length.
    pub fn from_rows(rows: Vec<Vec<bool>>) -> Result<Self> {
        if let Some(first) = rows.first() {
            let expected = first.len();
            if let Some((row, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != expected) {
                return Err(CacheError::MaskRowLength {
                    row,
                    expected,
                    got: r.len(),
                });
            }
        }
        Ok(Self { rows })
    }

    /// Rows of `lengths[i]` tokens, left-padded to `len`.
    pub fn left_padded(lengths: &[usize], len: usize) -> Result<Self> {
        if let Some((row, &got)) = lengths.iter().enumerate().find(|(_, &l)| l > len) {
            return Err(CacheError::MaskRowLength {
                row,
                expected: len,
                got,
            });
        }
        Ok(Self {
            rows: lengths
                .iter()
                .map(|&l| (0..len).map(|p| p >= len - l).collect())
                .collect(),
        })
    }

    /// Appends `new` real-token columns: one per generated token.
    pub fn extend(&mut self, new: usize) {
        for row in &mut self.rows {
            row.resize(row.len() + new, true);
        }
    }

    /// The rows at `indices`, in that order (a row may repeat): the mask that goes with
    /// [`crate::KvCache::select_batch`] when finished rows leave a batch or rows are forked.
    ///
    /// ```
    /// use kv_core::AttentionMask;
    ///
    /// let mask = AttentionMask::left_padded(&[2, 1], 2).unwrap();
    /// let kept = mask.select_rows(&[1, 1]).unwrap();
    /// assert_eq!((kept.batch(), kept.is_token(0, 0)), (2, false));
    /// ```
    pub fn select_rows(&self, indices: &[usize]) -> Result<Self> {
        if indices.is_empty() {
            return Err(CacheError::EmptyBatchSelection);
        }
        let rows = indices
            .iter()
            .map(|&i| {
                self.rows
                    .get(i)
                    .cloned()
                    .ok_or(CacheError::BatchIndexOutOfRange {
                        index: i,
                        batch: self.rows.len(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { rows })
    }

    /// Whether each position of `row` is a real token.
    pub fn row(&self, row: usize) -> &[bool] {
        &self.rows[row]
    }

    /// Rows.
    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    /// Positions per row.
    pub fn len(&self) -> usize {
        self.rows.first().map_or(0, Vec::len)
    }

    /// Whether the mask has no positions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether row `row` has a real token at `position` (positions past the mask count as real).
    pub fn is_token(&self, row: usize, position: usize) -> bool {
        self.rows[row].get(position).copied().unwrap_or(true)
    }

    /// Position ids of `positions` per row, as transformers computes them: the count of real
    /// tokens before each one (`cumsum(mask) - 1`), and 1 at padding. These feed position
    /// embeddings; `cache_position` (the slot index) is not affected by padding.
    pub fn position_ids(&self, positions: Range<usize>) -> Vec<Vec<usize>> {
        self.rows
            .iter()
            .enumerate()
            .map(|(row, tokens)| {
                let mut before = tokens.iter().take(positions.start).filter(|&&t| t).count();
                positions
                    .clone()
                    .map(|p| {
                        if self.is_token(row, p) {
                            before += 1;
                            before - 1
                        } else {
                            1
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// The mask for queries at `queries` over key slots at `keys`: `[batch, 1, queries, slots]`
/// (`batch` is 1 without padding), `true` where the query must not look.
///
/// A query row that would see no key at all (a padding query of a left-padded prompt) is left
/// fully unmasked, as transformers does, so attention never divides by zero; its output is
/// never used.
pub fn attention_mask<B: Backend>(
    queries: Range<usize>,
    keys: &KeyPositions,
    pattern: AttentionPattern,
    padding: Option<&AttentionMask>,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let (data, shape) = mask_data(queries, keys, pattern, padding);
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// [`attention_mask`], or `None` when it would hide nothing: a decode step whose cache holds
/// only keys the query may see needs no mask, and attention runs faster without one.
///
/// ```
/// use burn_ndarray::NdArray;
/// use kv_core::{needed_attention_mask, AttentionPattern, KeyPositions};
///
/// let device = Default::default();
/// let keys = KeyPositions::Contiguous(0..4);
/// // The last query sees every key: no mask.
/// let decode = needed_attention_mask::<NdArray>(3..4, &keys, AttentionPattern::Causal, None, &device);
/// assert!(decode.is_none());
/// // A prefill of 4 queries must not see later keys.
/// let prefill = needed_attention_mask::<NdArray>(0..4, &keys, AttentionPattern::Causal, None, &device);
/// assert_eq!(prefill.unwrap().dims(), [1, 1, 4, 4]);
/// ```
pub fn needed_attention_mask<B: Backend>(
    queries: Range<usize>,
    keys: &KeyPositions,
    pattern: AttentionPattern,
    padding: Option<&AttentionMask>,
    device: &B::Device,
) -> Option<Tensor<B, 4, Bool>> {
    let (data, shape) = mask_data(queries, keys, pattern, padding);
    data.iter()
        .any(|&hidden| hidden)
        .then(|| Tensor::from_data(TensorData::new(data, shape), device))
}

/// Host data and shape of [`attention_mask`].
pub(crate) fn mask_data(
    queries: Range<usize>,
    keys: &KeyPositions,
    pattern: AttentionPattern,
    padding: Option<&AttentionMask>,
) -> (Vec<bool>, [usize; 4]) {
    let key_positions = keys.to_vec();
    let rows = padding.map_or(1, AttentionMask::batch);
    let mut data = Vec::with_capacity(rows * queries.len() * key_positions.len());
    for row in 0..rows {
        for query in queries.clone() {
            let start = data.len();
            data.extend(key_positions.iter().map(|&key| {
                let seen =
                    pattern.allows(query, key) && padding.is_none_or(|p| p.is_token(row, key));
                !seen
            }));
            if data[start..].iter().all(|&masked| masked) {
                data[start..].fill(false);
            }
        }
    }
    (data, [rows, 1, queries.len(), key_positions.len()])
}

/// Causal mask for `new` queries after `past` cached positions: `[1, 1, new, past + new]`,
/// `true` where a query must not look. For a loop of one's own around a [`crate::KvCache`]:
/// the mask a prompt's attention over the view needs.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::{causal_mask, grouped_query_attention};
///
/// let device = Default::default();
/// let mask = causal_mask::<NdArray>(3, 2, &device); // 3 new tokens after 2 cached ones
/// let hidden: Vec<bool> = mask.clone().into_data().to_vec().unwrap();
/// assert_eq!(&hidden[..5], &[false, false, false, true, true]); // the first sees 0..3
/// let q = Tensor::<NdArray, 4>::ones([1, 4, 3, 8], &device);
/// let kv = Tensor::<NdArray, 4>::ones([1, 2, 5, 8], &device);
/// let out = grouped_query_attention(q, kv.clone(), kv, Some(mask), None).unwrap();
/// assert_eq!(out.dims(), [1, 4, 3, 8]);
/// ```
pub fn causal_mask<B: Backend>(new: usize, past: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    attention_mask(
        past..past + new,
        &KeyPositions::Contiguous(0..past + new),
        AttentionPattern::Causal,
        None,
        device,
    )
}

/// Sliding-window causal mask for `new` queries after `past` positions: `[1, 1, new, past + new]`,
/// each query seeing itself and the `window - 1` positions before it (Mistral's window, over a
/// cache that keeps every position).
///
/// ```
/// use burn_ndarray::NdArray;
/// use kv_core::window_mask;
///
/// let mask = window_mask::<NdArray>(1, 4, 2, &Default::default());
/// let hidden: Vec<bool> = mask.into_data().to_vec().unwrap();
/// assert_eq!(hidden, [true, true, true, false, false]); // position 4 sees 3 and 4
/// ```
pub fn window_mask<B: Backend>(
    new: usize,
    past: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    attention_mask(
        past..past + new,
        &KeyPositions::Contiguous(0..past + new),
        AttentionPattern::SlidingWindow { window },
        None,
        device,
    )
}

/// Padding mask from an attention mask: `[batch, 1, 1, len]`, `true` at padding; combined
/// with a causal mask (`mask.bool_or(...)`, broadcast) it gives a left-padded batch's mask.
///
/// ```
/// use burn_ndarray::NdArray;
/// use kv_core::{padding_mask, AttentionMask};
///
/// let padding = AttentionMask::left_padded(&[3, 1], 3).unwrap();
/// let mask = padding_mask::<NdArray>(&padding, &Default::default());
/// assert_eq!(mask.dims(), [2, 1, 1, 3]);
/// let hidden: Vec<bool> = mask.into_data().to_vec().unwrap();
/// assert_eq!(hidden, [false, false, false, true, true, false]);
/// ```
pub fn padding_mask<B: Backend>(mask: &AttentionMask, device: &B::Device) -> Tensor<B, 4, Bool> {
    let data: Vec<bool> = mask.rows.iter().flatten().map(|&t| !t).collect();
    Tensor::from_data(
        TensorData::new(data, [mask.batch(), 1, 1, mask.len()]),
        device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `visible_slots` says exactly which slots `allows` lets a query see, wherever it answers,
    /// and answers for every causal and sliding-window query that sees a key.
    #[test]
    fn visible_slots_are_the_slots_the_pattern_allows() {
        let patterns = [
            AttentionPattern::Causal,
            AttentionPattern::SlidingWindow { window: 1 },
            AttentionPattern::SlidingWindow { window: 4 },
            AttentionPattern::Sinks {
                sinks: 2,
                window: 3,
            },
        ];
        for pattern in patterns {
            for start in 0..6 {
                for len in 0..8 {
                    let keys = start..start + len;
                    for query in 0..14 {
                        let allowed: Vec<usize> = (0..len)
                            .filter(|&slot| pattern.allows(query, start + slot))
                            .collect();
                        match pattern.visible_slots(query, keys.clone()) {
                            Some(range) => {
                                assert_eq!(range.collect::<Vec<_>>(), allowed, "{pattern:?}")
                            }
                            None => assert!(
                                allowed.is_empty()
                                    || matches!(pattern, AttentionPattern::Sinks { .. }),
                                "{pattern:?} query {query} keys {keys:?}: {allowed:?}"
                            ),
                        }
                    }
                }
            }
        }
    }
}
