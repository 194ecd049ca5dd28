//! A weight matrix in one storage format, and its products with rows of activations.

use std::ops::Range;
use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::block_dot;
use crate::blocks::{
    quantize_row, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8, BlockQ8_0, WeightBlock, BLOCK, QK_K,
};
use crate::dot;
use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::packed::{Interleave, Packed, Q4_0x8, Q4_1x8, Q5_0x8, Q5_1x8, Q8_0x8, Unit, GROUP};
use crate::threads::Threads;

/// How a matrix stores its values: as floats, or in one of ggml's block formats exactly as a
/// GGUF file stores it (see [`crate::blocks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// 4 bytes a value.
    F32,
    /// 2 bytes a value (IEEE half).
    F16,
    /// ggml's Q8_0: 34 bytes per 32 values (8.5 bits a value).
    Q8_0,
    /// ggml's Q4_1: 20 bytes per 32 values (5 bits a value).
    Q4_1,
    /// ggml's Q4_0: 18 bytes per 32 values (4.5 bits a value).
    Q4_0,
    /// ggml's Q5_0: 22 bytes per 32 values (5.5 bits a value).
    Q5_0,
    /// ggml's Q5_1: 24 bytes per 32 values (6 bits a value).
    Q5_1,
    /// ggml's Q4_K: 144 bytes per 256 values (4.5 bits a value).
    Q4K,
    /// ggml's Q5_K: 176 bytes per 256 values (5.5 bits a value).
    Q5K,
    /// ggml's Q6_K: 210 bytes per 256 values (6.56 bits a value).
    Q6K,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 10] = [
        Format::F32,
        Format::F16,
        Format::Q8_0,
        Format::Q4_1,
        Format::Q4_0,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
    ];

    /// `(values, bytes)` of one block: `(1, 4)` and `(1, 2)` for the float formats.
    pub fn block(self) -> (usize, usize) {
        use std::mem::size_of;
        match self {
            Format::F32 => (1, 4),
            Format::F16 => (1, 2),
            Format::Q8_0 => (BLOCK, size_of::<BlockQ8_0>()),
            Format::Q4_1 => (BLOCK, size_of::<BlockQ4_1>()),
            Format::Q4_0 => (BLOCK, size_of::<BlockQ4_0>()),
            Format::Q5_0 => (BLOCK, size_of::<BlockQ5_0>()),
            Format::Q5_1 => (BLOCK, size_of::<BlockQ5_1>()),
            Format::Q4K => (QK_K, size_of::<BlockQ4K>()),
            Format::Q5K => (QK_K, size_of::<BlockQ5K>()),
            Format::Q6K => (QK_K, size_of::<BlockQ6K>()),
        }
    }

    /// Values per block: a row's width must divide by it.
    pub fn block_values(self) -> usize {
        self.block().0
    }

    /// Bytes that a row of `cols` values takes.
    pub fn row_bytes(self, cols: usize) -> usize {
        let (values, bytes) = self.block();
        cols / values * bytes
    }

    /// Bits a value takes, scales included.
    pub fn bits_per_value(self) -> f64 {
        let (values, bytes) = self.block();
        8.0 * bytes as f64 / values as f64
    }

    /// Whether rows are cut into blocks (so widths must divide by [`Format::block_values`]).
    pub fn is_blocked(self) -> bool {
        self.block_values() > 1
    }

    /// The lowercase name (`f32`, `q8_0`, `q4_k`...), as ggml and llama.cpp write it.
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::Q8_0 => "q8_0",
            Format::Q4_1 => "q4_1",
            Format::Q4_0 => "q4_0",
            Format::Q5_0 => "q5_0",
            Format::Q5_1 => "q5_1",
            Format::Q4K => "q4_k",
            Format::Q5K => "q5_k",
            Format::Q6K => "q6_k",
        }
    }

    /// Whether the format is kept row-major and multiplied by [`crate::block_dot`]'s row
    /// kernels (the formats that are not interleaved eight rows at a time).
    fn is_row_major_blocks(self) -> bool {
        self.is_blocked()
            && !matches!(
                self,
                Format::Q8_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q4_0
            )
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The values: f32 and f16 row after row, the block formats in groups of eight interleaved
/// rows (see [`crate::packed`]).
#[derive(Debug, Clone, PartialEq)]
enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8_0(Packed<Q8_0x8>),
    Q4_1(Packed<Q4_1x8>),
    Q5_0(Packed<Q5_0x8>),
    Q5_1(Packed<Q5_1x8>),
    Q4_0(Packed<Q4_0x8>),
    /// The other block formats, row after row.
    Rows(RowBlocks),
    /// Matrices of different formats stacked row-wise ([`Matrix::stack`]), each of one
    /// format: a GGUF mix (`Q4_K_M`) stores the projections a layer fuses in different types.
    Parts(Vec<Matrix>),
}

