//! ggml storage types and their dequantization to f32.
//!
//! The block layouts kv-kernels multiplies by (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
//! Q6_K) are defined once, in [`kv_kernels::blocks`], and dequantized by them. The types
//! without a kernel (Q2_K, Q3_K, IQ4_NL, IQ4_XS) are read here, block by block as ggml
//! defines them (`dequantize_row_*` in ggml-quants.c), to be requantized at load.

use half::{bf16, f16};
use kv_kernels::blocks::{
    dequantize_bytes, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use kv_kernels::Format;

/// The ggml storage types this crate reads: every type llama.cpp's quantize writes in its
/// standard presets, from `F32` to `Q2_K`, and the 4-bit non-linear `IQ4_NL` / `IQ4_XS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: f16 scale, 32 signed bytes. `x = d * q`.
    Q8_0,
    /// Blocks of 32: f16 scale, 32 nibbles. `x = d * (q - 8)`.
    Q4_0,
    /// Blocks of 32: f16 scale and minimum, 32 nibbles. `x = d * q + m`.
    Q4_1,
    /// Blocks of 32: f16 scale, 32 five-bit levels. `x = d * (q - 16)`.
    Q5_0,
    /// Blocks of 32: f16 scale and minimum, 32 five-bit levels. `x = d * q + m`.
    Q5_1,
    /// Super-blocks of 256: 16 sub-blocks of 16 two-bit values with 4-bit scales and minimums.
    Q2K,
    /// Super-blocks of 256: 16 sub-blocks of 16 three-bit values with 6-bit scales.
    Q3K,
    /// Super-blocks of 256: 8 sub-blocks of 32 nibbles, each with a 6-bit scale and minimum.
    Q4K,
    /// Super-blocks of 256: Q4_K with a fifth bit per value.
    Q5K,
    /// Super-blocks of 256: 16 sub-blocks of 16 six-bit values, each with an 8-bit scale.
    Q6K,
    /// Blocks of 32: f16 scale, 32 nibbles indexing 16 non-uniform levels.
    IQ4NL,
    /// Super-blocks of 256: IQ4_NL's levels with a 6-bit scale per 32 values.
    IQ4XS,
}

