//! One transformer block, once: `x += attention(norm(x)); x += mlp(norm(x))`, for every pass.
//!
//! The single-sequence pass ([`Transformer::forward`]) and the ragged pass
//! ([`Transformer::forward_ragged`]) differ only in two things, both handed to
//! [`Block::forward`] as data:
//!
//! - **The layout of their new positions** ([`PassLayout`]): runs of positions that the
//!   position-wise work computes apart (on rayon's threads for a CPU prompt), and pieces that
//!   attention keeps apart (one per sequence: the whole batch in the single pass, one per
//!   request in the ragged one), with the rotary angles of every position.
//! - **Where keys and values live** ([`LayerKv`]): a [`ModelCache`] of dense per-sequence
//!   caches, or a [`kv_core::PagedStore`]'s block pool. Both store a piece's new keys and
//!   values and attend over what its sequence holds through the same attention code
//!   (`attention.rs`).
//!
//! Whether a run's activations sit in host memory or on the device is decided by the weights
//! that touch them ([`Run`]), not by the pass.

use super::stream::{Run, Stream};
use super::*;

/// Where one pass's attention stores and reads keys and values.
pub(super) trait LayerKv<B: Backend> {
    /// Stores piece `piece`'s new keys and values `k`, `v` `[batch, kv_heads, n, head_dim]`
    /// in `layer`, and attends its queries `q` `[batch, heads, n, head_dim]` (rotated) over
    /// everything its sequence then holds: `[batch, n, heads * head_dim]`.
    fn attend(
        &mut self,
        model: &Transformer<B>,
        layer: &LayerSpec,
        piece: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 3>>;
}

/// The new positions of one forward pass as its layers see them, made once per pass.
///
/// Positions are numbered `0..len` along the pass's stream (`[batch, len, hidden]`).
pub(super) struct PassLayout<B: Backend> {
    /// Runs of positions the position-wise work computes apart ([`Transformer::runs`]).
    pub(super) runs: Vec<Range<usize>>,
    /// Pieces of positions attention keeps apart, in order: each one sequence (or one batch
    /// of sequences at the same positions) of the pass's [`LayerKv`].
    pub(super) pieces: Vec<Range<usize>>,
    /// Every non-empty intersection of a run and a piece, in position order: the unit in
    /// which Q, K and V are split into heads and rotated.
    segments: Vec<Segment<B>>,
}

/// A run's positions inside one piece, with their rotary angles.
struct Segment<B: Backend> {
    run: usize,
    piece: usize,
    positions: Range<usize>,
    /// Cosines and sines when the model rotates keys itself, in each form a layer needs.
    angles: Option<SegmentAngles<B>>,
    /// The same from the local rotary table, for the layers that use it (Gemma 3's sliding
    /// layers).
    local_angles: Option<SegmentAngles<B>>,
}

impl<B: Backend> Segment<B> {
    /// The angles `layer` rotates this segment's queries and keys by.
    fn angles_for(&self, layer: &LayerSpec) -> Option<&SegmentAngles<B>> {
        match (layer.local_rope, &self.local_angles) {
            (true, Some(local)) => Some(local),
            _ => self.angles.as_ref(),
        }
    }
}

/// The rotary angles of a segment's positions: on the host for Q/K/V split on the host, on
/// the device (laid out per head count) for those split there.
struct SegmentAngles<B: Backend> {
    /// `[rows of positions * n, head_dim]`.
    host: Option<HostAngles>,
    /// Whether every batch row shares one row of positions (the host angles hold one).
    shared: bool,
    /// For the query heads and for the key heads.
    device: Option<(RotaryAngles<B>, RotaryAngles<B>)>,
}

impl<B: Backend> PassLayout<B> {
    /// The layout of `runs` and `pieces` (each a partition of the same positions, in order).
    /// `position_ids(positions)` gives each batch row's positions (one shared row, or one per
    /// batch row) at stream positions `positions`; angles are made for them when `rotate`
    /// (the model rotates keys itself) and the model is rotary.
    pub(super) fn new(
        model: &Transformer<B>,
        runs: Vec<Range<usize>>,
        pieces: Vec<Range<usize>>,
        position_ids: impl Fn(Range<usize>) -> Vec<Vec<usize>>,
        rotate: bool,
    ) -> Self {
        let (rope, local_rope) = match (&model.positions, rotate) {
            (PositionEncoding::Rotary(rope, local), true) => (Some(rope), local.as_ref()),
            _ => (None, None),
        };
        let c = &model.config;
        let host_qkv = model.blocks.iter().any(|b| b.attention.qkv.is_host());
        let device_qkv = model.blocks.iter().any(|b| !b.attention.qkv.is_host());
        let mut segments = Vec::new();
        for (piece, p) in pieces.iter().enumerate() {
            for (run, r) in runs.iter().enumerate() {
                let positions = p.start.max(r.start)..p.end.min(r.end);
                if positions.is_empty() {
                    continue;
                }
                let angles_of = |rope: &RotaryTable<B>| {
                    let ids = position_ids(positions.clone());
                    SegmentAngles {
                        host: host_qkv.then(|| rope.host_angles(&ids.concat())),
                        shared: ids.len() == 1,
                        device: device_qkv.then(|| {
                            let angles = rope.angles(&ids);
                            (
                                angles.for_heads(c.num_heads),
                                angles.for_heads(c.num_kv_heads),
                            )
                        }),
                    }
                };
                segments.push(Segment {
                    run,
                    piece,
                    angles: rope.map(angles_of),
                    local_angles: local_rope.map(angles_of),
                    positions,
                });
            }
        }
        Self {
            runs,
            pieces,
            segments,
        }
    }
}

impl<B: Backend> Block<B> {
    /// This block over the residual stream `x` of a pass laid out as `layout`, keys and values
    /// through `kv`: the textbook pre-norm block.
    pub(super) fn forward(
        &self,
        model: &Transformer<B>,
        layout: &PassLayout<B>,
        x: Stream<B>,
        kv: &mut dyn LayerKv<B>,
    ) -> Result<Stream<B>> {
        let device = model.device();
        let runs = &layout.runs;
        // x = x + attention(norm(x)): Q/K/V run by run, attention piece by piece, the output
        // projection run by run.
        let qkv = model.map_runs(runs, x.iter().collect(), |_, _, x| {
            x.norm_linear(&self.attention_norm, &self.attention.qkv, device)
        });
        let heads = model.attend_layer(&self.spec, &self.attention, layout, qkv, kv)?;
        let x = model.map_runs(runs, x.into_iter().zip(heads).collect(), |_, _, (x, h)| {
            let h = h.linear(&self.attention.output, device);
            x.add(match &self.attention_post_norm {
                Some(norm) => h.norm(norm),
                None => h,
            })
        });
        // x = x + mlp(norm(x)), the MLP's output normed too where the model says so
        Ok(model.map_runs(runs, x, |_, _, x| {
            x.mlp_residual(
                &self.mlp_norm,
                &self.mlp,
                self.mlp_post_norm.as_ref(),
                device,
            )
        }))
    }
}

impl<B: Backend> Transformer<B> {
    /// Attention of one layer: `qkv` (the fused projections, run by run) split into heads and
    /// rotated segment by segment, each piece's keys and values stored and attended through
    /// `kv`, the heads laid back out run by run: `[batch, run, heads * head_dim]` per run.
    fn attend_layer(
        &self,
        layer: &LayerSpec,
        attention: &Attention<B>,
        layout: &PassLayout<B>,
        qkv: Stream<B>,
        kv: &mut dyn LayerKv<B>,
    ) -> Result<Stream<B>> {
        let segments: Vec<&Segment<B>> = layout.segments.iter().collect();
        let parallel = layout.runs.len() > 1;
        let split = self.map_tasks(parallel, segments, |segment| {
            let run = &layout.runs[segment.run];
            let positions = segment.positions.start - run.start..segment.positions.end - run.start;
            self.split_heads(
                &qkv[segment.run],
                positions,
                attention,
                segment.angles_for(layer),
            )
        });
        let mut split = split.into_iter().zip(&layout.segments).peekable();
        let mut attended = Vec::with_capacity(layout.pieces.len());
        for piece in 0..layout.pieces.len() {
            let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
            while let Some(((q, k, v), _)) = split.next_if(|(_, s)| s.piece == piece) {
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            let (q, k, v) = (join_runs(qs, 2), join_runs(ks, 2), join_runs(vs, 2));
            attended.push(kv.attend(self, layer, piece, q, k, v)?);
        }
        // `[batch, len, heads * head_dim]`, cut back into the stream's runs.
        let attended = join_runs(attended, 1);
        Ok(layout
            .runs
            .iter()
            .map(|run| Run::Device(narrow_run(&attended, run)))
            .collect())
    }

    /// Q, K and V of positions `positions` of a run of fused projections
    /// `[batch, len, (heads + 2 * kv_heads) * head_dim]`, as attention reads them:
    /// `[batch, heads or kv_heads, n, head_dim]`, Q and K normed per head where `attention`
    /// says (Qwen3, Gemma 3), then rotated by `angles`, Q scaled for a model whose attention
    /// scale is not `head_dim^-1/2`. Split where the projections are (host loops, or tensor
    /// views copied once), with the same values.
    fn split_heads(
        &self,
        qkv: &Run<B>,
        positions: Range<usize>,
        attention: &Attention<B>,
        angles: Option<&SegmentAngles<B>>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let c = &self.config;
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let query_factor = self.query_factor();
        match qkv {
            Run::Host {
                values,
                dims: [batch, len, width],
            } => {
                // The positions' rows where they lie (a whole run, or one batch row's span);
                // several batch rows' spans are gathered first.
                let n = positions.len();
                let gathered;
                let rows: &[f32] = if n == *len {
                    values
                } else if *batch == 1 {
                    &values[positions.start * width..positions.end * width]
                } else {
                    gathered = qkv.positions(positions).into_host();
                    &gathered
                };
                let batch = *batch;
                let split = |first: usize, count: usize| {
                    host::heads_major(rows, [batch, n], first, count, head_dim)
                };
                let (mut q, mut k, v) = (
                    split(0, heads),
                    split(heads, kv_heads),
                    split(heads + kv_heads, kv_heads),
                );
                if let Some((q_norm, k_norm)) = &attention.qk_norms {
                    q = q_norm.forward_host(&q, head_dim);
                    k = k_norm.forward_host(&k, head_dim);
                }
                if let Some(SegmentAngles {
                    host: Some(angles),
                    shared,
                    ..
                }) = angles
                {
                    host::rotate_heads(&mut q, [batch, heads, n, head_dim], angles, *shared);
                    host::rotate_heads(&mut k, [batch, kv_heads, n, head_dim], angles, *shared);
                }
                match &query_factor {
                    Some(QueryScale::Uniform(factor)) => q.iter_mut().for_each(|v| *v *= factor),
                    Some(QueryScale::Channels(factors)) => {
                        for head in q.chunks_exact_mut(head_dim) {
                            head.iter_mut().zip(factors).for_each(|(v, f)| *v *= f);
                        }
                    }
                    None => {}
                }
                let tensor = |values: Vec<f32>, count: usize| {
                    Tensor::<B, 4>::from_data(
                        TensorData::new(values, [batch, count, n, head_dim]),
                        &self.device,
                    )
                };
                (tensor(q, heads), tensor(k, kv_heads), tensor(v, kv_heads))
            }
            Run::Device(qkv) => {
                let qkv = if positions.len() == qkv.dims()[1] {
                    qkv.clone()
                } else {
                    qkv.clone().narrow(1, positions.start, positions.len())
                };
                let [batch, n, _] = qkv.dims();
                let split = |first: usize, count: usize| {
                    contiguous(
                        qkv.clone()
                            .narrow(2, first * head_dim, count * head_dim)
                            .reshape([batch, n, count, head_dim])
                            .swap_dims(1, 2),
                    )
                };
                let (mut q, mut k, v) = (
                    split(0, heads),
                    split(heads, kv_heads),
                    split(heads + kv_heads, kv_heads),
                );
                if let Some((q_norm, k_norm)) = &attention.qk_norms {
                    q = q_norm.forward_heads(q);
                    k = k_norm.forward_heads(k);
                }
                if let Some(SegmentAngles {
                    device: Some((for_queries, for_keys)),
                    ..
                }) = angles
                {
                    q = for_queries.apply(q);
                    k = for_keys.apply(k);
                }
                match query_factor {
                    Some(QueryScale::Uniform(factor)) => q = q.mul_scalar(factor),
                    Some(QueryScale::Channels(factors)) => {
                        let data = TensorData::new(factors, [1, 1, 1, head_dim]);
                        q = q.mul(Tensor::from_data(data, &self.device));
                    }
                    None => {}
                }
                (q, k, v)
            }
        }
    }
}

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
