//! Where a [`super::store::PagedStore`] keeps one layer's keys and values: a pair of backend
//! tensors on any device, or host memory that kv-kernels' attention reads in place through a
//! sequence's block table ([`HostKv`]).
//!
//! A tensor pool serves every backend, but attention over a sequence whose blocks are not
//! neighbours must gather its keys first (a copy per layer and step), and a CPU kernel must
//! then copy them out of the tensor again. vLLM's paged attention kernel instead walks the
//! block table while it reads; [`KvMemory::Host`] does the same on the host: the store's slots
//! are plain `f32`s, a step's new keys are copied into their slots, and attention reads each
//! block where it lies. What it costs: host storage suits backends that compute in host memory
//! (a GPU model keeps [`KvMemory::Device`]), and reads for anything but the host kernels (a
//! saved prompt cache, the split-keys path) copy into a tensor.

use std::ops::Range;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use kv_kernels::attention::HeadKeys;

use crate::caches::buffer::KvBuffer;

/// Where a paged store keeps its keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvMemory {
    /// Backend tensors on the device (any backend; reads through non-neighbouring blocks
    /// gather a copy).
    #[default]
    Device,
    /// Host memory, read in place by kv-kernels' attention through block tables
    /// ([`super::store::PagedStore::host_kv`]). For backends that compute on the host.
    Host,
}

/// One layer's keys and values `[kv_heads, slots, head_dim]` in host memory.
#[derive(Debug, Clone)]
pub(crate) struct HostLayer {
    keys: Vec<f32>,
    values: Vec<f32>,
    kv_heads: usize,
    slots: usize,
    head_dim: usize,
}

impl HostLayer {
    /// Offset of `slot` of `head`.
    fn at(&self, head: usize, slot: usize) -> usize {
        (head * self.slots + slot) * self.head_dim
    }

    /// Slots `slots` (in that order) of every head, `[1, kv_heads, slots.len(), head_dim]`.
    fn gather(&self, slots: impl Iterator<Item = usize> + Clone) -> (Vec<f32>, Vec<f32>) {
        let d = self.head_dim;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for head in 0..self.kv_heads {
            for slot in slots.clone() {
                let at = self.at(head, slot);
                keys.extend_from_slice(&self.keys[at..at + d]);
                values.extend_from_slice(&self.values[at..at + d]);
            }
        }
        (keys, values)
    }
}

/// One layer of a paged store's pool.
#[derive(Debug)]
pub(crate) enum LayerStorage<B: Backend> {
    /// `[1, kv_heads, slots, head_dim]` tensors (taken out while a write owns them).
    Device(Option<KvBuffer<B>>),
    /// Host memory.
    Host(HostLayer),
}

impl<B: Backend> LayerStorage<B> {
    /// Zeroed storage of `slots` slots for `kv_heads` heads of `head_dim` values.
    pub(crate) fn zeros(
        memory: KvMemory,
        [kv_heads, slots, head_dim]: [usize; 3],
        device: &B::Device,
    ) -> Self {
        match memory {
            KvMemory::Device => LayerStorage::Device(Some(KvBuffer::zeros(
                [1, kv_heads, slots, head_dim],
                device,
            ))),
            KvMemory::Host => LayerStorage::Host(HostLayer {
                keys: vec![0.0; kv_heads * slots * head_dim],
                values: vec![0.0; kv_heads * slots * head_dim],
                kv_heads,
                slots,
                head_dim,
            }),
        }
    }

    /// Writes `keys`/`values` `[1, kv_heads, n, head_dim]` into slots `slot..slot + n`.
    pub(crate) fn write(&mut self, slot: usize, keys: Tensor<B, 4>, values: Tensor<B, 4>) {
        match self {
            LayerStorage::Device(buffer) => {
                let taken = buffer.take().expect("storage is put back after each use");
                *buffer = Some(taken.write(slot, keys, values));
            }
            LayerStorage::Host(layer) => {
                let n = keys.dims()[2];
                let (keys, values) = (host(keys), host(values));
                let run = n * layer.head_dim;
                for head in 0..layer.kv_heads {
                    let at = layer.at(head, slot);
                    layer.keys[at..at + run].copy_from_slice(&keys[head * run..][..run]);
                    layer.values[at..at + run].copy_from_slice(&values[head * run..][..run]);
                }
            }
        }
    }