/// A block format kept row-major: `rows * cols / VALUES` blocks, row after row, multiplied
/// by [`crate::block_dot`]'s row kernels.
#[derive(Debug, Clone, PartialEq)]
enum RowBlocks {
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

/// `$body` with `$v` bound to the block vector of whichever format `$rows` holds.
macro_rules! with_blocks {
    ($rows:expr, $v:ident => $body:expr) => {
        match $rows {
            RowBlocks::Q4K($v) => $body,
            RowBlocks::Q5K($v) => $body,
            RowBlocks::Q6K($v) => $body,
        }
    };
}

/// `format`'s variant of [`RowBlocks`] holding `$f::<Block>($args)`, for a generic `$f`.
macro_rules! build_blocks {
    ($format:expr, $f:ident($($arg:expr),*)) => {
        match $format {
            Format::Q4K => RowBlocks::Q4K($f::<BlockQ4K>($($arg),*)),
            Format::Q5K => RowBlocks::Q5K($f::<BlockQ5K>($($arg),*)),
            Format::Q6K => RowBlocks::Q6K($f::<BlockQ6K>($($arg),*)),
            other => unreachable!("{other} is not kept row-major"),
        }
    };
}

/// `values` quantized block by block.
fn quantize_blocks<B: WeightBlock>(values: &[f32]) -> Vec<B> {
    values.chunks_exact(B::VALUES).map(B::quantize).collect()
}

/// Blocks read from a file's bytes (copied into a vector of the block's alignment, so a
/// tensor at any offset of a file can be read).
fn blocks_from_bytes<B: WeightBlock>(bytes: &[u8]) -> Vec<B> {
    bytemuck::pod_collect_to_vec(bytes)
}

/// Row `row`'s values (`out.len()` of them) from row-major blocks.
fn dequantize_row<B: WeightBlock>(blocks: &[B], row: usize, out: &mut [f32]) {
    let per_row = out.len() / B::VALUES;
    B::widen(
        Isa::best(),
        &blocks[row * per_row..(row + 1) * per_row],
        out,
    );
}

/// The blocks of rows `order`, in that order (`per_row` blocks a row).
fn pick_rows<T: Copy>(v: &[T], per_row: usize, order: &[usize]) -> Vec<T> {
    let mut picked = Vec::with_capacity(order.len() * per_row);
    for &r in order {
        picked.extend_from_slice(&v[r * per_row..(r + 1) * per_row]);
    }
    picked
}

/// A `[rows, cols]` weight matrix in one [`Format`], rows as a GGUF tensor and PyTorch's
/// `nn.Linear` weight hold them (`[out_features, in_features]`), so a product `y = x Wᵀ`
/// reads each output's row once, front to back. The block formats keep the file's blocks,
/// eight rows interleaved (see the `packed` module's docs); every method speaks of plain rows.
///
/// ```
/// use kv_kernels::{Format, Matrix};
///
/// // y = x Wᵀ for W = [[1, 2, ...], [0, 0, ...]] (2 rows of 32) and x = all ones.
/// let mut w = vec![0.0f32; 64];
/// for (i, v) in w[..32].iter_mut().enumerate() {
///     *v = i as f32 / 31.0;
/// }
/// let exact = Matrix::from_f32(Format::F32, 2, 32, &w).unwrap();
/// let q8 = Matrix::from_f32(Format::Q8_0, 2, 32, &w).unwrap();
/// let x = vec![1.0f32; 32];
/// let (mut y, mut yq) = (vec![0.0; 2], vec![0.0; 2]);
/// exact.matmul(&x, 1, &mut y);
/// q8.matmul(&x, 1, &mut yq);
/// assert!((y[0] - 16.0).abs() < 1e-4 && y[1] == 0.0);
/// assert!((yq[0] - y[0]).abs() < 0.05);
/// assert_eq!(q8.byte_len(), 2 * 34);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    storage: Storage,
}

/// Weight rows per tile when several activation rows share a pass: the tile stays in L1
/// while every activation row meets it.
const TILE_ROWS: usize = 16;

/// Activation rows from which f32 and f16 products go through `gemm` (a prompt's products)
/// instead of row-by-row dots: its packed micro-kernels reuse each loaded weight across many
/// activation rows.
const GEMM_MIN_ROWS: usize = 16;

/// f16 weight rows widened per `gemm` call in a prompt's product. `gemm` packs the activation
/// rows again on every call, so fewer, wider calls pay that less often; the buffer stays at
/// 320 x 1536 x 4 bytes (1.9 MiB) per thread for SmolLM2's widest input. Measured on a
/// 512-token prompt of SmolLM2-135M (2 threads): 64 rows 0.94 s, 192 rows 0.90 s, 320 rows
/// 0.875 s.
const WIDEN_ROWS: usize = 320;

