//! Rotary position embeddings (RoPE) in the "rotate half" layout of Hugging Face Llama.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::buffer::index_tensor;
use crate::{error::Result, CacheError};

/// Cosine/sine tables for rotary embeddings, grown on demand.
///
/// Dimension `i < head_dim / 2` pairs with `i + head_dim / 2`; both rotate by
/// `position * inv_freq[i]`, with `inv_freq[i] = theta^(-2i / head_dim)` by default. This is the
/// layout of Hugging Face Llama checkpoints (`rotate_half`), not the interleaved-pairs layout.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::RotaryTable;
///
/// let device = Default::default();
/// let mut rope = RotaryTable::<NdArray>::new(8, 10_000.0, &device).unwrap();
/// let x = Tensor::<NdArray, 4>::ones([1, 1, 3, 8], &device);
/// let rotated = rope.apply(x, &[0, 1, 2]);
/// assert_eq!(rotated.dims(), [1, 1, 3, 8]);
/// ```
#[derive(Debug, Clone)]
pub struct RotaryTable<B: Backend> {
    inv_freq: Vec<f32>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    device: B::Device,
}

impl<B: Backend> RotaryTable<B> {
    /// Tables for `head_dim` (even) and base `theta`.
    pub fn new(head_dim: usize, theta: f32, device: &B::Device) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(CacheError::InvalidConfig(format!(
                "rotary head_dim must be even and positive, got {head_dim}"
            )));
        }
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self::from_inv_freq(inv_freq, device)
    }

    /// Tables for given inverse frequencies (`head_dim / 2` of them), e.g. after rope scaling.
    pub fn from_inv_freq(inv_freq: Vec<f32>, device: &B::Device) -> Result<Self> {
        if inv_freq.is_empty() {
            return Err(CacheError::InvalidConfig(
                "rotary needs at least one frequency".into(),
            ));
        }
        let (cos, sin) = tables(&inv_freq, 64, device);
        Ok(Self {
            inv_freq,
            cos,
            sin,
            device: device.clone(),
        })
    }

    /// Size of one head.
    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]`, row `s` at `positions[s]`.
    ///
    /// # Panics
    /// If `positions.len() != seq` or `x`'s last dimension is not [`RotaryTable::head_dim`].
    pub fn apply(&mut self, x: Tensor<B, 4>, positions: &[usize]) -> Tensor<B, 4> {
        let [_, _, seq, head_dim] = x.dims();
        assert_eq!(positions.len(), seq, "one position per row");
        assert_eq!(head_dim, self.head_dim(), "rotary head_dim");
        let needed = positions.iter().max().map_or(0, |&p| p + 1);
        if needed > self.cos.dims()[0] {
            let (cos, sin) = tables(&self.inv_freq, needed.next_power_of_two(), &self.device);
            self.cos = cos;
            self.sin = sin;
        }
        let index = index_tensor::<B>(positions, &self.device);
        let cos = self
            .cos
            .clone()
            .select(0, index.clone())
            .reshape([1, 1, seq, head_dim]);
        let sin = self
            .sin
            .clone()
            .select(0, index)
            .reshape([1, 1, seq, head_dim]);
        let half = head_dim / 2;
        let first = x.clone().narrow(3, 0, half);
        let second = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos + rotated * sin
    }
}

/// `[positions, head_dim]` cosine and sine tables, computed in f32 as transformers does.
fn tables<B: Backend>(
    inv_freq: &[f32],
    positions: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let head_dim = 2 * inv_freq.len();
    let mut cos = Vec::with_capacity(positions * head_dim);
    let mut sin = Vec::with_capacity(positions * head_dim);
    for position in 0..positions {
        for _ in 0..2 {
            for &freq in inv_freq {
                let angle = position as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [positions, head_dim]), device),
        Tensor::from_data(TensorData::new(sin, [positions, head_dim]), device),
    )
}
