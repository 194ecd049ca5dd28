//! Rotary position embeddings (RoPE) in the "rotate half" layout of Hugging Face Llama.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::caches::buffer::index_tensor;
use crate::{error::Result, CacheError};

/// RoPE's `head_dim / 2` inverse frequencies for base `theta`, `theta^(-2i / head_dim)`,
/// computed in f32 as transformers computes them (rope scaling rescales these).
///
/// ```
/// let f = kv_core::rope_inverse_frequencies(4, 10_000.0);
/// assert_eq!(f, vec![1.0, 0.01]);
/// ```
pub fn rope_inverse_frequencies(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

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
        Self::from_inv_freq(rope_inverse_frequencies(head_dim, theta), device)
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
        let [batch, heads, seq, head_dim] = x.dims();
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
            .reshape([1, 1, seq, head_dim])
            .repeat_dim(0, batch)
            .repeat_dim(1, heads);
        let sin = self
            .sin
            .clone()
            .select(0, index)
            .reshape([1, 1, seq, head_dim])
            .repeat_dim(0, batch)
            .repeat_dim(1, heads);
        rotate_half(x, cos, sin)
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` without touching the stored tables: row `s`
    /// of batch row `b` at `positions[b][s]`, or at `positions[0][s]` for every batch row when
    /// one row of positions is given. Same as `self.angles(positions).apply(x)`.
    ///
    /// # Panics
    /// As [`RotaryTable::angles`] and [`RotaryAngles::apply`].
    ///
    /// ```
    /// use burn::tensor::Tensor;
    /// use burn_ndarray::NdArray;
    /// use kv_core::RotaryTable;
    ///
    /// let device = Default::default();
    /// let rope = RotaryTable::<NdArray>::new(4, 10_000.0, &device).unwrap();
    /// let x = Tensor::<NdArray, 4>::ones([2, 1, 2, 4], &device);
    /// // Row 0 at positions 0 and 1; row 1 (left-padded) at 0 and 0.
    /// let rotated = rope.rotate(x, &[vec![0, 1], vec![0, 0]]);
    /// assert_eq!(rotated.dims(), [2, 1, 2, 4]);
    /// ```
    pub fn rotate(&self, x: Tensor<B, 4>, positions: &[Vec<usize>]) -> Tensor<B, 4> {
        self.angles(positions).apply(x)
    }

    /// The cosines and sines of `positions` in host memory, for callers that rotate rows of
    /// plain `f32` values (a CPU decode step that keeps its activations off the backend).
    /// Same values as [`RotaryTable::angles`].
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_core::RotaryTable;
    ///
    /// let rope = RotaryTable::<NdArray>::new(4, 10_000.0, &Default::default()).unwrap();
    /// let angles = rope.host_angles(&[0, 7]);
    /// let mut head = [1.0, 2.0, 3.0, 4.0];
    /// angles.rotate(0, &mut head); // position 0: no rotation
    /// assert_eq!(head, [1.0, 2.0, 3.0, 4.0]);
    /// ```
    pub fn host_angles(&self, positions: &[usize]) -> HostAngles {
        let (cos, sin) = angles(&self.inv_freq, positions);
        HostAngles {
            cos,
            sin,
            head_dim: self.head_dim(),
        }
    }

    /// The cosines and sines of `positions` (one row per batch row, or one shared row, all
    /// rows the same length), computed for exactly these positions, so they may be
    /// arbitrarily large and differ per row (left padding). A model computes them once per
    /// forward pass and applies them to the queries and keys of every layer.
    ///
    /// # Panics
    /// If `positions` is empty or its rows differ in length.
    pub fn angles(&self, positions: &[Vec<usize>]) -> RotaryAngles<B> {
        let rows = positions.len();
        assert!(rows > 0, "rotary positions: at least one row");
        let seq = positions[0].len();
        let flat: Vec<usize> = positions
            .iter()
            .inspect(|row| assert_eq!(row.len(), seq, "rotary positions: rows of one length"))
            .flatten()
            .copied()
            .collect();
        let (cos, sin) = angles(&self.inv_freq, &flat);
        let shape = [rows, 1, seq, self.head_dim()];
        RotaryAngles {
            cos: Tensor::from_data(TensorData::new(cos, shape), &self.device),
            sin: Tensor::from_data(TensorData::new(sin, shape), &self.device),
        }
    }
}

