//! Block-format weights with eight rows interleaved, so that one vector instruction advances
//! eight rows of a product at once.
//!
//! A matrix-vector product over ggml's row-major blocks spends most of its instructions on
//! per-row bookkeeping: for every block of every row it widens that row's f16 scale, multiplies
//! it by the activation block's scale, broadcasts it and converts an integer dot, and at the
//! end of the row it sums the lanes of a vector. Measured on SmolLM2-135M, those kernels ran
//! at 9-11 GB/s a core, well under what memory delivers (23 GB/s a core for f32 rows).
//!
//! Here the blocks of eight consecutive rows are stored side by side, block column by block
//! column: their eight scales (and Q4_1's eight minimums) in one 16-byte run, their quantized
//! bytes interleaved four at a time (row 0's bytes 0-3, row 1's bytes 0-3, ..., row 7's bytes
//! 0-3, then every row's bytes 4-7, ...). A 32-byte load then holds four bytes of each of the
//! eight rows, one row per 32-bit lane, so a byte multiply-add against four activation bytes
//! broadcast to every lane advances all eight rows; the eight scales widen in one instruction
//! and the eight results come out in one vector, with no horizontal sum. llama.cpp's CPU
//! backend repacks Q4_0 and Q8_0 weights the same way when it loads them; this module applies
//! the idea to the 32-value formats files are made of: Q4_1 (SmolLM2's file), Q8_0, Q4_0, and
//! Q5_0 and Q5_1 (what `Q4_K_M` and `Q5_K_M` mixes store wherever rows are not whole
//! 256-value super-blocks, as in every matrix that reads a 576- or 896-wide hidden state).
//! The five-bit formats' fifth bits are regrouped so that one 32-bit word holds the bits of
//! one 32-byte load of nibbles.
//!
//! What it costs: nothing in memory (the file's bytes, moved: nothing is widened or
//! requantized) and one pass over the weights at load. Rows past the last full group of eight
//! keep the plain layout, and a product that starts inside a group (a column range of a fused
//! matrix that is not a multiple of eight) reads those rows one at a time.

use std::borrow::Cow;

use half::f16;

use crate::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BLOCK};

/// Rows interleaved in one group.
pub(crate) const GROUP: usize = 8;

/// Bytes of one row's block interleaved at a time: one 32-bit lane.
const LANE: usize = 4;

/// Block `b` of eight consecutive Q4_1 rows: 160 bytes, the size of the eight blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct Q4_1x8 {
    /// Each row's step.
    pub d: [f16; GROUP],
    /// Each row's minimum.
    pub m: [f16; GROUP],
    /// The rows' packed levels, four bytes of each row in turn (a byte holds level `j` in its
    /// low nibble and level `j + 16` in its high one, as in [`BlockQ4_1`]).
    pub qs: [u8; GROUP * BLOCK / 2],
}

/// Block `b` of eight consecutive Q8_0 rows: 272 bytes, the size of the eight blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct Q8_0x8 {
    /// Each row's scale.
    pub d: [f16; GROUP],
    /// The rows' values, four of each row in turn.
    pub qs: [i8; GROUP * BLOCK],
}

/// Block `b` of eight consecutive Q4_0 rows: 144 bytes, the size of the eight blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct Q4_0x8 {
    /// Each row's step.
    pub d: [f16; GROUP],
    /// The rows' packed levels, four bytes of each row in turn (as [`Q4_1x8::qs`]).
    pub qs: [u8; GROUP * BLOCK / 2],
}

/// Block `b` of eight consecutive Q5_0 rows: 176 bytes, the size of the eight blocks.
///
/// The nibbles interleave as [`Q4_1x8`]'s do. The fifth bits are regrouped so that one word
/// serves one 32-byte load of nibbles: word `j` (`j < 4`) holds at bit `4r + k` the fifth bit
/// of row `r`'s value `4j + k` (the low nibbles of bytes `4j..4j + 4`), and word `4 + j` that
/// of value `16 + 4j + k` (their high nibbles).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct Q5_0x8 {
    /// Each row's step.
    pub d: [f16; GROUP],
    /// The rows' fifth bits, regrouped as above.
    pub qh: [u32; GROUP],
    /// The rows' low four bits, four bytes of each row in turn.
    pub qs: [u8; GROUP * BLOCK / 2],
}