thread_local! {
    /// f16 rows widened for one `gemm` product, kept for the thread's next product.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Fewest weight rows a thread takes in a split product: below this a share costs more to
/// hand off than to compute.
const MIN_ROWS_PER_THREAD: usize = 64;

impl Matrix {
    /// `rows x cols` f32 values stored as `format` (quantized with ggml's reference rounding
    /// for the block formats).
    ///
    /// # Errors
    /// A length that is not `rows * cols`, or (block formats) `cols` not a multiple of the
    /// format's block.
    pub fn from_f32(format: Format, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        check_shape(format, rows, cols, values.len(), rows * cols, "values")?;
        let storage = match format {
            Format::F32 => Storage::F32(values.to_vec()),
            Format::F16 => Storage::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            Format::Q8_0 => {
                let blocks: Vec<BlockQ8_0> = values
                    .chunks_exact(BLOCK)
                    .map(|c| BlockQ8_0::quantize(c.try_into().expect("32 values")))
                    .collect();
                Storage::Q8_0(Packed::from_plain(&blocks, rows, cols / BLOCK))
            }
            Format::Q4_1 => {
                let blocks: Vec<BlockQ4_1> = values
                    .chunks_exact(BLOCK)
                    .map(|c| BlockQ4_1::quantize(c.try_into().expect("32 values")))
                    .collect();
                Storage::Q4_1(Packed::from_plain(&blocks, rows, cols / BLOCK))
            }
            Format::Q5_0 => Storage::Q5_0(Packed::from_plain(
                &quantize_blocks::<BlockQ5_0>(values),
                rows,
                cols / BLOCK,
            )),
            Format::Q5_1 => Storage::Q5_1(Packed::from_plain(
                &quantize_blocks::<BlockQ5_1>(values),
                rows,
                cols / BLOCK,
            )),
            Format::Q4_0 => Storage::Q4_0(Packed::from_plain(
                &quantize_blocks::<BlockQ4_0>(values),
                rows,
                cols / BLOCK,
            )),
            _ => Storage::Rows(build_blocks!(format, quantize_blocks(values))),
        };
        Ok(Self {
            rows,
            cols,
            storage,
        })
    }

    /// A matrix from the bytes of a GGUF tensor stored as `format`, kept as they are
    /// (little-endian, as GGUF is).
    ///
    /// # Errors
    /// `bytes` not exactly [`Format::row_bytes`] times `rows`, or a block format whose `cols`
    /// is not a multiple of its block.
    pub fn from_ggml_bytes(format: Format, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let expected = format.row_bytes(cols) * rows;
        check_shape(format, rows, cols, bytes.len(), expected, "bytes")?;
        // `pod_collect_to_vec` copies into a vector of the element's alignment, so a tensor at
        // any offset of a file can be read.
        let storage = match format {
            Format::F32 => Storage::F32(bytemuck::pod_collect_to_vec(bytes)),
            Format::F16 => Storage::F16(bytemuck::pod_collect_to_vec(bytes)),
            Format::Q8_0 => Storage::Q8_0(Packed::from_plain(
                &bytemuck::pod_collect_to_vec(bytes),
                rows,
                cols / BLOCK,
            )),
            Format::Q4_1 => Storage::Q4_1(Packed::from_plain(
                &bytemuck::pod_collect_to_vec(bytes),
                rows,
                cols / BLOCK,
            )),
            Format::Q5_0 => Storage::Q5_0(Packed::from_plain(
                &blocks_from_bytes::<BlockQ5_0>(bytes),
                rows,
                cols / BLOCK,
            )),
            Format::Q5_1 => Storage::Q5_1(Packed::from_plain(
                &blocks_from_bytes::<BlockQ5_1>(bytes),
                rows,
                cols / BLOCK,
            )),
            Format::Q4_0 => Storage::Q4_0(Packed::from_plain(
                &blocks_from_bytes::<BlockQ4_0>(bytes),
                rows,
                cols / BLOCK,
            )),
            _ => Storage::Rows(build_blocks!(format, blocks_from_bytes(bytes))),
        };
        Ok(Self {
            rows,
            cols,
            storage,
        })
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The storage format, `None` for a matrix stacked from parts of different formats
    /// (see [`Matrix::part_formats`]).
    pub fn format(&self) -> Option<Format> {
        Some(match self.storage {
            Storage::F32(_) => Format::F32,
            Storage::F16(_) => Format::F16,
            Storage::Q8_0(_) => Format::Q8_0,
            Storage::Q4_1(_) => Format::Q4_1,
            Storage::Q5_0(_) => Format::Q5_0,
            Storage::Q5_1(_) => Format::Q5_1,
            Storage::Q4_0(_) => Format::Q4_0,
            Storage::Rows(RowBlocks::Q4K(_)) => Format::Q4K,
            Storage::Rows(RowBlocks::Q5K(_)) => Format::Q5K,
            Storage::Rows(RowBlocks::Q6K(_)) => Format::Q6K,
            Storage::Parts(_) => return None,
        })
    }

    /// Each part's rows and format, in order: one part for a matrix of one format.
    pub fn part_formats(&self) -> Vec<(usize, Format)> {
        match (&self.storage, self.format()) {
            (Storage::Parts(parts), _) => parts.iter().flat_map(Matrix::part_formats).collect(),
            (_, Some(format)) => vec![(self.rows, format)],
            (_, None) => unreachable!("only parts have no single format"),
        }
    }

    /// Bytes the values take.
    pub fn byte_len(&self) -> usize {
        self.part_formats()
            .iter()
            .map(|&(rows, format)| format.row_bytes(self.cols) * rows)
            .sum()
    }

    /// The format of single-format storage (every storage but [`Storage::Parts`]).
    fn single_format(&self) -> Format {
        self.format()
            .expect("a matrix of parts is handled before its format is asked")
    }

    /// The part holding row `row`, and the row's index inside it.
    fn part_of(parts: &[Matrix], mut row: usize) -> (&Matrix, usize) {
        for part in parts {
            if row < part.rows {
                return (part, row);
            }
            row -= part.rows;
        }
        unreachable!("row inside the matrix")
    }

    /// Row `row`'s values as f32, into `out` (`cols` long).
    ///
    /// # Panics
    /// If `row` is out of range or `out` is not `cols` long.
    pub fn row_to_f32(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} of {}", self.rows);
        assert_eq!(out.len(), self.cols, "output row length");
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[row * self.cols..(row + 1) * self.cols]),
            // half's slice conversion uses F16C where the CPU has it.
            Storage::F16(v) => v[row * self.cols..(row + 1) * self.cols].convert_to_f32_slice(out),
            Storage::Q8_0(p) => {
                let mut chunks = out.chunks_exact_mut(BLOCK);
                p.for_row_blocks(row, |block| {
                    let chunk = chunks.next().expect("a chunk per block");
                    block.dequantize(chunk.try_into().expect("32 values"));
                });
            }
            Storage::Q4_1(p) => {
                let mut chunks = out.chunks_exact_mut(BLOCK);
                p.for_row_blocks(row, |block| {
                    let chunk = chunks.next().expect("a chunk per block");
                    block.dequantize(chunk.try_into().expect("32 values"));
                });
            }
            Storage::Q5_0(p) => {
                let mut chunks = out.chunks_exact_mut(BLOCK);
                p.for_row_blocks(row, |block| {
                    block.dequantize(chunks.next().expect("a chunk per block"));
                });
            }
            Storage::Q5_1(p) => {
                let mut chunks = out.chunks_exact_mut(BLOCK);
                p.for_row_blocks(row, |block| {
                    block.dequantize(chunks.next().expect("a chunk per block"));
                });
            }
            Storage::Q4_0(p) => {
                let mut chunks = out.chunks_exact_mut(BLOCK);
                p.for_row_blocks(row, |block| {
                    WeightBlock::dequantize(&block, chunks.next().expect("a chunk per block"));
                });
            }
            Storage::Rows(blocks) => with_blocks!(blocks, v => dequantize_row(v, row, out)),
            Storage::Parts(parts) => {
                let (part, local) = Self::part_of(parts, row);
                part.row_to_f32(local, out);
            }
        }
    }

    /// Every value as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        self.rows_to_f32(0..self.rows)
    }

    /// The matrix whose row `i` is this one's row `order[i]` (rows move whole, blocks and
    /// all: no value is requantized).
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn select_rows(&self, order: &[usize]) -> Self {
        if let Storage::Parts(parts) = &self.storage {
            // Runs of rows from one part move together, then the runs are stacked.
            let starts: Vec<usize> = parts
                .iter()
                .scan(0, |next, p| {
                    let start = *next;
                    *next += p.rows;
                    Some(start)
                })
                .collect();
            let mut runs: Vec<Matrix> = Vec::new();
            let mut current: Option<(usize, Vec<usize>)> = None;
            for &row in order {
                let k = starts.partition_point(|&s| s <= row) - 1;
                let local = row - starts[k];
                match &mut current {
                    Some((part, rows)) if *part == k => rows.push(local),
                    _ => {
                        if let Some((part, rows)) = current.take() {
                            runs.push(parts[part].select_rows(&rows));
                        }
                        current = Some((k, vec![local]));
                    }
                }
            }
            match current {
                Some((part, rows)) => runs.push(parts[part].select_rows(&rows)),
                None => return parts[0].select_rows(&[]),
            }
            return Self::stack(&runs).expect("parts of one width");
        }
        let (cols, blocks) = (self.cols, self.cols / self.single_format().block_values());
        let storage = match &self.storage {
            Storage::Parts(_) => unreachable!("parts are handled above"),
            Storage::F32(v) => Storage::F32(pick_rows(v, cols, order)),
            Storage::F16(v) => Storage::F16(pick_rows(v, cols, order)),
            Storage::Q8_0(p) => Storage::Q8_0(Packed::from_plain(
                &pick_rows(&p.to_plain(), blocks, order),
                order.len(),
                blocks,
            )),
            Storage::Q4_1(p) => Storage::Q4_1(Packed::from_plain(
                &pick_rows(&p.to_plain(), blocks, order),
                order.len(),
                blocks,
            )),
            Storage::Q5_0(p) => Storage::Q5_0(Packed::from_plain(
                &pick_rows(&p.to_plain(), blocks, order),
                order.len(),
                blocks,
            )),
            Storage::Q5_1(p) => Storage::Q5_1(Packed::from_plain(
                &pick_rows(&p.to_plain(), blocks, order),
                order.len(),
                blocks,
            )),
            Storage::Q4_0(p) => Storage::Q4_0(Packed::from_plain(
                &pick_rows(&p.to_plain(), blocks, order),
                order.len(),
                blocks,
            )),
            Storage::Rows(r) => Storage::Rows(match r {
                RowBlocks::Q4K(v) => RowBlocks::Q4K(pick_rows(v, blocks, order)),
                RowBlocks::Q5K(v) => RowBlocks::Q5K(pick_rows(v, blocks, order)),
                RowBlocks::Q6K(v) => RowBlocks::Q6K(pick_rows(v, blocks, order)),
            }),
        };
        Self {
            rows: order.len(),
            cols,
            storage,
        }
    }

    /// Matrices of one width stacked row-wise (fusing Q/K/V or gate/up into one product).
    /// Parts of one format become one matrix of it; parts of different formats (a GGUF mix
    /// stores a layer's V in more bits than its Q and K) stay each in its own format, runs of
    /// one format joined, and a product meets each run with its own kernels: nothing is
    /// requantized.
    ///
    /// # Errors
    /// No parts, or parts of different widths.
    pub fn stack(parts: &[Matrix]) -> Result<Self> {
        let first = parts.first().ok_or(KernelError::NothingToStack)?;
        for part in parts {
            if part.cols != first.cols {
                return Err(KernelError::MismatchedWidths {
                    first: first.cols,
                    other: part.cols,
                });
            }
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        if parts.iter().any(|p| p.format() != first.format()) {
            // Flatten nested parts, then join each run of one format.
            let flat: Vec<&Matrix> = parts
                .iter()
                .flat_map(|p| match &p.storage {
                    Storage::Parts(inner) => inner.iter().collect::<Vec<_>>(),
                    _ => vec![p],
                })
                .collect();
            let mut runs: Vec<Matrix> = Vec::new();
            let mut start = 0;
            while start < flat.len() {
                let format = flat[start].format();
                let end = start
                    + flat[start..]
                        .iter()
                        .take_while(|p| p.format() == format)
                        .count();
                let run: Vec<Matrix> = flat[start..end].iter().map(|&p| p.clone()).collect();
                runs.push(Self::stack(&run)?);
                start = end;
            }
            return Ok(if runs.len() == 1 {
                runs.pop().expect("one run")
            } else {
                Self {
                    rows,
                    cols: first.cols,
                    storage: Storage::Parts(runs),
                }
            });
        }
        let blocks = first.cols / BLOCK;
        let storage = match &first.storage {
            Storage::F32(_) => Storage::F32(concat(parts, |s| match s {
                Storage::F32(v) => v.clone(),
                _ => unreachable!("formats checked"),
            })),
            Storage::F16(_) => Storage::F16(concat(parts, |s| match s {
                Storage::F16(v) => v.clone(),
                _ => unreachable!("formats checked"),
            })),
            Storage::Q8_0(_) => Storage::Q8_0(Packed::from_plain(
                &concat(parts, |s| match s {
                    Storage::Q8_0(p) => p.to_plain(),
                    _ => unreachable!("formats checked"),
                }),
                rows,
                blocks,
            )),
            Storage::Q4_1(_) => Storage::Q4_1(Packed::from_plain(
                &concat(parts, |s| match s {
                    Storage::Q4_1(p) => p.to_plain(),
                    _ => unreachable!("formats checked"),
                }),
                rows,
                blocks,
            )),
            Storage::Q5_0(_) => Storage::Q5_0(Packed::from_plain(
                &concat(parts, |s| match s {
                    Storage::Q5_0(p) => p.to_plain(),
                    _ => unreachable!("formats checked"),
                }),
                rows,
                blocks,
            )),
            Storage::Q5_1(_) => Storage::Q5_1(Packed::from_plain(
                &concat(parts, |s| match s {
                    Storage::Q5_1(p) => p.to_plain(),
                    _ => unreachable!("formats checked"),
                }),
                rows,
                blocks,
            )),
            Storage::Q4_0(_) => Storage::Q4_0(Packed::from_plain(
                &concat(parts, |s| match s {
                    Storage::Q4_0(p) => p.to_plain(),
                    _ => unreachable!("formats checked"),
                }),
                rows,
                blocks,
            )),
            Storage::Parts(_) => unreachable!("mixed parts are joined above"),
            Storage::Rows(r) => {
                macro_rules! stacked {
                    ($variant:ident) => {
                        RowBlocks::$variant(concat(parts, |s| match s {
                            Storage::Rows(RowBlocks::$variant(v)) => v.clone(),
                            _ => unreachable!("formats checked"),
                        }))
                    };
                }
                Storage::Rows(match r {
                    RowBlocks::Q4K(_) => stacked!(Q4K),
                    RowBlocks::Q5K(_) => stacked!(Q5K),
                    RowBlocks::Q6K(_) => stacked!(Q6K),
                })
            }
        };
        Ok(Self {
            rows,
            cols: first.cols,
            storage,
        })
    }

    /// The same matrix stored as `format` (through f32; for building test references and
    /// for loading a file into another format).
    pub fn convert(&self, format: Format) -> Self {
        if Some(format) == self.format() {
            return self.clone();
        }
        Self::from_f32(format, self.rows, self.cols, &self.to_f32())
            .expect("a valid matrix converts to any format its width allows")
    }

    /// `y = x Wᵀ` on the calling thread: `x` is `[n, cols]`, `y` is `[n, rows]`, both
    /// row-major. Block formats first quantize each row of `x` to 8 bits.
    ///
    /// # Panics
    /// If `x` or `y` has the wrong length.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_with(Isa::best(), x, n, y);
    }

    /// [`Matrix::matmul`] on a given instruction set (tests compare every level with
    /// [`Isa::Scalar`]).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], n: usize, y: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "x is [n, cols]");
        assert_eq!(y.len(), n * self.rows, "y is [n, rows]");
        let input = Input::prepare(self, x, n);
        let rows = self.rows;
        self.rows_into(isa, &input, 0..rows, y);
    }

    /// Output features `outputs` of `y = x Wᵀ` (`[n, outputs.len()]`) on the calling thread:
    /// for callers that already keep every core busy (a prompt's runs of positions).
    ///
    /// # Panics
    /// If `x` is not `[n, cols]` or `outputs` is out of range.
    pub fn matmul_rows(&self, x: &[f32], n: usize, outputs: Range<usize>) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "x is [n, cols]");
        assert!(
            outputs.end <= self.rows,
            "rows {outputs:?} of {}",
            self.rows
        );
        let input = Input::prepare(self, x, n);
        let mut y = vec![0.0; n * outputs.len()];
        self.rows_into(Isa::best(), &input, outputs, &mut y);
        y
    }

    /// `y = x Wᵀ` with the rows of `W` split over `threads` (see [`Matrix::matmul`]).
    pub fn par_matmul(self: &Arc<Self>, x: &[f32], n: usize, threads: &Threads) -> Vec<f32> {
        self.par_matmul_rows(x, n, 0..self.rows, threads)
    }

    /// Output features `outputs` of `y = x Wᵀ` (`[n, outputs.len()]`), the rows of `W` split
    /// over `threads`.
    ///
    /// # Panics
    /// If `x` is not `[n, cols]` or `outputs` is out of range.
    pub fn par_matmul_rows(
        self: &Arc<Self>,
        x: &[f32],
        n: usize,
        outputs: Range<usize>,
        threads: &Threads,
    ) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "x is [n, cols]");
        assert!(
            outputs.end <= self.rows,
            "rows {outputs:?} of {}",
            self.rows
        );
        let input = Arc::new(Input::prepare(self, x, n));
        let isa = Isa::best();
        let (offset, len, matrix) = (outputs.start, outputs.len(), Arc::clone(self));
        // Shares are whole groups of eight rows, so when the range starts on a group boundary
        // (every product of a model does) each thread meets the same groups a single thread
        // would, and the result does not depend on the split.
        let rows_of =
            move |units: Range<usize>| (units.start * GROUP).min(len)..(units.end * GROUP).min(len);
        let parts = threads.split(
            len.div_ceil(GROUP),
            MIN_ROWS_PER_THREAD / GROUP,
            Arc::new(move |units: Range<usize>| {
                let range = rows_of(units);
                let mut out = vec![0.0; n * range.len()];
                let rows = offset + range.start..offset + range.end;
                matrix.rows_into(isa, &input, rows, &mut out);
                out
            }),
        );
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part").1;
        }
        let mut y = vec![0.0; n * len];
        for (units, part) in parts {
            let range = rows_of(units);
            let width = range.len();
            for i in 0..n {
                y[i * len + range.start..i * len + range.end]
                    .copy_from_slice(&part[i * width..(i + 1) * width]);
            }
        }
        y
    }

    /// Rows `rows` as f32, row-major (`[rows.len(), cols]`).
    pub fn rows_to_f32(&self, rows: Range<usize>) -> Vec<f32> {
        let mut out = vec![0.0; rows.len() * self.cols];
        if self.cols > 0 {
            for (row, chunk) in rows.zip(out.chunks_exact_mut(self.cols)) {
                self.row_to_f32(row, chunk);
            }
        }
        out
    }

    /// Rows `range` of `x Wᵀ` into `out`, `[n, range.len()]`.
    fn rows_into(&self, isa: Isa, input: &Input, range: Range<usize>, out: &mut [f32]) {
        let (n, len) = (input.n(), range.len());
        debug_assert_eq!(out.len(), n * len);
        match (&self.storage, &input.rows) {
            // Parts of different formats: each part's rows inside the range, with the
            // activations as that part's format takes them.
            (Storage::Parts(parts), InputRows::Parts(inputs)) => {
                let mut first = 0;
                for (part, input) in parts.iter().zip(inputs) {
                    let (lo, hi) = (range.start.max(first), range.end.min(first + part.rows));
                    if lo < hi {
                        let width = hi - lo;
                        let mut y = vec![0.0; n * width];
                        part.rows_into(isa, input, lo - first..hi - first, &mut y);
                        for i in 0..n {
                            out[i * len + lo - range.start..][..width]
                                .copy_from_slice(&y[i * width..(i + 1) * width]);
                        }
                    }
                    first += part.rows;
                }
            }
            // Several activation rows against block weights: each group of eight rows meets
            // the activation rows `dot::BATCH` at a time, its bytes loaded once per pass.
            (Storage::Q8_0(w), InputRows::Quantized(x)) if n > 1 => {
                let sums = dot::block_sums(isa, x);
                let group = |g: &[Q8_0x8], o: &mut [f32]| {
                    dot::q8_0_group_batch(isa, g, x, &sums, n, o, len)
                };
                let rows =
                    |w: &[BlockQ8_0], x: &[BlockQ8], o: &mut [f32]| dot::q8_0_rows(isa, w, x, o);
                batch_units(w, x, n, range, out, group, rows);
            }
            (Storage::Q5_0(w), InputRows::Quantized(x)) if n > 1 => {
                let group =
                    |g: &[Q5_0x8], o: &mut [f32]| dot::q5_0_group_batch(isa, g, x, n, o, len);
                let rows = |w: &[BlockQ5_0], x: &[BlockQ8], o: &mut [f32]| {
                    block_dot::q5_0_rows(isa, w, x, o)
                };
                batch_units(w, x, n, range, out, group, rows);
            }
            (Storage::Q5_1(w), InputRows::Quantized(x)) if n > 1 => {
                let group =
                    |g: &[Q5_1x8], o: &mut [f32]| dot::q5_1_group_batch(isa, g, x, n, o, len);
                let rows = |w: &[BlockQ5_1], x: &[BlockQ8], o: &mut [f32]| {
                    block_dot::q5_1_rows(isa, w, x, o)
                };
                batch_units(w, x, n, range, out, group, rows);
            }
            (Storage::Q4_0(w), InputRows::Quantized(x)) if n > 1 => {
                let group =
                    |g: &[Q4_0x8], o: &mut [f32]| dot::q4_0_group_batch(isa, g, x, n, o, len);
                let rows = |w: &[BlockQ4_0], x: &[BlockQ8], o: &mut [f32]| {
                    block_dot::q4_0_rows(isa, w, x, o)
                };
                batch_units(w, x, n, range, out, group, rows);
            }
            (Storage::Q4_1(w), InputRows::Quantized(x)) if n > 1 => {
                let group =
                    |g: &[Q4_1x8], o: &mut [f32]| dot::q4_1_group_batch(isa, g, x, n, o, len);
                let rows =
                    |w: &[BlockQ4_1], x: &[BlockQ8], o: &mut [f32]| dot::q4_1_rows(isa, w, x, o);
                batch_units(w, x, n, range, out, group, rows);
            }
            // A prompt against f32, f16 or row-major block weights: `gemm` (those block
            // formats' rows are widened in cache first, as f16 rows are).
            (Storage::F32(_) | Storage::F16(_) | Storage::Rows(_), InputRows::Dense(x))
                if n >= GEMM_MIN_ROWS =>
            {
                self.dense_gemm(x, n, range, out);
            }
            // A few activation rows (a speculative pass) against f32 or f16 rows: each eight
            // weights loaded once for several activation rows.
            (Storage::F32(w), InputRows::Dense(x)) if n > 1 => {
                self.few_rows(isa, w, x, n, range, out);
            }
            (Storage::F16(w), InputRows::Dense(x)) if n > 1 => {
                self.few_rows(isa, w, x, n, range, out);
            }
            // A few activation rows against row-major blocks (the k-quants): each block
            // unpacked once for several activation rows, [`TILE_ROWS`] weight rows at a time.
            (Storage::Rows(w), InputRows::Quantized(x)) if n > 1 => {
                let per_row = self.cols / self.single_format().block_values();
                let mut start = range.start;
                while start < range.end {
                    let end = (start + TILE_ROWS).min(range.end);
                    let at = start - range.start;
                    let span = start * per_row..end * per_row;
                    with_blocks!(w, v => WeightBlock::rows_batch(isa, &v[span], x, n, &mut out[at..], len));
                    start = end;
                }
            }
            _ => {
                let tile = if n == 1 { len.max(1) } else { TILE_ROWS };
                let mut start = range.start;
                while start < range.end {
                    let end = (start + tile).min(range.end);
                    for i in 0..n {
                        let at = i * len + (start - range.start);
                        self.tile(isa, input, i, start..end, &mut out[at..at + (end - start)]);
                    }
                    start = end;
                }
            }
        }
    }

    /// Rows `range` of `x Wᵀ` into `out` (`[n, range.len()]`) for a few activation rows
    /// against f32 or f16 weights `w`, [`TILE_ROWS`] weight rows at a time
    /// ([`dot::dense_rows_batch`]).
    fn few_rows<T: dot::DenseWeight>(
        &self,
        isa: Isa,
        w: &[T],
        x: &[f32],
        n: usize,
        range: Range<usize>,
        out: &mut [f32],
    ) {
        let (cols, len) = (self.cols, range.len());
        let mut start = range.start;
        while start < range.end {
            let end = (start + TILE_ROWS).min(range.end);
            let at = start - range.start;
            let tile = &w[start * cols..end * cols];
            dot::dense_rows_batch(isa, tile, x, n, &mut out[at..], len);
            start = end;
        }
    }

    /// Rows `range` of `x Wᵀ` into `out` (`[n, range.len()]`) through `gemm`, for f32, f16
    /// and row-major block weights. f32 rows are read where they are stored. Other rows are
    /// widened [`WIDEN_ROWS`] at a time into a per-thread buffer that stays in the core's
    /// cache and is reused from product to product, so a widened weight never travels to
    /// memory and back, and a prompt's product costs what an f32 one does, whatever its
    /// weights' format (measured against 8-bit batch kernels for these formats on AVX2, where
    /// unpacking a block again for each activation row cost more than the widening).
    fn dense_gemm(&self, x: &[f32], n: usize, range: Range<usize>, out: &mut [f32]) {
        let (cols, len) = (self.cols, range.len());
        assert_eq!(x.len(), n * cols, "x is [n, cols]");
        assert_eq!(out.len(), n * len, "out is [n, rows]");
        if n == 0 || len == 0 || cols == 0 {
            out.fill(0.0);
            return;
        }
        // Output columns `first..first + w.len() / cols` from weight rows `w`.
        let mut product = |w: &[f32], first: usize| {
            let width = w.len() / cols;
            assert!(first + width <= len, "columns inside out");
            // SAFETY: gemm reads the `n x cols` matrix `x` (row stride `cols`, column stride
            // 1) and the `cols x width` matrix `wᵀ` (element `(k, j)` at `w[j * cols + k]`),
            // and writes the `n x width` block of `out` starting at column `first` (row stride
            // `len`): the asserts above keep every element inside its slice, and `out` is
            // borrowed mutably, so nothing else reads or writes it meanwhile.
            unsafe {
                gemm::gemm(
                    n,
                    width,
                    cols,
                    out.as_mut_ptr().add(first),
                    1,
                    len as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    w.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        match &self.storage {
            Storage::F32(v) => product(&v[range.start * cols..range.end * cols], 0),
            Storage::F16(_) | Storage::Rows(_) => WIDENED.with(|buffer| {
                let mut buffer = buffer.borrow_mut();
                for first in (0..len).step_by(WIDEN_ROWS) {
                    let rows = (len - first).min(WIDEN_ROWS);
                    buffer.resize(rows * cols, 0.0);
                    for (r, chunk) in buffer.chunks_exact_mut(cols).enumerate() {
                        self.row_to_f32(range.start + first + r, chunk);
                    }
                    product(&buffer, first);
                }
            }),
            _ => unreachable!("dense_gemm serves f32 and f16 weights"),
        }
    }

    /// Rows `rows` of this matrix against activation row `i`.
    fn tile(&self, isa: Isa, input: &Input, i: usize, rows: Range<usize>, out: &mut [f32]) {
        let (cols, blocks) = (self.cols, self.cols / BLOCK);
        match (&self.storage, &input.rows) {
            (Storage::F32(w), InputRows::Dense(x)) => dot::f32_rows(
                isa,
                &w[rows.start * cols..rows.end * cols],
                &x[i * cols..(i + 1) * cols],
                out,
            ),
            (Storage::F16(w), InputRows::Dense(x)) => dot::f16_rows(
                isa,
                &w[rows.start * cols..rows.end * cols],
                &x[i * cols..(i + 1) * cols],
                out,
            ),
            (Storage::Q8_0(w), InputRows::Quantized(x)) => {
                let x = &x[i * blocks..(i + 1) * blocks];
                w.for_rows(
                    rows,
                    out,
                    |group, o| dot::q8_0_group(isa, group, x, o),
                    |plain, o| dot::q8_0_rows(isa, plain, x, o),
                );
            }
            (Storage::Q4_1(w), InputRows::Quantized(x)) => {
                let x = &x[i * blocks..(i + 1) * blocks];
                w.for_rows(
                    rows,
                    out,
                    |group, o| dot::q4_1_group(isa, group, x, o),
                    |plain, o| dot::q4_1_rows(isa, plain, x, o),
                );
            }
            (Storage::Q5_0(w), InputRows::Quantized(x)) => {
                let x = &x[i * blocks..(i + 1) * blocks];
                w.for_rows(
                    rows,
                    out,
                    |group, o| dot::q5_0_group(isa, group, x, o),
                    |plain, o| block_dot::q5_0_rows(isa, plain, x, o),
                );
            }
            (Storage::Q5_1(w), InputRows::Quantized(x)) => {
                let x = &x[i * blocks..(i + 1) * blocks];
                w.for_rows(
                    rows,
                    out,
                    |group, o| dot::q5_1_group(isa, group, x, o),
                    |plain, o| block_dot::q5_1_rows(isa, plain, x, o),
                );
            }
            (Storage::Q4_0(w), InputRows::Quantized(x)) => {
                let x = &x[i * blocks..(i + 1) * blocks];
                w.for_rows(
                    rows,
                    out,
                    |group, o| dot::q4_0_group(isa, group, x, o),
                    |plain, o| block_dot::q4_0_rows(isa, plain, x, o),
                );
            }
            (Storage::Rows(w), InputRows::Quantized(x)) => {
                let x = &x[i * blocks..(i + 1) * blocks];
                let per_row = cols / self.single_format().block_values();
                let span = rows.start * per_row..rows.end * per_row;
                with_blocks!(w, v => WeightBlock::rows(isa, &v[span], x, out));
            }
            _ => unreachable!("Input::prepare follows the format"),
        }
    }
}

/// The activation rows as a format's kernels read them.
struct Input {
    /// Rows of activations.
    n: usize,
    rows: InputRows,
}

enum InputRows {
    /// f32 rows, for f32 and f16 weights.
    Dense(Vec<f32>),
    /// 8-bit blocks, for the block formats.
    Quantized(Vec<BlockQ8>),
    /// One input per part of a matrix of parts.
    Parts(Vec<Input>),
}

impl Input {
    /// The activations `x` (`[n, cols]`) as `matrix`'s kernels read them.
    fn prepare(matrix: &Matrix, x: &[f32], n: usize) -> Self {
        let cols = matrix.cols;
        let format = match &matrix.storage {
            Storage::Parts(parts) => {
                let inputs = parts.iter().map(|p| Input::prepare(p, x, n)).collect();
                return Self {
                    n,
                    rows: InputRows::Parts(inputs),
                };
            }
            _ => matrix.single_format(),
        };
        // Row-major block formats meet a prompt in `gemm`, as f32 rows.
        let widened = format.is_row_major_blocks() && n >= GEMM_MIN_ROWS;
        let rows = if format.is_blocked() && !widened {
            let mut blocks = Vec::with_capacity(n * cols / BLOCK);
            let mut row_blocks = Vec::with_capacity(cols / BLOCK);
            for row in x.chunks_exact(cols.max(1)).take(n) {
                quantize_row(row, &mut row_blocks);
                blocks.extend_from_slice(&row_blocks);
            }
            InputRows::Quantized(blocks)
        } else {
            InputRows::Dense(x.to_vec())
        };
        Self { n, rows }
    }

    fn n(&self) -> usize {
        self.n
    }
}

/// The parts' values one after another, copied slice by slice (an element-wise `flat_map`
/// made loading a model's fused matrices take a tenth of a second).
fn concat<T: Copy>(parts: &[Matrix], values: impl Fn(&Storage) -> Vec<T>) -> Vec<T> {
    let mut all = Vec::new();
    for part in parts {
        all.extend_from_slice(&values(&part.storage));
    }
    all
}

fn check_shape(
    format: Format,
    rows: usize,
    cols: usize,
    found: usize,
    expected: usize,
    what: &'static str,
) -> Result<()> {
    let block = format.block_values();
    if !cols.is_multiple_of(block) {
        return Err(KernelError::RaggedBlocks {
            format,
            block,
            cols,
        });
    }
    if found != expected {
        return Err(KernelError::Length {
            format,
            rows,
            cols,
            what,
            expected,
            found,
        });
    }
    Ok(())
}
/// Rows `range` of `x Wᵀ` into `out` (`[n, range.len()]`) for `n` quantized activation rows
/// against a block format: each full group of eight weight rows through `group` (all the
/// activation rows, written at stride `range.len()`), the plain rows (a tail, or rows of a
/// group the range cuts) through `rows`, one activation row at a time.
fn batch_units<G: Interleave>(
    w: &Packed<G>,
    x: &[BlockQ8],
    n: usize,
    range: Range<usize>,
    out: &mut [f32],
    group: impl Fn(&[G], &mut [f32]),
    rows: impl Fn(&[G::Block], &[BlockQ8], &mut [f32]),
) {
    let (len, blocks) = (range.len(), x.len() / n);
    w.for_units(range, |o, unit| match unit {
        Unit::Group(g) => group(g, &mut out[o..]),
        Unit::Rows {
            blocks: plain,
            count,
        } => {
            for i in 0..n {
                let x = &x[i * blocks..(i + 1) * blocks];
                rows(&plain, x, &mut out[i * len + o..][..count]);
            }
        }
    });
}
