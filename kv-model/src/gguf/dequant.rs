//! ggml storage types and their dequantization to f32, block by block as ggml defines them.

use half::{bf16, f16};

/// The ggml storage types this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Super-blocks of 256: 8 sub-blocks of 32 nibbles, each with a 6-bit scale and minimum.
    Q4K,
    /// Super-blocks of 256: 16 sub-blocks of 16 six-bit values, each with an 8-bit scale.
    Q6K,
}

impl GgmlType {
    /// The type with ggml id `id`, if this crate reads it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// `(elements per block, bytes per block)`.
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
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
    let blocks = bytes
        .chunks_exact(block_bytes as usize)
        .take(elements / per_block as usize);
    match kind {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(half)),
        GgmlType::BF16 => out.extend(blocks.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for block in blocks {
                let d = half(&block[0..2]);
                out.extend(block[2..34].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_0 => {
            for block in blocks {
                let d = half(&block[0..2]);
                let qs = &block[2..18];
                out.extend(qs.iter().map(|&q| d * (f32::from(q & 0x0F) - 8.0)));
                out.extend(qs.iter().map(|&q| d * (f32::from(q >> 4) - 8.0)));
            }
        }
        GgmlType::Q4_1 => {
            for block in blocks {
                let (d, m) = (half(&block[0..2]), half(&block[2..4]));
                let qs = &block[4..20];
                out.extend(qs.iter().map(|&q| d * f32::from(q & 0x0F) + m));
                out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
        }
        GgmlType::Q4K => {
            for block in blocks {
                let (d, dmin) = (half(&block[0..2]), half(&block[2..4]));
                let scales = &block[4..16];
                let qs = &block[16..144];
                for (chunk, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                    let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                    let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
                    let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
                    out.extend(q.iter().map(|&b| d1 * f32::from(b & 0x0F) - min1));
                    out.extend(q.iter().map(|&b| d2 * f32::from(b >> 4) - min2));
                }
            }
        }
        GgmlType::Q6K => {
            for block in blocks {
                let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
                let d = half(&block[208..210]);
                for half_block in 0..2 {
                    let ql = &ql[64 * half_block..64 * half_block + 64];
                    let qh = &qh[32 * half_block..32 * half_block + 32];
                    let sc = &scales[8 * half_block..8 * half_block + 8];
                    let mut y = [0.0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                        let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                        let scale = |i: usize| d * f32::from(sc[i] as i8);
                        y[l] = scale(is) * q1 as f32;
                        y[l + 32] = scale(is + 2) * q2 as f32;
                        y[l + 64] = scale(is + 4) * q3 as f32;
                        y[l + 96] = scale(is + 6) * q4 as f32;
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
    }
    assert_eq!(
        out.len(),
        elements,
        "dequantize: {bytes} bytes too few",
        bytes = bytes.len()
    );
    out
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K super-block, packed in 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
