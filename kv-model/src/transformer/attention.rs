//! Attention over what a cache holds, shared by every pass and every kind of key/value
//! storage: the dense caches' update (`attend_through_cache`) and a view's attention
//! (`attend_view`: on the host through kv-kernels, split by keys for a long decode step, or
//! through the blocked attention plan).

use kv_kernels::attention::{self, HeadKeys, Logits};

use super::*;

impl<B: Backend> Transformer<B> {
    /// Attention of queries `q` `[batch, heads, seq, head_dim]` over the new keys and values
    /// `k`/`v` `[batch, kv_heads, seq, head_dim]` and, through `cache` if any, the ones before
    /// them: stores the new ones, then attends over what the cache holds. Returns
    /// `[batch, seq, heads * head_dim]`, ready for the output projection.
    pub(super) fn attend_through_cache<C: KvCache<B>>(
        &self,
        mut q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        layer: &LayerSpec,
        cache: Option<&mut ModelCache<B, C>>,
        step: &mut ForwardContext<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        let c = &self.config;
        let batch = q.dims()[0];
        let heads = c.num_heads;
        let rope = match &self.positions {
            PositionEncoding::Rotary(global, local) => match (layer.local_rope, local) {
                (true, Some(local)) => Some(local),
                _ => Some(global),
            },
            PositionEncoding::Learned(_) => None,
        };
        let pattern = self.layer_pattern(layer, step.cache_pattern(layer.index))?;
        let cache = match cache {
            // A cache that attends over its own storage (a quantized one: over its codes)
            // does the whole step itself, when plain causal attention is all there is to do
            // (no padding, no window of the model's own, no soft-capping, keys rotated here).
            Some(cache)
                if cache.attends_in_place()
                    && self.attention_cap().is_none()
                    && step.padding.is_none()
                    && pattern == AttentionPattern::Causal
                    && step.rotation == KeyRotation::AppliedByCaller =>
            {
                let [_, _, seq, head_dim] = q.dims();
                let out = cache.update_and_attend(layer.index, q, k, v)?;
                return Ok(out.swap_dims(1, 2).reshape([batch, seq, heads * head_dim]));
            }
            cache => cache,
        };
        let view = match cache {
            Some(cache) => cache.update(layer.index, k, v)?,
            None => KvView {
                keys: k,
                values: v,
                positions: KeyPositions::Contiguous(step.queries.clone()),
                query_rotary_positions: None,
            },
        };
        if let (Some(rope), KeyRotation::AppliedByCache) = (rope, step.rotation) {
            // The cache rotates keys at their rank in it; queries go at the matching ranks.
            let ranks = view
                .query_rotary_positions
                .clone()
                .unwrap_or(step.queries.clone());
            q = rope.rotate(q, &[ranks.collect()]);
        }
        self.attend_view(q, view, layer, step)
    }

    /// Attention of queries `q` `[batch, heads, seq, head_dim]` (rotated) over `view`, the
    /// keys and values a cache holds for them (the new ones included), as `step` says (its
    /// queries' positions, padding and pattern): on the host for a prompt on a host model,
    /// split by keys over the kernel threads for one long decode query, else through the
    /// blocked attention plan. Returns `[batch, seq, heads * head_dim]`.
    pub(super) fn attend_view(
        &self,
        q: Tensor<B, 4>,
        view: KvView<B>,
        layer: &LayerSpec,
        step: &mut ForwardContext<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        let c = &self.config;
        let batch = q.dims()[0];
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let pattern = self.layer_pattern(layer, step.cache_pattern(layer.index))?;
        if step.on_host && self.splits_keys(&q, &view.positions, pattern, step) {
            return self.attend_split_keys(q, view);
        }
        if let Some(visible) = self.host_attention_rows(&view.positions, pattern, step) {
            return Ok(self.attend_on_host(q, view, &visible));
        }
        let groups = heads / kv_heads;
        let plan = step.plan_for(
            &view.positions,
            pattern,
            self.split.queries_per_block,
            [batch, kv_heads, groups],
            &self.device,
        )?;
        let cap = self.attention_cap();
        Ok(plan.attend_merged(q, view.keys, view.values, cap, self.execution)?)
    }

