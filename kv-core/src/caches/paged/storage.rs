//! Where a [`super::store::PagedStore`] keeps one layer's keys and values: a pair of backend
//! tensors on any device, or host memory that kv-kernels' attention reads in place through a
//! sequence's block table ([`HostKv`]).
//!
//! A tensor pool serves every backend, but attention over a sequence whose blocks are not
//! neighbours must gather its keys first (a copy per layer and step), and a CPU kernel must
//! then copy them out of the tensor again. vLLM's paged attention kernel instead walks the
//! block table while it reads; [`KvMemory::Host`] does the same on the host: the store's slots
//! are plain `f32`s (or `f16`s, or 8-bit rows with a scale each: [`KvDtype`]), a step's new
//! keys are copied (narrowed) into their slots, and attention reads each block where it lies,
//! widening it to `f32` as it goes. What it costs: host storage suits backends that compute in host memory
//! (a GPU model keeps [`KvMemory::Device`]), and reads for anything but the host kernels (a
//! saved prompt cache, the split-keys path) copy into a tensor.

use std::ops::Range;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use kv_kernels::attention::{HeadKeys, Rows};

use crate::caches::buffer::KvBuffer;

/// Where a paged store keeps its keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvMemory {
    /// Backend tensors on the device (any backend; reads through non-neighbouring blocks
    /// gather a copy). Always `f32`.
    #[default]
    Device,
    /// Host memory, in `dtype`, read in place by kv-kernels' attention through block tables
    /// ([`super::store::PagedStore::host_kv`]). For backends that compute on the host.
    Host(KvDtype),
}

/// The type a host pool stores keys and values in (vLLM's `--kv-cache-dtype`, llama.cpp's
/// `-ctk`/`-ctv`). Narrower types fit more positions in the same bytes; attention widens each
/// block to `f32` as it reads it.
///
/// ```
/// use kv_core::KvDtype;
///
/// let int8: KvDtype = "int8".parse().unwrap();
/// // A 64-value row: 256 bytes as f32, 128 as f16, 68 as int8 (its values and one scale).
/// assert_eq!(
///     [KvDtype::F32, KvDtype::F16, int8].map(|t| t.row_bytes(64)),
///     [256, 128, 68]
/// );
/// assert!("int3".parse::<KvDtype>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// 32-bit floats: the values computed, unchanged.
    #[default]
    F32,
    /// 16-bit floats (10-bit mantissa): a relative error under 2^-11 per value.
    F16,
    /// Symmetric 8-bit integers with one `f32` scale per row of `head_dim` values (the row's
    /// largest magnitude over 127): an error under half a step, `max|x| / 254`, per value.
    Int8,
}

impl KvDtype {
    /// Bytes one row of `head_dim` values takes.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            KvDtype::F32 => 4 * head_dim,
            KvDtype::F16 => 2 * head_dim,
            KvDtype::Int8 => head_dim + 4,
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Int8 => "int8",
        })
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "auto" => Ok(KvDtype::F32),
            "f16" | "fp16" => Ok(KvDtype::F16),
            "int8" | "q8" => Ok(KvDtype::Int8),
            other => Err(format!(
                "unknown KV cache dtype `{other}`: choose f32, f16 or int8"
            )),
        }
    }
}

/// A host pool's key (or value) rows, `[rows, head_dim]`, in one [`KvDtype`].
#[derive(Debug, Clone)]
enum HostRows {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Int8 { q: Vec<i8>, scales: Vec<f32> },
}

impl HostRows {
    fn zeros(dtype: KvDtype, rows: usize, d: usize) -> Self {
        match dtype {
            KvDtype::F32 => HostRows::F32(vec![0.0; rows * d]),
            KvDtype::F16 => HostRows::F16(vec![half::f16::ZERO; rows * d]),
            KvDtype::Int8 => HostRows::Int8 {
                q: vec![0; rows * d],
                scales: vec![0.0; rows],
            },
        }
    }