    /// Copies slots `from..from + n` onto `to..to + n` (a shared block's copy on write).
    pub(crate) fn copy_slots(&mut self, from: usize, to: usize, n: usize) {
        match self {
            LayerStorage::Device(buffer) => {
                let taken = buffer.take().expect("storage is put back after each use");
                let slots: Vec<usize> = (from..from + n).collect();
                // `gather_slots` selects into new tensors, so the write owns the storage alone.
                let (keys, values) = taken.gather_slots(0..1, &slots);
                *buffer = Some(taken.write(to, keys, values));
            }
            LayerStorage::Host(layer) => {
                let run = n * layer.head_dim;
                for head in 0..layer.kv_heads {
                    let (src, dst) = (layer.at(head, from), layer.at(head, to));
                    layer.keys.copy_within(src..src + run, dst);
                    layer.values.copy_within(src..src + run, dst);
                }
            }
        }
    }

    /// Slots `slots` as `[1, kv_heads, len, head_dim]` tensors: a slice of the device pool
    /// (a copy from host storage).
    pub(crate) fn read(
        &self,
        slots: Range<usize>,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match self {
            LayerStorage::Device(buffer) => buffer
                .as_ref()
                .expect("storage is put back after each use")
                .read(0..1, slots),
            LayerStorage::Host(layer) => {
                let len = slots.len();
                let (keys, values) = layer.gather(slots);
                tensors(layer, keys, values, len, device)
            }
        }
    }

    /// The slots listed, in that order, as `[1, kv_heads, len, head_dim]` tensors (a copy).
    pub(crate) fn gather(
        &self,
        slots: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match self {
            LayerStorage::Device(buffer) => buffer
                .as_ref()
                .expect("storage is put back after each use")
                .gather_slots(0..1, slots),
            LayerStorage::Host(layer) => {
                let (keys, values) = layer.gather(slots.iter().copied());
                tensors(layer, keys, values, slots.len(), device)
            }
        }
    }

    /// The host storage, if that is where this layer lives.
    pub(crate) fn host(&self) -> Option<&HostLayer> {
        match self {
            LayerStorage::Host(layer) => Some(layer),
            LayerStorage::Device(_) => None,
        }
    }
}

/// A tensor's values as `f32`s.
fn host<B: Backend>(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 after convert")
}

/// Gathered host values as `[1, kv_heads, len, head_dim]` tensors.
fn tensors<B: Backend>(
    layer: &HostLayer,
    keys: Vec<f32>,
    values: Vec<f32>,
    len: usize,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let dims = [1, layer.kv_heads, len, layer.head_dim];
    (
        Tensor::from_data(TensorData::new(keys, dims), device),
        Tensor::from_data(TensorData::new(values, dims), device),
    )
}

/// One layer of one sequence's keys and values where a [`KvMemory::Host`] store keeps them:
/// per key/value head, the pool's slots and the sequence's block table
/// ([`HostKv::head`]), for kv-kernels' attention to read in place.
#[derive(Debug, Clone)]
pub struct HostKv<'a> {
    layer: &'a HostLayer,
    block_size: usize,
    blocks: Vec<usize>,
    len: usize,
}

impl<'a> HostKv<'a> {
    pub(crate) fn new(
        layer: &'a HostLayer,
        block_size: usize,
        blocks: Vec<usize>,
        len: usize,
    ) -> Self {
        Self {
            layer,
            block_size,
            blocks,
            len,
        }
    }

    /// Positions the sequence holds: keys `0..len` may be read.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the sequence holds no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.layer.kv_heads
    }

    /// Key/value head `head`'s keys and values, read through the block table.
    ///
    /// # Panics
    /// If `head` is not below [`HostKv::kv_heads`].
    pub fn head(&self, head: usize) -> HeadKeys<'_> {
        let l = self.layer;
        assert!(head < l.kv_heads, "head {head} of {}", l.kv_heads);
        let span = l.at(head, 0)..l.at(head + 1, 0);
        HeadKeys::blocks(
            &l.keys[span.clone()],
            &l.values[span],
            l.head_dim,
            self.block_size,
            &self.blocks,
        )
    }
}
