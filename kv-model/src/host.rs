//! The position-wise half of a block computed on the host, for short inputs on a model whose
//! matrices live on the host (a decode step on a CPU backend).
//!
//! A decode step's tensors are a few hundred values each, so on a CPU backend the cost of a
//! block is not its arithmetic but the number of backend operations: each allocates its
//! output and walks a shape, a few microseconds apiece, some twenty of them per block for the
//! norms, activations and sums around the products. With the products already on the host
//! (kv-kernels), the norms, activations and residual sums run here too, as plain loops over
//! the same values: per block one row of the residual stream comes down from the backend and
//! one goes back, and the backend keeps what needs the cache (rotary, the cache update,
//! attention). The arithmetic is the backend path's, in the same order per value, so results
//! agree to float rounding.
//!
//! A forward pass over a few tokens whose every block qualifies goes further
//! ([`crate::Transformer`]'s host path): the residual stream stays here from the embedding to
//! the logits, Q/K/V are split into heads and rotated here, and per layer the backend only
//! stores the new keys and values in the cache and attends over them (a dozen operations
//! instead of some forty).

use burn::tensor::{backend::Backend, Tensor, TensorData};
use kv_core::HostAngles;
use kv_kernels::vector::{self, Gate};
use kv_kernels::Isa;

use crate::config::GatedActivation;
use crate::layers::{Linear, Mlp, Norm};

/// A tensor's values, row-major (`[batch, seq, width]` for the residual stream).
pub(crate) fn download<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 after convert")
}

/// Values back into a `[batch, seq, width]` tensor.
pub(crate) fn upload<B: Backend>(
    values: Vec<f32>,
    shape: [usize; 3],
    device: &B::Device,
) -> Tensor<B, 3> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// A 1-D tensor's values.
fn values<B: Backend>(t: &Tensor<B, 1>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 after convert")
}

impl<B: Backend> Norm<B> {
    /// [`Norm::forward`] over rows of `width` values.
    pub(crate) fn forward_host(&self, x: &[f32], width: usize) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        match self {
            Norm::Layer { weight, bias, eps } => {
                let (w, b) = (values(weight), values(bias));
                for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
                    let mean = row.iter().sum::<f32>() / width as f32;
                    let var =
                        row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
                    let scale = (var + eps).sqrt();
                    for (((o, x), w), b) in o.iter_mut().zip(row).zip(&w).zip(&b) {
                        *o = (x - mean) / scale * w + b;
                    }
                }
            }
            Norm::Rms { weight, eps } => {
                let w = values(weight);
                for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
                    let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
                    let scale = (mean_square + eps).sqrt();
                    for ((o, x), w) in o.iter_mut().zip(row).zip(&w) {
                        *o = x / scale * w;
                    }
                }
            }
        }
        out
    }
}

impl<B: Backend> Mlp<B> {
    /// Whether every product of the MLP runs on the host.
    pub(crate) fn is_host(&self) -> bool {
        match self {
            Mlp::Gelu { fc, proj } => fc.is_host() && proj.is_host(),
            Mlp::Gated { gate_up, down, .. } => gate_up.is_host() && down.is_host(),
        }
    }

    /// [`Mlp::forward`] over `n` rows on the host.
    pub(crate) fn forward_host(&self, x: &[f32], n: usize) -> Vec<f32> {
        match self {
            Mlp::Gelu { fc, proj } => {
                let mut h = fc.forward_host(x, n);
                h.iter_mut().for_each(|v| *v = Gate::GeluTanh.reference(*v));
                proj.forward_host(&h, n)
            }
            Mlp::Gated {
                gate_up,
                down,
                activation,
            } => {
                let both = gate_up.forward_host(x, n);
                let inner = gate_up.out_features() / 2;
                let mut h = vec![0.0; n * inner];
                let isa = Isa::best();
                let gate = match activation {
                    GatedActivation::Silu => Gate::Silu,
                    GatedActivation::GeluTanh => Gate::GeluTanh,
                };
                for (row, o) in both.chunks_exact(2 * inner).zip(h.chunks_exact_mut(inner)) {
                    let (g, up) = row.split_at(inner);
                    vector::gated(isa, gate, g, up, o);
                }
                down.forward_host(&h, n)
            }
        }
    }
}

impl<B: Backend> Linear<B> {
    /// `y = x W + b` over `n` rows of a host matrix.
    ///
    /// # Panics
    /// If the weight is not a host matrix (callers check [`Linear::is_host`]).
    pub(crate) fn forward_host(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = self
            .host_product(x, n)
            .expect("forward_host on a host matrix");
        if let Some(bias) = self.bias() {
            let b: Vec<f32> = bias
                .to_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 after convert");
            for row in y.chunks_exact_mut(b.len()) {
                for (v, b) in row.iter_mut().zip(&b) {
                    *v += b;
                }
            }
        }
        y
    }
}

/// `x += y`, element by element: a residual connection.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// Heads `first..first + heads` of fused projections `[batch * seq, width]` (each row holding
/// its heads one after another, `head_dim` values each), laid out as attention reads them:
/// `[batch, heads, seq, head_dim]`.
pub(crate) fn heads_major(
    fused: &[f32],
    [batch, seq]: [usize; 2],
    first: usize,
    heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let width = fused.len() / (batch * seq);
    let mut out = vec![0.0; batch * heads * seq * head_dim];
    for (b, per_batch) in out.chunks_exact_mut(heads * seq * head_dim).enumerate() {
        for (h, per_head) in per_batch.chunks_exact_mut(seq * head_dim).enumerate() {
            for (s, dst) in per_head.chunks_exact_mut(head_dim).enumerate() {
                let at = (b * seq + s) * width + (first + h) * head_dim;
                dst.copy_from_slice(&fused[at..at + head_dim]);
            }
        }
    }
    out
}

/// Rotates `x` `[batch, heads, seq, head_dim]` in place: position `s` of batch row `b` by entry
/// `b * seq + s` of `angles`, or entry `s` when every row shares one list of positions.
pub(crate) fn rotate_heads(
    x: &mut [f32],
    [batch, heads, seq, head_dim]: [usize; 4],
    angles: &HostAngles,
    shared_positions: bool,
) {
    debug_assert_eq!(x.len(), batch * heads * seq * head_dim);
    for (b, per_batch) in x.chunks_exact_mut(heads * seq * head_dim).enumerate() {
        for per_head in per_batch.chunks_exact_mut(seq * head_dim) {
            for (s, head) in per_head.chunks_exact_mut(head_dim).enumerate() {
                let entry = if shared_positions { s } else { b * seq + s };
                angles.rotate(entry, head);
            }
        }
    }
}
