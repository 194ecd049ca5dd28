//! A block's self-attention: Q, K and V from the normed residual stream, rotary, the cache
//! update, and attention over what the cache holds, on the backend or the host.

use super::*;

impl<B: Backend> Transformer<B> {
    /// `attention(norm(x))` of `layer` over the residual stream `xs` (`[batch, run, hidden]`
    /// per run): Q, K and V in one product, rotary, the cache update, attention over what the
    /// cache holds, and the output projection. Returns `[batch, run, hidden]` per run, ready to
    /// be added to the stream. The position-wise parts run run by run (on the host when the
    /// block's matrices live there); attention sees every new position at once.
    pub(super) fn self_attention<C: KvCache<B>>(
        &self,
        norm: &Norm<B>,
        attention: &Attention<B>,
        xs: &[Tensor<B, 3>],
        layer: usize,
        cache: Option<&mut ModelCache<B, C>>,
        step: &mut ForwardContext<'_, B>,
    ) -> Result<Vec<Tensor<B, 3>>> {
        let c = &self.config;
        let batch = xs[0].dims()[0];
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let on_host = attention.is_host();
        // Q, K and V, `[batch, heads or kv_heads, run, head_dim]`, rotated where the model
        // rotates keys itself: run by run, then joined along the positions.
        let parts = self.map_runs(&step.runs, xs.to_vec(), |i, run, x| {
            let [_, len, hidden] = x.dims();
            let qkv = if on_host {
                let h = norm.forward_host(&host::download(x), hidden);
                let qkv = &attention.qkv;
                host::upload(
                    qkv.forward_host(&h, batch * len),
                    [batch, len, qkv.out_features()],
                    &self.device,
                )
            } else {
                attention.qkv.forward(norm.forward(x))
            };
            let split = |start: usize, heads: usize| {
                contiguous(
                    qkv.clone()
                        .narrow(2, start * head_dim, heads * head_dim)
                        .reshape([batch, run.len(), heads, head_dim])
                        .swap_dims(1, 2),
                )
            };
            let (mut q, mut k, v) = (
                split(0, heads),
                split(heads, kv_heads),
                split(heads + kv_heads, kv_heads),
            );
            if let Some(angles) = &step.angles {
                let (for_queries, for_keys) = &angles[i];
                q = for_queries.apply(q);
                k = for_keys.apply(k);
            }
            (q, k, v)
        });
        let (qs, (ks, vs)): (Vec<_>, (Vec<_>, Vec<_>)) =
            parts.into_iter().map(|(q, k, v)| (q, (k, v))).unzip();
        let (q, k, v) = (join_runs(qs, 2), join_runs(ks, 2), join_runs(vs, 2));
        // `[batch, seq, heads * head_dim]`.
        let attended = self.attend_through_cache(q, k, v, layer, cache, step)?;
        // The output projection, run by run: `[batch, run, hidden]`.
        let runs = step.runs.clone();
        Ok(self.map_runs(&runs, vec![(); runs.len()], |_, run, ()| {
            let heads = narrow_run(&attended, run);
            if !on_host {
                return attention.output.forward(heads);
            }
            let [batch, len, _] = heads.dims();
            let out = attention
                .output
                .forward_host(&host::download(heads), batch * len);
            host::upload(
                out,
                [batch, len, attention.output.out_features()],
                &self.device,
            )
        }))
    }