/// Cosines and sines of a list of positions in host memory, `[positions, head_dim]` each
/// (see [`RotaryTable::host_angles`]).
#[derive(Debug, Clone)]
pub struct HostAngles {
    cos: Vec<f32>,
    sin: Vec<f32>,
    head_dim: usize,
}

impl HostAngles {
    /// Rotates one head's `head_dim` values in place by the angles of entry `index` of the
    /// positions these were made for: `x * cos + rotate_half(x) * sin`, the arithmetic of
    /// [`RotaryAngles::apply`] value by value.
    ///
    /// # Panics
    /// If `head.len()` is not the head size or `index` is past the positions.
    pub fn rotate(&self, index: usize, head: &mut [f32]) {
        let d = self.head_dim;
        assert_eq!(head.len(), d, "rotary head_dim");
        let (cos, sin) = (
            &self.cos[index * d..(index + 1) * d],
            &self.sin[index * d..(index + 1) * d],
        );
        let half = d / 2;
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos[i] + -b * sin[i];
            head[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/// Cosines and sines for a set of positions, `[rows, 1, seq, head_dim]` each (or
/// `[rows, heads, seq, head_dim]`, see [`RotaryAngles::for_heads`]), ready to rotate any number
/// of tensors at those positions.
#[derive(Debug, Clone)]
pub struct RotaryAngles<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

impl<B: Backend> RotaryAngles<B> {
    /// The same angles laid out for `heads` heads, `[rows, heads, seq, head_dim]`, so that
    /// rotating a tensor of that many heads multiplies whole buffers of equal shape instead of
    /// broadcasting (CPU backends run same-shape products on their fastest path). A model makes
    /// one per head count (queries, keys) per forward pass and reuses it in every layer.
    ///
    /// ```
    /// use burn::tensor::Tensor;
    /// use burn_ndarray::NdArray;
    /// use kv_core::RotaryTable;
    ///
    /// let device = Default::default();
    /// let rope = RotaryTable::<NdArray>::new(4, 10_000.0, &device).unwrap();
    /// let angles = rope.angles(&[vec![3, 4]]);
    /// let x = Tensor::<NdArray, 4>::ones([1, 3, 2, 4], &device);
    /// let by_heads = angles.for_heads(3).apply(x.clone());
    /// let broadcast = angles.apply(x);
    /// assert!(by_heads.equal(broadcast).all().into_scalar());
    /// ```
    pub fn for_heads(&self, heads: usize) -> Self {
        Self {
            cos: self.cos.clone().repeat_dim(1, heads),
            sin: self.sin.clone().repeat_dim(1, heads),
        }
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]`.
    ///
    /// # Panics
    /// If `x`'s `seq` or `head_dim` differ from the angles', the angles have neither 1 nor
    /// `batch` rows, or were laid out ([`RotaryAngles::for_heads`]) for another head count.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, heads, seq, head_dim] = x.dims();
        let [rows, angle_heads, angle_seq, angle_dim] = self.cos.dims();
        assert!(
            (rows == 1 || rows == batch)
                && (angle_heads == 1 || angle_heads == heads)
                && angle_seq == seq
                && angle_dim == head_dim,
            "rotary angles {:?} do not fit a tensor of {:?}",
            self.cos.dims(),
            x.dims()
        );
        rotate_half(x, self.cos.clone(), self.sin.clone())
    }
}

/// `x * cos + rotate_half(x) * sin`, where `rotate_half([a, b]) = [-b, a]` over the last
/// dimension; `cos` and `sin` broadcast against `x`.
fn rotate_half<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    let first = x.clone().narrow(3, 0, half);
    let second = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos + rotated * sin
}

/// Cosine and sine of every `position * inv_freq`, row by row in the rotate-half layout
/// (each frequency twice), computed in f32 as transformers does.
fn angles(inv_freq: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let head_dim = 2 * inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.len() * head_dim);
    for &position in positions {
        for _ in 0..2 {
            for &freq in inv_freq {
                let angle = position as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

/// `[positions, head_dim]` cosine and sine tables for positions `0..positions`.
fn tables<B: Backend>(
    inv_freq: &[f32],
    positions: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let head_dim = 2 * inv_freq.len();
    let all: Vec<usize> = (0..positions).collect();
    let (cos, sin) = angles(inv_freq, &all);
    (
        Tensor::from_data(TensorData::new(cos, [positions, head_dim]), device),
        Tensor::from_data(TensorData::new(sin, [positions, head_dim]), device),
    )
}
