//! A preallocated pair of key/value tensors written in place: the storage under every exact kind.

use std::ops::Range;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::caches::kv_cache::check_indices;
use crate::error::Result;

/// Keys and values `[batch, kv_heads, capacity, head_dim]`, written slot by slot.
///
/// Methods take `self` by value and return it: a write moves the sole handle into
/// `slice_assign`, which then writes in place instead of copying the whole buffer.
#[derive(Debug, Clone)]
pub(crate) struct KvBuffer<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
}

impl<B: Backend> KvBuffer<B> {
    /// A zeroed buffer of shape `[batch, kv_heads, capacity, head_dim]`.
    pub fn zeros(dims: [usize; 4], device: &B::Device) -> Self {
        Self {
            keys: Tensor::zeros(dims, device),
            values: Tensor::zeros(dims, device),
        }
    }

    /// A buffer that takes these tensors as its storage.
    pub fn from_tensors(keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Self {
        Self { keys, values }
    }

    /// `[batch, kv_heads, capacity, head_dim]`.
    pub fn dims(&self) -> [usize; 4] {
        self.keys.dims()
    }

    /// Slots along the sequence axis.
    pub fn capacity(&self) -> usize {
        self.dims()[2]
    }

    /// The device the buffer lives on.
    pub fn device(&self) -> B::Device {
        self.keys.device()
    }

    /// Writes `keys`/`values` `[rows, kv_heads, n, head_dim]` at batch rows `0..rows`, slots
    /// `slot..slot + n`.
    pub fn write(self, slot: usize, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Self {
        let [rows, heads, n, head_dim] = keys.dims();
        let ranges = [0..rows, 0..heads, slot..slot + n, 0..head_dim];
        Self {
            keys: self.keys.slice_assign(ranges.clone(), keys),
            values: self.values.slice_assign(ranges, values),
        }
    }

    /// Keys and values of batch rows `rows`, slots `slots`. Reading the whole buffer hands out
    /// handles (no copy); a part is copied out on backends whose slices are not views.
    pub fn read(&self, rows: Range<usize>, slots: Range<usize>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, heads, capacity, head_dim] = self.dims();
        if rows == (0..batch) && slots == (0..capacity) {
            return (self.keys.clone(), self.values.clone());
        }
        let ranges = [rows, 0..heads, slots, 0..head_dim];
        (
            self.keys.clone().slice(ranges.clone()),
            self.values.clone().slice(ranges),
        )
    }

    /// Keys and values of the slots listed, in that order (batch rows `rows`).
    pub fn gather_slots(
        &self,
        rows: Range<usize>,
        slots: &[usize],
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (keys, values) = self.read(rows, 0..self.capacity());
        let index = index_tensor::<B>(slots, &self.device());
        (keys.select(2, index.clone()), values.select(2, index))
    }

    /// A buffer with `capacity` slots holding slots `0..keep` of this one (rows `0..rows`).
    pub fn resized(self, rows: usize, capacity: usize, keep: usize) -> Self {
        let [_, heads, _, head_dim] = self.dims();
        let grown = Self::zeros([rows, heads, capacity, head_dim], &self.device());
        if keep == 0 {
            return grown;
        }
        let (keys, values) = self.read(0..rows, 0..keep);
        drop(self);
        grown.write(0, keys, values)
    }

    /// Keeps the batch rows at `indices`, in order (repeats allowed).
    pub fn select_rows(self, indices: &[usize]) -> Self {
        let index = index_tensor::<B>(indices, &self.device());
        Self {
            keys: self.keys.select(0, index.clone()),
            values: self.values.select(0, index),
        }
    }

    /// Bytes of the two tensors.
    pub fn bytes(&self) -> usize {
        let elements: usize = self.dims().iter().product();
        2 * elements * self.keys.dtype().size()
    }
}

/// Keeps the batch rows at `indices` of an optional buffer, after checking them; leaves the
/// buffer untouched on error and does nothing when there is no buffer yet.
pub(crate) fn select_rows_checked<B: Backend>(
    buffer: &mut Option<KvBuffer<B>>,
    indices: &[usize],
) -> Result<()> {
    if let Some(held) = buffer.as_ref() {
        check_indices(indices, held.dims()[0])?;
    }
    *buffer = buffer.take().map(|held| held.select_rows(indices));
    Ok(())
}

/// A 1-D int tensor of indices on `device`, for `select` (rows of a cache, an embedding, a
/// rotary table).
///
/// ```
/// use burn_ndarray::NdArray;
/// use kv_core::index_tensor;
///
/// let index = index_tensor::<NdArray>(&[2, 0], &Default::default());
/// assert_eq!(index.dims(), [2]);
/// ```
pub fn index_tensor<B: Backend>(indices: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let data: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [indices.len()]), device)
}