/// IQ4_NL's and IQ4_XS's 16 levels (ggml's `kvalues_iq4nl`).
const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl GgmlType {
    /// Every type, in ggml's id order.
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::IQ4NL,
        GgmlType::IQ4XS,
        GgmlType::BF16,
    ];

    /// The type with ggml id `id`, if this crate reads it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's id (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::IQ4NL => 20,
            GgmlType::IQ4XS => 23,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name (`Q4_K`, `IQ4_XS`...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::IQ4NL => "IQ4_NL",
            GgmlType::IQ4XS => "IQ4_XS",
        }
    }

    /// The kv-kernels format that keeps this type's bytes as they are, if one does.
    pub fn kernel_format(self) -> Option<Format> {
        Some(match self {
            GgmlType::F32 => Format::F32,
            GgmlType::F16 => Format::F16,
            GgmlType::Q8_0 => Format::Q8_0,
            GgmlType::Q4_0 => Format::Q4_0,
            GgmlType::Q4_1 => Format::Q4_1,
            GgmlType::Q5_0 => Format::Q5_0,
            GgmlType::Q5_1 => Format::Q5_1,
            GgmlType::Q4K => Format::Q4K,
            GgmlType::Q5K => Format::Q5K,
            GgmlType::Q6K => Format::Q6K,
            GgmlType::BF16 | GgmlType::Q2K | GgmlType::Q3K | GgmlType::IQ4NL | GgmlType::IQ4XS => {
                return None
            }
        })
    }

    /// The kept format a type without a kernel is requantized to at load: the one with the
    /// fewest bits that loses nothing further worth measuring. BF16 widens to f32 exactly;
    /// Q2_K and Q3_K values fit Q4_K's grid closely (their scales are coarser); IQ4_NL's
    /// and IQ4_XS's non-uniform levels need Q5's finer steps (Q5_0 on 32-value blocks, Q5_K
    /// on super-blocks).
    pub fn requantize_to(self) -> Format {
        match self {
            GgmlType::BF16 => Format::F32,
            GgmlType::Q2K | GgmlType::Q3K => Format::Q4K,
            GgmlType::IQ4NL => Format::Q5_0,
            GgmlType::IQ4XS => Format::Q5K,
            kept => kept.kernel_format().expect("every other type is kept"),
        }
    }

    /// `(elements per block, bytes per block)`.
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::BF16 => (1, 2),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::IQ4NL => (32, 18),
            GgmlType::IQ4XS => (256, 136),
            kept => {
                let (values, bytes) = kept.kernel_format().expect("kept").block();
                (values as u64, bytes as u64)
            }
        }
    }

    /// Where a block keeps its half-precision scales and minimums (byte offsets within the
    /// block), or for the float types, `None`: every value is checked instead. A file whose
    /// scale is NaN or infinite is corrupt (every value of the block would be), which
    /// [`first_non_finite`] finds at load.
    fn scale_offsets(self) -> Option<&'static [usize]> {
        Some(match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
            // `d` first, then the block's values.
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::IQ4NL | GgmlType::IQ4XS => &[0],
            // `d` and the minimum's scale first.
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            // The super-block's scales last, after its values.
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q3K => &[108],
            GgmlType::Q6K => &[208],
        })
    }

    /// Bytes that `elements` take, or `None` if they do not fill whole blocks (or overflow).
    pub fn byte_len(self, elements: u64) -> Option<u64> {
        let (per_block, bytes) = self.block();
        elements
            .is_multiple_of(per_block)
            .then(|| (elements / per_block).checked_mul(bytes))
            .flatten()
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The first block of `bytes` (whole blocks of `kind`) whose scale or minimum is NaN or
/// infinite, as `(byte offset within bytes, the value)`; for the float types, the first such
/// value. `None` when every block is finite, as in any file a quantizer wrote.
pub fn first_non_finite(kind: GgmlType, bytes: &[u8]) -> Option<(usize, f32)> {
    let (_, block_bytes) = kind.block();
    let mut blocks = bytes.chunks_exact(block_bytes as usize).enumerate();
    let found = |at: usize, value: f32| (!value.is_finite()).then_some((at, value));
    match kind.scale_offsets() {
        Some(offsets) => blocks
            .flat_map(|(i, block)| {
                offsets
                    .iter()
                    .map(move |&o| (i * block_bytes as usize + o, half(&block[o..o + 2])))
            })
            .find_map(|(at, v)| found(at, v)),
        None => blocks.find_map(|(i, b)| {
            let value = match kind {
                GgmlType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                GgmlType::F16 => half(b),
                _ => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            };
            found(i * block_bytes as usize, value)
        }),
    }
}

fn half(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

/// Dequantizes `elements` values of `kind` from `bytes`, which must hold exactly
/// [`GgmlType::byte_len`] bytes (the GGUF reader checks this).
///
/// # Panics
/// If `bytes` is shorter than `elements` need.
pub fn dequantize(kind: GgmlType, bytes: &[u8], elements: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(elements);
    let (per_block, block_bytes) = kind.block();
    let used = &bytes[..elements / per_block as usize * block_bytes as usize];
    let blocks = used.chunks_exact(block_bytes as usize);
    match kind {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(half)),
        GgmlType::BF16 => out.extend(blocks.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        GgmlType::Q8_0 => dequantize_bytes::<BlockQ8_0>(used, &mut out),
        GgmlType::Q4_0 => dequantize_bytes::<BlockQ4_0>(used, &mut out),
        GgmlType::Q4_1 => dequantize_bytes::<BlockQ4_1>(used, &mut out),
        GgmlType::Q5_0 => dequantize_bytes::<BlockQ5_0>(used, &mut out),
        GgmlType::Q5_1 => dequantize_bytes::<BlockQ5_1>(used, &mut out),
        GgmlType::Q4K => dequantize_bytes::<BlockQ4K>(used, &mut out),
        GgmlType::Q5K => dequantize_bytes::<BlockQ5K>(used, &mut out),
        GgmlType::Q6K => dequantize_bytes::<BlockQ6K>(used, &mut out),
        GgmlType::Q2K => blocks.for_each(|b| q2_k(b, &mut out)),
        GgmlType::Q3K => blocks.for_each(|b| q3_k(b, &mut out)),
        GgmlType::IQ4NL => {
            for block in blocks {
                let d = half(&block[0..2]);
                let qs = &block[2..18];
                out.extend(
                    qs.iter()
                        .map(|&q| d * f32::from(IQ4_LEVELS[usize::from(q & 0x0F)])),
                );
                out.extend(
                    qs.iter()
                        .map(|&q| d * f32::from(IQ4_LEVELS[usize::from(q >> 4)])),
                );
            }
        }
        GgmlType::IQ4XS => blocks.for_each(|b| iq4_xs(b, &mut out)),
    }
    assert_eq!(
        out.len(),
        elements,
        "dequantize: {bytes} bytes too few",
        bytes = bytes.len()
    );
    out
}

/// `block_q2_K`: `scales[16]` (4-bit scale, 4-bit minimum per 16 values), `qs[64]` (four
/// 2-bit values a byte), `d`, `dmin`. In each half of 128 values, byte `l` of the half's 32
/// holds values `l`, `l + 32`, `l + 64` and `l + 96` from its low bits up.
fn q2_k(block: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&block[0..16], &block[16..80]);
    let (d, dmin) = (half(&block[80..82]), half(&block[82..84]));
    let mut is = 0;
    for half_qs in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for sixteen in half_qs.chunks_exact(16) {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * f32::from(sc & 0x0F), dmin * f32::from(sc >> 4));
                out.extend(
                    sixteen
                        .iter()
                        .map(|&q| dl * f32::from((q >> shift) & 3) - ml),
                );
            }
        }
    }
}