    /// The key slots each new position sees, when attention runs on the host
    /// ([`Transformer::attend_on_host`]): the model's matrices live on the host (so its
    /// backend computes there), no padding, and every query sees one range of contiguous key
    /// positions, or every slot of a ring holding one run of positions in any order. A prompt and a decode step then compute each query with the same arithmetic,
    /// so a position gets the same numbers whether it came in a prompt, a chunk of one, or a
    /// decode step (a long decode step that splits its keys over threads aside).
    pub(super) fn host_attention_rows(
        &self,
        positions: &KeyPositions,
        pattern: AttentionPattern,
        step: &ForwardContext<'_, B>,
    ) -> Option<Vec<Range<usize>>> {
        if step.padding.is_some() || !self.lm_head.is_host() {
            return None;
        }
        match positions {
            KeyPositions::Contiguous(keys) => step
                .queries
                .clone()
                .map(|query| pattern.visible_slots(query, keys.clone()))
                .collect(),
            // A full ring read in slot order (a sliding layer's decode step): attention does
            // not depend on the keys' order, so where every query sees every slot the slots
            // are one range, whatever positions they hold.
            KeyPositions::Slots(slots) => {
                let (&lo, &hi) = (slots.iter().min()?, slots.iter().max()?);
                let all = 0..hi + 1 - lo;
                let distinct = all.len() == slots.len();
                let sees_all = step
                    .queries
                    .clone()
                    .all(|query| pattern.visible_slots(query, lo..hi + 1) == Some(all.clone()));
                (distinct && sees_all).then(|| vec![0..slots.len(); step.queries.len()])
            }
        }
    }

    /// Attention of `q` `[batch, heads, seq, head_dim]` over `view` on the host
    /// ([`Transformer::attend_host_keys`]), its keys and values downloaded once.
    fn attend_on_host(
        &self,
        q: Tensor<B, 4>,
        view: KvView<B>,
        visible: &[Range<usize>],
    ) -> Tensor<B, 3> {
        let [_, kv_heads, keys, head_dim] = view.keys.dims();
        let (k, v) = (host::download(view.keys), host::download(view.values));
        let per_head = keys * head_dim;
        self.attend_host_keys(q, visible, |b, h| {
            let at = (b * kv_heads + h) * per_head;
            HeadKeys::contiguous(&k[at..at + per_head], &v[at..at + per_head], head_dim)
        })
    }