    /// Stores `values` (whole rows of `d`) from row `row` on.
    fn write(&mut self, row: usize, values: &[f32], d: usize) {
        let span = row * d..row * d + values.len();
        match self {
            HostRows::F32(x) => x[span].copy_from_slice(values),
            HostRows::F16(x) => {
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut x[span], values)
            }
            HostRows::Int8 { q, scales } => {
                for (i, chunk) in values.chunks(d).enumerate() {
                    let max = chunk.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
                    let scale = max / 127.0;
                    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    scales[row + i] = scale;
                    let at = (row + i) * d;
                    for (out, &x) in q[at..at + d].iter_mut().zip(chunk) {
                        *out = (x * inverse).round().clamp(-127.0, 127.0) as i8;
                    }
                }
            }
        }
    }

    /// Copies rows `from..from + n` onto `to..to + n`.
    fn copy_rows(&mut self, from: usize, to: usize, n: usize, d: usize) {
        let span = from * d..(from + n) * d;
        match self {
            HostRows::F32(x) => x.copy_within(span, to * d),
            HostRows::F16(x) => x.copy_within(span, to * d),
            HostRows::Int8 { q, scales } => {
                q.copy_within(span, to * d);
                scales.copy_within(from..from + n, to);
            }
        }
    }

    /// Row `row` appended to `out` as `f32`s.
    fn extend_row(&self, row: usize, d: usize, out: &mut Vec<f32>) {
        let span = row * d..(row + 1) * d;
        match self {
            HostRows::F32(x) => out.extend_from_slice(&x[span]),
            HostRows::F16(x) => out.extend(x[span].iter().map(|h| h.to_f32())),
            HostRows::Int8 { q, scales } => {
                out.extend(q[span].iter().map(|&v| v as f32 * scales[row]))
            }
        }
    }

    /// Rows `rows` as kv-kernels reads them.
    fn view(&self, rows: Range<usize>, d: usize) -> Rows<'_> {
        let span = rows.start * d..rows.end * d;
        match self {
            HostRows::F32(x) => Rows::F32(&x[span]),
            HostRows::F16(x) => Rows::F16(&x[span]),
            HostRows::Int8 { q, scales } => Rows::Int8 {
                q: &q[span],
                scales: &scales[rows],
            },
        }
    }
}

/// One layer's keys and values `[kv_heads, slots, head_dim]` in host memory.
#[derive(Debug, Clone)]
pub(crate) struct HostLayer {
    keys: HostRows,
    values: HostRows,
    kv_heads: usize,
    slots: usize,
    head_dim: usize,
}

impl HostLayer {
    /// Row of `slot` of `head`.
    fn row(&self, head: usize, slot: usize) -> usize {
        head * self.slots + slot
    }

    /// Slots `slots` (in that order) of every head, `[1, kv_heads, slots.len(), head_dim]`.
    fn gather(&self, slots: impl Iterator<Item = usize> + Clone) -> (Vec<f32>, Vec<f32>) {
        let d = self.head_dim;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for head in 0..self.kv_heads {
            for slot in slots.clone() {
                let row = self.row(head, slot);
                self.keys.extend_row(row, d, &mut keys);
                self.values.extend_row(row, d, &mut values);
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
            KvMemory::Host(dtype) => LayerStorage::Host(HostLayer {
                keys: HostRows::zeros(dtype, kv_heads * slots, head_dim),
                values: HostRows::zeros(dtype, kv_heads * slots, head_dim),
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
                let (d, run) = (layer.head_dim, n * layer.head_dim);
                for head in 0..layer.kv_heads {
                    let row = layer.row(head, slot);
                    layer.keys.write(row, &keys[head * run..][..run], d);
                    layer.values.write(row, &values[head * run..][..run], d);
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
                let d = layer.head_dim;
                for head in 0..layer.kv_heads {
                    let (src, dst) = (layer.row(head, from), layer.row(head, to));
                    layer.keys.copy_rows(src, dst, n, d);
                    layer.values.copy_rows(src, dst, n, d);
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
        let rows = l.row(head, 0)..l.row(head + 1, 0);
        HeadKeys::stored(
            l.keys.view(rows.clone(), l.head_dim),
            l.values.view(rows, l.head_dim),
            l.head_dim,
        )
        .through(self.block_size, &self.blocks)
    }
}