/// `block_q3_K`: `hmask[32]` (the third bit, inverted: a clear bit subtracts 4), `qs[64]`
/// (the low two bits, laid out as Q2_K's), `scales[12]` (sixteen 6-bit scales around 32),
/// `d`.
fn q3_k(block: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, packed) = (&block[0..32], &block[32..96], &block[96..108]);
    let d = half(&block[108..110]);
    let scale = |i: usize| -> i32 {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        i32::from(low | (high << 4)) - 32
    };
    let mut is = 0;
    let mut bit = 0;
    for half_qs in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for (part, sixteen) in half_qs.chunks_exact(16).enumerate() {
                let dl = d * scale(is) as f32;
                is += 1;
                for (l, &q) in sixteen.iter().enumerate() {
                    let high = hmask[16 * part + l] >> bit & 1;
                    let level = i32::from((q >> shift) & 3) - if high == 0 { 4 } else { 0 };
                    out.push(dl * level as f32);
                }
            }
            bit += 1;
        }
    }
}

/// `block_iq4_xs`: `d`, `scales_h` (the top two bits of eight 6-bit scales), `scales_l[4]`
/// (their low nibbles), `qs[128]` (per 32 values, 16 bytes: low nibbles then high, indexing
/// [`IQ4_LEVELS`]). Scales are around 32.
fn iq4_xs(block: &[u8], out: &mut Vec<f32>) {
    let d = half(&block[0..2]);
    let scales_h = u16::from_le_bytes([block[2], block[3]]);
    let (scales_l, qs) = (&block[4..8], &block[8..136]);
    for (ib, qs) in qs.chunks_exact(16).enumerate() {
        let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F;
        let high = ((scales_h >> (2 * ib)) & 3) as u8;
        let dl = d * (i32::from(low | (high << 4)) - 32) as f32;
        out.extend(
            qs.iter()
                .map(|&q| dl * f32::from(IQ4_LEVELS[usize::from(q & 0x0F)])),
        );
        out.extend(
            qs.iter()
                .map(|&q| dl * f32::from(IQ4_LEVELS[usize::from(q >> 4)])),
        );
    }
}