    /// Attention of `q` `[batch, heads, seq, head_dim]` on the host, through kv-kernels'
    /// attention ([`kv_kernels::attention`]: both products and the softmax in vector
    /// registers), over the keys `keys(batch row, kv head)` names wherever they are stored
    /// (downloaded from a view, or a paged store's blocks in place), `visible[i]` the keys query
    /// `i` sees. Each block of [`PromptSplit::queries_per_block`] queries of a batch row is one
    /// task on `execution`'s threads (the longest first, since later blocks see more keys), and
    /// writes its rows of every head straight into the output projection's layout:
    /// `[batch, seq, heads * head_dim]`.
    ///
    /// A CPU backend's fused attention op walks one query at a time with a scalar `exp`, and
    /// the blocked plan around it slices, masks and joins tensors per block; here a prompt's
    /// queries come to host memory once per layer and the output goes back once.
    pub(super) fn attend_host_keys<'k>(
        &self,
        q: Tensor<B, 4>,
        visible: &[Range<usize>],
        keys: impl Fn(usize, usize) -> HeadKeys<'k> + Sync,
    ) -> Tensor<B, 3> {
        let [batch, heads, seq, head_dim] = q.dims();
        let groups = heads / self.config.num_kv_heads;
        let q = host::download(q);
        let width = heads * head_dim;
        let block = self.split.queries_per_block.max(1);
        let logits = Logits {
            scale: 1.0 / (head_dim as f32).sqrt(),
            cap: self.attention_cap(),
        };
        let isa = Isa::best();
        let mut out = vec![0.0f32; batch * seq * width];
        // (batch row, first query, its rows of `out`), the last blocks first.
        let mut tasks: Vec<(usize, usize, &mut [f32])> = out
            .chunks_mut(seq * width)
            .enumerate()
            .flat_map(|(b, rows)| {
                rows.chunks_mut(block * width)
                    .enumerate()
                    .map(move |(i, rows)| (b, i * block, rows))
            })
            .collect();
        tasks.reverse();
        let run = |(b, first, out): (usize, usize, &mut [f32])| {
            let rows = out.len() / width;
            let visible = &visible[first..first + rows];
            let mut scores = Vec::new();
            for h in 0..heads {
                // Query head `h` reads key head `h / groups` (grouped-query attention).
                let q = &q[((b * heads + h) * seq + first) * head_dim..][..rows * head_dim];
                attention::attend_keys(
                    isa,
                    q,
                    keys(b, h / groups),
                    visible,
                    logits,
                    &mut out[h * head_dim..],
                    width,
                    &mut scores,
                );
            }
        };
        match self.execution {
            Execution::Parallel => tasks.into_par_iter().with_max_len(1).for_each(run),
            Execution::Sequential => tasks.into_iter().for_each(run),
        }
        host::upload(out, [batch, seq, width], &self.device)
    }

    /// Whether one query's attention over `view` is split over the kernel threads by keys:
    /// a single new position that sees every key the cache holds (causal pattern, no padding,
    /// contiguous positions), enough keys for each thread's share to pay for its hand-off.
    pub(super) fn splits_keys(
        &self,
        q: &Tensor<B, 4>,
        positions: &KeyPositions,
        pattern: AttentionPattern,
        step: &ForwardContext<'_, B>,
    ) -> bool {
        q.dims()[2] == 1
            && step.padding.is_none()
            && pattern == AttentionPattern::Causal
            && matches!(positions, KeyPositions::Contiguous(_))
            && positions.len() >= 2 * MIN_KEYS_PER_THREAD
            && Threads::global().count() > 1
    }

    /// Attention of `q` `[batch, heads, 1, head_dim]` over every key of `view`, the keys split
    /// over the kernel threads (whose workers would otherwise wait through attention) and the
    /// parts merged exactly ([`merge_partial_attention`]). Reading the cache is a decode step's
    /// one cost that grows with the context; two threads read it at twice the rate of one.
    /// Returns `[batch, 1, heads * head_dim]`.
    fn attend_split_keys(&self, q: Tensor<B, 4>, view: KvView<B>) -> Result<Tensor<B, 3>> {
        let [batch, heads, _, head_dim] = q.dims();
        let (keys, values) = (view.keys, view.values);
        let cap = self.attention_cap();
        let parts = Threads::global().split(
            keys.dims()[2],
            MIN_KEYS_PER_THREAD,
            Arc::new(move |range: Range<usize>| {
                let slice = |t: &Tensor<B, 4>| t.clone().narrow(2, range.start, range.len());
                partial_attention(q.clone(), slice(&keys), slice(&values), cap)
            }),
        );
        let parts = parts
            .into_iter()
            .map(|(_, part)| part)
            .collect::<std::result::Result<Vec<PartialAttention<B>>, _>>()?;
        Ok(merge_partial_attention(parts)
            .swap_dims(1, 2)
            .reshape([batch, 1, heads * head_dim]))
    }
}

/// Fewest cached keys a thread takes when a decode step's attention is split by keys
/// ([`Transformer::attend_split_keys`]).
const MIN_KEYS_PER_THREAD: usize = 128;