    /// Self-attention on the host for a decode step: `h` is the normed residual stream
    /// `[batch * seq, hidden]` of `[batch, seq]` new positions; returns the output
    /// projection's `[batch * seq, hidden]`, ready to be added to the stream. Q/K/V and the
    /// output projection run through kv-kernels; the cache update and attention over the cache
    /// on the backend (host memory too, on a CPU backend).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn self_attention_on_host<C: KvCache<B>>(
        &self,
        attention: &Attention<B>,
        h: &[f32],
        [batch, seq]: [usize; 2],
        angles: Option<&HostAngles>,
        layer: usize,
        cache: Option<&mut ModelCache<B, C>>,
        step: &mut ForwardContext<'_, B>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let rows = batch * seq;
        // Q, K, V in one product: `[rows, (heads + 2 * kv_heads) * head_dim]`, then per head
        // `[batch, heads or kv_heads, seq, head_dim]`.
        let qkv = attention.qkv.forward_host(h, rows);
        let mut q = host::heads_major(&qkv, [batch, seq], 0, heads, head_dim);
        let mut k = host::heads_major(&qkv, [batch, seq], heads, kv_heads, head_dim);
        let v = host::heads_major(&qkv, [batch, seq], heads + kv_heads, kv_heads, head_dim);
        // Rotary: Q and K turned by their positions' angles (all rows share one list of
        // positions unless padding gave each its own).
        if let Some(angles) = angles {
            let shared = step.position_ids.len() == 1;
            host::rotate_heads(&mut q, [batch, heads, seq, head_dim], angles, shared);
            host::rotate_heads(&mut k, [batch, kv_heads, seq, head_dim], angles, shared);
        }
        // The cache stores K and V and attention reads what it holds:
        // `[batch, seq, heads * head_dim]`.
        let to_backend = |values: Vec<f32>, heads: usize| {
            Tensor::<B, 4>::from_data(
                TensorData::new(values, [batch, heads, seq, head_dim]),
                &self.device,
            )
        };
        let attended = self.attend_through_cache(
            to_backend(q, heads),
            to_backend(k, kv_heads),
            to_backend(v, kv_heads),
            layer,
            cache,
            step,
        )?;
        // The output projection: `[rows, hidden]`.
        Ok(attention
            .output
            .forward_host(&host::download(attended), rows))
    }

    /// Attention of queries `q` `[batch, heads, seq, head_dim]` over the new keys and values
    /// `k`/`v` `[batch, kv_heads, seq, head_dim]` and, through `cache` if any, the ones before
    /// them: stores the new ones, then attends over what the cache holds. Returns
    /// `[batch, seq, heads * head_dim]`, ready for the output projection.
    pub(super) fn attend_through_cache<C: KvCache<B>>(
        &self,
        mut q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        layer: usize,
        cache: Option<&mut ModelCache<B, C>>,
        step: &mut ForwardContext<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        let c = &self.config;
        let batch = q.dims()[0];
        let heads = c.num_heads;
        let rope = match &self.positions {
            PositionEncoding::Rotary(rope) => Some(rope),
            PositionEncoding::Learned(_) => None,
        };
        let cache = match cache {
            // A cache that attends over its own storage (a quantized one: over its codes)
            // does the whole step itself, when plain causal attention is all there is to do
            // (no padding, no window of the model's own, keys rotated here).
            Some(cache)
                if cache.attends_in_place()
                    && step.padding.is_none()
                    && step.pattern == AttentionPattern::Causal
                    && step.rotation == KeyRotation::AppliedByCaller =>
            {
                let [_, _, seq, head_dim] = q.dims();
                let out = cache.update_and_attend(layer, q, k, v)?;
                return Ok(out.swap_dims(1, 2).reshape([batch, seq, heads * head_dim]));
            }
            cache => cache,
        };
        let view = match cache {
            Some(cache) => cache.update(layer, k, v)?,
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
        self.attend_view(q, view, step)
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
        step: &mut ForwardContext<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        let c = &self.config;
        let batch = q.dims()[0];
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        if step.on_host && self.splits_keys(&q, &view, step) {
            return self.attend_split_keys(q, view);
        }
        if let Some(visible) = self.host_attention_rows(&view, step) {
            return Ok(self.attend_on_host(q, view, &visible));
        }
        let groups = heads / kv_heads;
        let plan = step.plan_for(
            &view.positions,
            self.split.queries_per_block,
            [batch, kv_heads, groups],
            &self.device,
        )?;
        Ok(plan.attend_merged(q, view.keys, view.values, self.execution)?)
    }

    /// The key slots each new position sees, when attention runs on the host
    /// ([`Transformer::attend_on_host`]): the model's matrices live on the host (so its
    /// backend computes there), no padding, and every query sees one range of contiguous key
    /// positions. A prompt and a decode step then compute each query with the same arithmetic,
    /// so a position gets the same numbers whether it came in a prompt, a chunk of one, or a
    /// decode step (a long decode step that splits its keys over threads aside).
    fn host_attention_rows(
        &self,
        view: &KvView<B>,
        step: &ForwardContext<'_, B>,
    ) -> Option<Vec<Range<usize>>> {
        let KeyPositions::Contiguous(keys) = &view.positions else {
            return None;
        };
        if step.padding.is_some() || !self.lm_head.is_host() {
            return None;
        }
        step.queries
            .clone()
            .map(|query| step.pattern.visible_slots(query, keys.clone()))
            .collect()
    }

    /// Attention of `q` `[batch, heads, seq, head_dim]` over `view` on the host, through
    /// kv-kernels' attention ([`kv_kernels::attention`]: both products and the softmax in vector
    /// registers), `visible[i]` the key slots query `i` sees. Each block of
    /// [`PromptSplit::queries_per_block`] queries of a batch row is one task on `execution`'s
    /// threads (the longest first, since later blocks see more keys), and writes its rows of
    /// every head straight into the output projection's layout: `[batch, seq, heads * head_dim]`.
    ///
    /// A CPU backend's fused attention op walks one query at a time with a scalar `exp`, and
    /// the blocked plan around it slices, masks and joins tensors per block; here a prompt's
    /// queries, keys and values come to host memory once per layer (a few hundred kilobytes
    /// for a 512-token prompt) and the output goes back once.
    fn attend_on_host(
        &self,
        q: Tensor<B, 4>,
        view: KvView<B>,
        visible: &[Range<usize>],
    ) -> Tensor<B, 3> {
        let [batch, heads, seq, head_dim] = q.dims();
        let [_, kv_heads, keys, _] = view.keys.dims();
        let groups = heads / kv_heads;
        let (q, k, v) = (
            host::download(q),
            host::download(view.keys),
            host::download(view.values),
        );
        let width = heads * head_dim;
        let block = self.split.queries_per_block.max(1);
        let scale = 1.0 / (head_dim as f32).sqrt();
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
                let at = (b * kv_heads + h / groups) * keys * head_dim;
                let kv = at..at + keys * head_dim;
                attention::attend(
                    isa,
                    q,
                    &k[kv.clone()],
                    &v[kv],
                    head_dim,
                    visible,
                    scale,
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
    fn splits_keys(
        &self,
        q: &Tensor<B, 4>,
        view: &KvView<B>,
        step: &ForwardContext<'_, B>,
    ) -> bool {
        q.dims()[2] == 1
            && step.padding.is_none()
            && step.pattern == AttentionPattern::Causal
            && matches!(view.positions, KeyPositions::Contiguous(_))
            && view.keys.dims()[2] >= 2 * MIN_KEYS_PER_THREAD
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
        let parts = Threads::global().split(
            keys.dims()[2],
            MIN_KEYS_PER_THREAD,
            Arc::new(move |range: Range<usize>| {
                let slice = |t: &Tensor<B, 4>| t.clone().narrow(2, range.start, range.len());
                partial_attention(q.clone(), slice(&keys), slice(&values))
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

/// `x` `[batch, heads, seq, head_dim]` with its elements in that order in memory. Q, K and V
/// come out of the fused projection as strided views (`[batch, seq, heads, head_dim]` with two
/// dimensions swapped); element-wise ops on such views take CPU backends' slow strided paths,
/// so for a prompt they are copied once here (reshaping across the swapped dimensions is what
/// makes every backend copy). A single token's view already is in order and is left alone.
fn contiguous<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, heads, seq, head_dim] = x.dims();
    if seq == 1 {
        return x;
    }
    x.reshape([batch, heads, seq * head_dim])
        .reshape([batch, heads, seq, head_dim])
}