/// Block `b` of eight consecutive Q5_1 rows: 192 bytes, the size of the eight blocks. The
/// nibbles interleave and the fifth bits regroup as [`Q5_0x8`]'s do.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct Q5_1x8 {
    /// Each row's step.
    pub d: [f16; GROUP],
    /// Each row's minimum.
    pub m: [f16; GROUP],
    /// The rows' fifth bits, regrouped as [`Q5_0x8::qh`].
    pub qh: [u32; GROUP],
    /// The rows' low four bits, four bytes of each row in turn.
    pub qs: [u8; GROUP * BLOCK / 2],
}

/// Row `row`'s 32 fifth bits (`qh` of a five-bit block, bit `i` for value `i`) into a group's
/// regrouped words (see [`Q5_0x8`]).
fn regroup_fifth_bits(row: usize, bits: u32, qh: &mut [u32; GROUP]) {
    for j in 0..4 {
        for k in 0..4 {
            let at = 4 * row + k;
            qh[j] |= ((bits >> (4 * j + k)) & 1) << at;
            qh[4 + j] |= ((bits >> (16 + 4 * j + k)) & 1) << at;
        }
    }
}

/// Row `row`'s 32 fifth bits back out of a group's regrouped words.
fn fifth_bits_of(row: usize, qh: &[u32; GROUP]) -> u32 {
    let mut bits = 0u32;
    for j in 0..4 {
        for k in 0..4 {
            let at = 4 * row + k;
            bits |= ((qh[j] >> at) & 1) << (4 * j + k);
            bits |= ((qh[4 + j] >> at) & 1) << (16 + 4 * j + k);
        }
    }
    bits
}

/// A group layout and the plain block it interleaves.
pub(crate) trait Interleave: Copy + std::fmt::Debug + PartialEq {
    /// The row-major block.
    type Block: Copy + std::fmt::Debug + PartialEq;
    /// Block `b` of eight rows, one per row, interleaved.
    fn pack(blocks: [&Self::Block; GROUP]) -> Self;
    /// Row `row`'s block back out of the group.
    fn unpack(&self, row: usize) -> Self::Block;
}

/// Byte `i` of each row's `bytes` as laid out in a group: lane `row` of chunk `i / LANE`.
fn interleaved_index(row: usize, i: usize) -> usize {
    (i / LANE) * GROUP * LANE + row * LANE + i % LANE
}

/// Row `row`'s bytes into their places in a group's interleaved `qs`.
fn interleave_row<T: Copy>(row: usize, bytes: &[T], qs: &mut [T]) {
    for (i, &q) in bytes.iter().enumerate() {
        qs[interleaved_index(row, i)] = q;
    }
}

/// Row `row`'s `N` bytes back out of a group's interleaved `qs`.
fn row_of<T: Copy, const N: usize>(qs: &[T], row: usize) -> [T; N] {
    std::array::from_fn(|i| qs[interleaved_index(row, i)])
}

impl Interleave for Q4_1x8 {
    type Block = BlockQ4_1;

    fn pack(blocks: [&BlockQ4_1; GROUP]) -> Self {
        let mut group = Self {
            d: [f16::ZERO; GROUP],
            m: [f16::ZERO; GROUP],
            qs: [0; GROUP * BLOCK / 2],
        };
        for (row, block) in blocks.iter().enumerate() {
            group.d[row] = block.d;
            group.m[row] = block.m;
            interleave_row(row, &block.qs, &mut group.qs);
        }
        group
    }

    fn unpack(&self, row: usize) -> BlockQ4_1 {
        BlockQ4_1 {
            d: self.d[row],
            m: self.m[row],
            qs: row_of(&self.qs, row),
        }
    }
}

impl Interleave for Q8_0x8 {
    type Block = BlockQ8_0;

    fn pack(blocks: [&BlockQ8_0; GROUP]) -> Self {
        let mut group = Self {
            d: [f16::ZERO; GROUP],
            qs: [0; GROUP * BLOCK],
        };
        for (row, block) in blocks.iter().enumerate() {
            group.d[row] = block.d;
            interleave_row(row, &block.qs, &mut group.qs);
        }
        group
    }

    fn unpack(&self, row: usize) -> BlockQ8_0 {
        BlockQ8_0 {
            d: self.d[row],
            qs: row_of(&self.qs, row),
        }
    }
}

impl Interleave for Q4_0x8 {
    type Block = BlockQ4_0;

    fn pack(blocks: [&BlockQ4_0; GROUP]) -> Self {
        let mut group = Self {
            d: [f16::ZERO; GROUP],
            qs: [0; GROUP * BLOCK / 2],
        };
        for (row, block) in blocks.iter().enumerate() {
            group.d[row] = block.d;
            interleave_row(row, &block.qs, &mut group.qs);
        }
        group
    }

    fn unpack(&self, row: usize) -> BlockQ4_0 {
        BlockQ4_0 {
            d: self.d[row],
            qs: row_of(&self.qs, row),
        }
    }
}

impl Interleave for Q5_0x8 {
    type Block = BlockQ5_0;

    fn pack(blocks: [&BlockQ5_0; GROUP]) -> Self {
        let mut group = Self {
            d: [f16::ZERO; GROUP],
            qh: [0; GROUP],
            qs: [0; GROUP * BLOCK / 2],
        };
        for (row, block) in blocks.iter().enumerate() {
            group.d[row] = block.d;
            interleave_row(row, &block.qs, &mut group.qs);
            regroup_fifth_bits(row, u32::from_le_bytes(block.qh), &mut group.qh);
        }
        group
    }

    fn unpack(&self, row: usize) -> BlockQ5_0 {
        BlockQ5_0 {
            d: self.d[row],
            qh: fifth_bits_of(row, &self.qh).to_le_bytes(),
            qs: row_of(&self.qs, row),
        }
    }
}

impl Interleave for Q5_1x8 {
    type Block = BlockQ5_1;

    fn pack(blocks: [&BlockQ5_1; GROUP]) -> Self {
        let mut group = Self {
            d: [f16::ZERO; GROUP],
            m: [f16::ZERO; GROUP],
            qh: [0; GROUP],
            qs: [0; GROUP * BLOCK / 2],
        };
        for (row, block) in blocks.iter().enumerate() {
            group.d[row] = block.d;
            group.m[row] = block.m;
            interleave_row(row, &block.qs, &mut group.qs);
            regroup_fifth_bits(row, u32::from_le_bytes(block.qh), &mut group.qh);
        }
        group
    }

    fn unpack(&self, row: usize) -> BlockQ5_1 {
        BlockQ5_1 {
            d: self.d[row],
            m: self.m[row],
            qh: fifth_bits_of(row, &self.qh).to_le_bytes(),
            qs: row_of(&self.qs, row),
        }
    }
}

/// The blocks of a `[rows, per_row blocks]` matrix: full groups of eight rows interleaved
/// (`[rows / 8, per_row]` groups), then the last `rows % 8` rows plain, row after row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Packed<G: Interleave> {
    rows: usize,
    per_row: usize,
    groups: Vec<G>,
    tail: Vec<G::Block>,
}

impl<G: Interleave> Packed<G> {
    /// Packs row-major blocks (`rows * per_row` of them).
    pub fn from_plain(blocks: &[G::Block], rows: usize, per_row: usize) -> Self {
        assert_eq!(blocks.len(), rows * per_row, "blocks of the matrix");
        let full = rows / GROUP * GROUP;
        let mut groups = Vec::with_capacity(full / GROUP * per_row);
        for first in (0..full).step_by(GROUP) {
            for b in 0..per_row {
                groups.push(G::pack(std::array::from_fn(|r| {
                    &blocks[(first + r) * per_row + b]
                })));
            }
        }
        Self {
            rows,
            per_row,
            groups,
            tail: blocks[full * per_row..].to_vec(),
        }
    }

    /// The blocks row-major again.
    pub fn to_plain(&self) -> Vec<G::Block> {
        (0..self.rows).flat_map(|row| self.row(row)).collect()
    }

    /// Rows stored in full groups.
    fn full_rows(&self) -> usize {
        self.rows / GROUP * GROUP
    }

    /// Row `row`'s blocks.
    pub fn row(&self, row: usize) -> Vec<G::Block> {
        let mut blocks = Vec::with_capacity(self.per_row);
        self.for_row_blocks(row, |block| blocks.push(block));
        blocks
    }

    /// Row `row`'s blocks in order, one at a time (no allocation).
    pub fn for_row_blocks(&self, row: usize, mut visit: impl FnMut(G::Block)) {
        let full = self.full_rows();
        if row >= full {
            let at = (row - full) * self.per_row;
            self.tail[at..at + self.per_row]
                .iter()
                .for_each(|&block| visit(block));
        } else {
            let group = &self.groups[row / GROUP * self.per_row..][..self.per_row];
            group.iter().for_each(|g| visit(g.unpack(row % GROUP)));
        }
    }

    /// Rows `rows` as the units a product meets, in order, each with its first row's offset
    /// in the range: [`Unit::Group`] for each full group of eight inside the range, and
    /// [`Unit::Rows`] for plain rows (the tail rows end to end, or one row of a group the
    /// range cuts through).
    pub fn for_units(
        &self,
        rows: std::ops::Range<usize>,
        mut visit: impl FnMut(usize, Unit<'_, G>),
    ) {
        assert!(rows.end <= self.rows, "rows {rows:?} of {}", self.rows);
        let full = self.full_rows();
        let mut row = rows.start;
        while row < rows.end {
            let o = row - rows.start;
            if row >= full {
                let at = (row - full) * self.per_row;
                let end = (rows.end - full) * self.per_row;
                visit(
                    o,
                    Unit::Rows {
                        blocks: Cow::Borrowed(&self.tail[at..end]),
                        count: rows.end - row,
                    },
                );
                return;
            }
            if row.is_multiple_of(GROUP) && row + GROUP <= rows.end {
                let blocks = &self.groups[row / GROUP * self.per_row..][..self.per_row];
                visit(o, Unit::Group(blocks));
                row += GROUP;
            } else {
                visit(
                    o,
                    Unit::Rows {
                        blocks: Cow::Owned(self.row(row)),
                        count: 1,
                    },
                );
                row += 1;
            }
        }
    }

    /// Dots of rows `rows` into `out` (`rows.len()` long): each full group of eight inside the
    /// range through `group` (its `per_row` group blocks, eight outputs), the plain rows
    /// through `plain` (their blocks end to end, one output each); see [`Packed::for_units`].
    pub fn for_rows(
        &self,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        mut group: impl FnMut(&[G], &mut [f32]),
        mut plain: impl FnMut(&[G::Block], &mut [f32]),
    ) {
        assert_eq!(out.len(), rows.len(), "one output per row");
        self.for_units(rows, |o, unit| match unit {
            Unit::Group(blocks) => group(blocks, &mut out[o..o + GROUP]),
            Unit::Rows { blocks, count } => plain(&blocks, &mut out[o..o + count]),
        });
    }
}

/// A piece of a row range of a [`Packed`] matrix.
pub(crate) enum Unit<'a, G: Interleave> {
    /// The `per_row` blocks of one full group of eight interleaved rows.
    Group(&'a [G]),
    /// `count` plain rows, their blocks end to end.
    Rows {
        /// The rows' blocks.
        blocks: Cow<'a, [G::Block]>,
        /// How many rows.
        count: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_1_rows(rows: usize, per_row: usize) -> Vec<BlockQ4_1> {
        (0..rows * per_row)
            .map(|i| BlockQ4_1 {
                d: f16::from_f32(i as f32),
                m: f16::from_f32(-(i as f32)),
                qs: std::array::from_fn(|j| (i * 7 + j * 13) as u8),
            })
            .collect()
    }

    #[test]
    fn groups_are_the_size_of_their_blocks() {
        assert_eq!(std::mem::size_of::<Q4_1x8>(), GROUP * 20);
        assert_eq!(std::mem::size_of::<Q8_0x8>(), GROUP * 34);
        assert_eq!(std::mem::size_of::<Q5_0x8>(), GROUP * 22);
        assert_eq!(std::mem::size_of::<Q4_0x8>(), GROUP * 18);
        assert_eq!(std::mem::size_of::<Q5_1x8>(), GROUP * 24);
    }

    #[test]
    fn q5_0_fifth_bits_round_trip_through_a_group() {
        let blocks: Vec<BlockQ5_0> = (0..16)
            .map(|i: u32| BlockQ5_0 {
                d: f16::from_f32(i as f32),
                qh: (0x9E37_79B9u32.wrapping_mul(i + 1)).to_le_bytes(),
                qs: std::array::from_fn(|j| (i as usize * 5 + j * 11) as u8),
            })
            .collect();
        let packed = Packed::<Q5_0x8>::from_plain(&blocks, 8, 2);
        assert_eq!(packed.to_plain(), blocks);
        // Word 1, bit 4r + k: the fifth bit of row r's value 4 + k.
        let group = &packed.groups[0];
        for row in 0..8 {
            let bits = u32::from_le_bytes(blocks[row * 2].qh);
            for k in 0..4 {
                assert_eq!((group.qh[1] >> (4 * row + k)) & 1, (bits >> (4 + k)) & 1);
            }
        }
    }

    #[test]
    fn q5_1_blocks_round_trip_through_groups_and_a_tail() {
        let blocks: Vec<BlockQ5_1> = (0..27)
            .map(|i: u32| BlockQ5_1 {
                d: f16::from_f32(i as f32),
                m: f16::from_f32(-(i as f32) / 2.0),
                qh: (0x85EB_CA6Bu32.wrapping_mul(i + 3)).to_le_bytes(),
                qs: std::array::from_fn(|j| (i as usize * 3 + j * 17) as u8),
            })
            .collect();
        let packed = Packed::<Q5_1x8>::from_plain(&blocks, 9, 3);
        assert_eq!(packed.to_plain(), blocks);
    }

    #[test]
    fn packing_round_trips_with_a_tail() {
        for rows in [1, 7, 8, 9, 16, 21] {
            let blocks = q4_1_rows(rows, 3);
            let packed = Packed::<Q4_1x8>::from_plain(&blocks, rows, 3);
            assert_eq!(packed.to_plain(), blocks, "{rows} rows");
        }
    }

    #[test]
    fn a_lane_holds_four_bytes_of_one_row() {
        let blocks = q4_1_rows(8, 1);
        let packed = Packed::<Q4_1x8>::from_plain(&blocks, 8, 1);
        let group = &packed.groups[0];
        // Bytes 4..8 of the group are row 1's bytes 0..4; bytes 32..36 are row 0's 4..8.
        assert_eq!(group.qs[4..8], blocks[1].qs[0..4]);
        assert_eq!(group.qs[32..36], blocks[0].qs[4..8]);
    }

    #[test]
    fn for_rows_visits_every_row_once_in_order() {
        let blocks = q4_1_rows(21, 2);
        let packed = Packed::<Q4_1x8>::from_plain(&blocks, 21, 2);
        for range in [0..21, 3..21, 0..8, 5..19, 16..21, 20..21] {
            let mut out = vec![0.0; range.len()];
            packed.for_rows(
                range.clone(),
                &mut out,
                |groups, o| {
                    for (r, o) in o.iter_mut().enumerate() {
                        *o = groups[0].unpack(r).d.to_f32();
                    }
                },
                |plain, o| {
                    for (row, o) in plain.chunks_exact(2).zip(o.iter_mut()) {
                        *o = row[0].d.to_f32();
                    }
                },
            );
            let want: Vec<f32> = range.map(|r| (r * 2) as f32).collect();
            assert_eq!(out, want);
        }
    }
}
