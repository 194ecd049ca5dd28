//! ggml's k-quants: super-blocks of [`QK_K`] = 256 values cut into sub-blocks, each with its
//! own small integer scale (and minimum) times one f16 scale for the whole super-block. The
//! sub-block scales cost a few bits per 32 or 16 values, so these formats fit the values
//! better than a legacy block of the same size; they are what llama.cpp's `Q4_K_M`, `Q5_K_M`
//! and `Q6_K` presets write.
//!
//! - Q4_K: eight sub-blocks of 32 four-bit levels, `x = d·sc_j·q − dmin·m_j`, with `sc_j` and
//!   `m_j` six bits each, packed into 12 bytes; 4.5 bits a value.
//! - Q5_K: Q4_K with a fifth bit per value; 5.5 bits a value.
//! - Q6_K: sixteen sub-blocks of 16 six-bit levels around zero, `x = d·sc_i·(q − 32)`, with
//!   `sc_i` a signed byte; 6.56 bits a value.
//!
//! Dequantization follows ggml's definitions (`dequantize_row_q*_K`). The quantizers are
//! simpler than ggml's, which search each sub-block for the scale and minimum of least
//! squared error: here each sub-block's range sets its scale and the super-block's largest
//! scale sets `d`. Files from llama.cpp keep llama.cpp's bytes; these quantizers serve
//! converting another format at load (`--weights q4_k`) and the tests.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::{BlockQ8, WeightBlock, BLOCK};
use crate::isa::Isa;

/// Values per super-block.
pub const QK_K: usize = 256;

/// ggml's `block_q4_K`: 256 weights in eight sub-blocks of 32 four-bit levels, 144 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4K {
    /// The scale of the sub-block scales.
    pub d: f16,
    /// The scale of the sub-block minimums.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums (see [`scale_min`]).
    pub scales: [u8; 12],
    /// 256 levels in `0..16`: byte `32c + l` holds value `64c + l` in its low nibble and value
    /// `64c + 32 + l` in its high one.
    pub qs: [u8; QK_K / 2],
}

/// ggml's `block_q5_K`: Q4_K with a fifth bit per value, 176 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ5K {
    /// The scale of the sub-block scales.
    pub d: f16,
    /// The scale of the sub-block minimums.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums (see [`scale_min`]).
    pub scales: [u8; 12],
    /// Fifth bits: bit `2c` of byte `l` for value `64c + l`, bit `2c + 1` for `64c + 32 + l`.
    pub qh: [u8; QK_K / 8],
    /// The low four bits, laid out as [`BlockQ4K::qs`].
    pub qs: [u8; QK_K / 2],
}

/// ggml's `block_q6_K`: 256 weights in sixteen sub-blocks of 16 six-bit levels, 210 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ6K {
    /// Low four bits: in half `n` (values `128n..128n + 128`), byte `64n + l` holds value
    /// `128n + l` (low nibble) and `128n + 64 + l` (high); byte `64n + 32 + l` holds values
    /// `128n + 32 + l` and `128n + 96 + l`.
    pub ql: [u8; QK_K / 2],
    /// High two bits: byte `32n + l` holds, from its low bits up, those of values
    /// `128n + l`, `+ 32`, `+ 64` and `+ 96`.
    pub qh: [u8; QK_K / 4],
    /// Each 16-value sub-block's scale.
    pub scales: [i8; QK_K / 16],
    /// The scale of the sub-block scales.
    pub d: f16,
}

/// Sub-block `j`'s 6-bit scale and minimum from a Q4_K/Q5_K super-block's 12 bytes: the
/// first four pairs in the low six bits of bytes `j` and `j + 4`; the last four in the
/// nibbles of bytes `8..12`, with their top two bits in the spare high bits of bytes `0..8`.
pub fn scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The inverse of [`scale_min`]: eight (scale, minimum) pairs, each below 64, packed.
fn pack_scale_min(pairs: &[(u8, u8); 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        let (sc, m) = pairs[j];
        let (sc_hi, m_hi) = pairs[j + 4];
        q[j] = sc | ((sc_hi >> 4) << 6);
        q[j + 4] = m | ((m_hi >> 4) << 6);
        q[j + 8] = (sc_hi & 0x0F) | ((m_hi & 0x0F) << 4);
    }
    q
}

/// The eight (scale, minimum) pairs of a super-block.
pub(crate) fn scale_mins(q: &[u8; 12]) -> [(u8, u8); 8] {
    std::array::from_fn(|j| scale_min(j, q))
}

/// Quantizes a super-block to `x ≈ d·sc_j·q − dmin·m_j` with `q` in `0..=levels`: the levels
/// and the super-block's `(d, dmin, pairs)`. Each sub-block's range (its minimum clamped to at
/// most zero, as the format's minimum is subtracted) sets its step; the largest step and
/// minimum set `d` and `dmin` over 63.
fn quantize_scale_min(values: &[f32], levels: u8) -> ([u8; QK_K], f16, f16, [(u8, u8); 8]) {
    let mut steps = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for (j, sub) in values.chunks_exact(BLOCK).enumerate() {
        let min = sub.iter().copied().fold(0.0f32, f32::min);
        let max = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        steps[j] = (max - min) / f32::from(levels);
        mins[j] = -min;
    }
    let d = f16::from_f32(steps.iter().copied().fold(0.0, f32::max) / 63.0);
    let dmin = f16::from_f32(mins.iter().copied().fold(0.0, f32::max) / 63.0);
    let to6 = |v: f32, unit: f16| -> u8 {
        let unit = unit.to_f32();
        if unit > 0.0 {
            (v / unit).round().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let pairs: [(u8, u8); 8] = std::array::from_fn(|j| (to6(steps[j], d), to6(mins[j], dmin)));
    let mut q = [0u8; QK_K];
    for (j, sub) in values.chunks_exact(BLOCK).enumerate() {
        let step = d.to_f32() * f32::from(pairs[j].0);
        let offset = dmin.to_f32() * f32::from(pairs[j].1);
        let inv = if step > 0.0 { 1.0 / step } else { 0.0 };
        for (l, &x) in sub.iter().enumerate() {
            q[BLOCK * j + l] = ((x + offset) * inv).round().clamp(0.0, f32::from(levels)) as u8;
        }
    }
    (q, d, dmin, pairs)
}

impl BlockQ4K {
    /// Level of value `v` (`v < 256`).
    fn level(&self, v: usize) -> u8 {
        let (c, l) = (v / 64, v % 64);
        let byte = self.qs[32 * c + l % 32];
        if l < 32 {
            byte & 0x0F
        } else {
            byte >> 4
        }
    }
}

impl BlockQ5K {
    /// Level of value `v` (`v < 256`).
    fn level(&self, v: usize) -> u8 {
        let (c, l) = (v / 64, v % 64);
        let byte = self.qs[32 * c + l % 32];
        let low = if l < 32 { byte & 0x0F } else { byte >> 4 };
        let bit = 2 * c + usize::from(l >= 32);
        low | (((self.qh[l % 32] >> bit) & 1) << 4)
    }
}

impl BlockQ6K {
    /// Signed level of value `v` (`q − 32`, in `-32..32`).
    fn level(&self, v: usize) -> i32 {
        let (n, r) = (v / 128, v % 128);
        let (quarter, l) = (r / 32, r % 32);
        let ql = self.ql[64 * n + 32 * (quarter % 2) + l];
        let low = if quarter < 2 { ql & 0x0F } else { ql >> 4 };
        let high = (self.qh[32 * n + l] >> (2 * quarter)) & 3;
        i32::from(low | (high << 4)) - 32
    }
}

/// `Σ_j (d·sc_j·dx_j)·Σ q x − (dmin·m_j)·s_j` over the eight 32-value sub-blocks of a
/// Q4_K or Q5_K super-block whose value `v` has level `level(v)`.
fn dot_scale_min(
    d: f16,
    dmin: f16,
    scales: &[u8; 12],
    x: &[BlockQ8],
    level: impl Fn(usize) -> u8,
) -> f32 {
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    let mut sum = 0.0f32;
    let mut mins = 0.0f32;
    for (j, ((sc, m), xb)) in scale_mins(scales).into_iter().zip(x).enumerate() {
        let dot: i32 = (0..BLOCK)
            .map(|l| i32::from(level(BLOCK * j + l)) * i32::from(xb.qs[l]))
            .sum();
        sum += d * f32::from(sc) * xb.d * dot as f32;
        mins += dmin * f32::from(m) * xb.s;
    }
    sum - mins
}

impl WeightBlock for BlockQ4K {
    const VALUES: usize = QK_K;

    fn quantize(values: &[f32]) -> Self {
        let (q, d, dmin, pairs) = quantize_scale_min(values, 15);
        Self {
            d,
            dmin,
            scales: pack_scale_min(&pairs),
            qs: std::array::from_fn(|i| {
                let (c, l) = (i / 32, i % 32);
                q[64 * c + l] | (q[64 * c + 32 + l] << 4)
            }),
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for (j, (sc, m)) in scale_mins(&self.scales).into_iter().enumerate() {
            let (step, min) = (d * f32::from(sc), dmin * f32::from(m));
            for l in 0..BLOCK {
                out[BLOCK * j + l] = step * f32::from(self.level(BLOCK * j + l)) - min;
            }
        }
    }

    fn dot(&self, x: &[BlockQ8]) -> f32 {
        dot_scale_min(self.d, self.dmin, &self.scales, x, |v| self.level(v))
    }

    fn rows(isa: Isa, w: &[Self], x: &[BlockQ8], out: &mut [f32]) {
        crate::block_dot::q4_k_rows(isa, w, x, out);
    }

    fn rows_batch(isa: Isa, w: &[Self], x: &[BlockQ8], n: usize, out: &mut [f32], stride: usize) {
        crate::block_dot::q4_k_rows_batch(isa, w, x, n, out, stride);
    }

    fn widen(isa: Isa, blocks: &[Self], out: &mut [f32]) {
        crate::block_dot::q4_k_widen(isa, blocks, out);
    }
}

impl WeightBlock for BlockQ5K {
    const VALUES: usize = QK_K;

    fn quantize(values: &[f32]) -> Self {
        let (q, d, dmin, pairs) = quantize_scale_min(values, 31);
        let mut qh = [0u8; QK_K / 8];
        for c in 0..4 {
            for (l, h) in qh.iter_mut().enumerate() {
                *h |= (q[64 * c + l] >> 4) << (2 * c);
                *h |= (q[64 * c + 32 + l] >> 4) << (2 * c + 1);
            }
        }
        Self {
            d,
            dmin,
            scales: pack_scale_min(&pairs),
            qh,
            qs: std::array::from_fn(|i| {
                let (c, l) = (i / 32, i % 32);
                (q[64 * c + l] & 0x0F) | ((q[64 * c + 32 + l] & 0x0F) << 4)
            }),
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for (j, (sc, m)) in scale_mins(&self.scales).into_iter().enumerate() {
            let (step, min) = (d * f32::from(sc), dmin * f32::from(m));
            for l in 0..BLOCK {
                out[BLOCK * j + l] = step * f32::from(self.level(BLOCK * j + l)) - min;
            }
        }
    }

    fn dot(&self, x: &[BlockQ8]) -> f32 {
        dot_scale_min(self.d, self.dmin, &self.scales, x, |v| self.level(v))
    }

    fn rows(isa: Isa, w: &[Self], x: &[BlockQ8], out: &mut [f32]) {
        crate::block_dot::q5_k_rows(isa, w, x, out);
    }

    fn rows_batch(isa: Isa, w: &[Self], x: &[BlockQ8], n: usize, out: &mut [f32], stride: usize) {
        crate::block_dot::q5_k_rows_batch(isa, w, x, n, out, stride);
    }

    fn widen(isa: Isa, blocks: &[Self], out: &mut [f32]) {
        crate::block_dot::q5_k_widen(isa, blocks, out);
    }
}

impl WeightBlock for BlockQ6K {
    const VALUES: usize = QK_K;

    /// Each 16-value sub-block's value of largest magnitude maps to level −32; the largest
    /// sub-block scale maps to ±127.
    fn quantize(values: &[f32]) -> Self {
        let sub_scales: [f32; 16] = std::array::from_fn(|i| {
            let sub = &values[16 * i..16 * i + 16];
            let max = sub
                .iter()
                .copied()
                .fold(0.0f32, |m, x| if x.abs() > m.abs() { x } else { m });
            max / -32.0
        });
        let amax = sub_scales.iter().fold(0.0f32, |m, s| m.max(s.abs()));
        let d = f16::from_f32(amax / 127.0);
        let scales: [i8; 16] = std::array::from_fn(|i| {
            if d.to_f32() > 0.0 {
                (sub_scales[i] / d.to_f32()).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            }
        });
        let q: [u8; QK_K] = std::array::from_fn(|v| {
            let step = d.to_f32() * f32::from(scales[v / 16]);
            let level = if step != 0.0 {
                (values[v] / step).round()
            } else {
                0.0
            };
            (level.clamp(-32.0, 31.0) + 32.0) as u8
        });
        let mut block = Self {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales,
            d,
        };
        for n in 0..2 {
            for l in 0..32 {
                let v = |quarter: usize| q[128 * n + 32 * quarter + l];
                block.ql[64 * n + l] = (v(0) & 0x0F) | ((v(2) & 0x0F) << 4);
                block.ql[64 * n + 32 + l] = (v(1) & 0x0F) | ((v(3) & 0x0F) << 4);
                block.qh[32 * n + l] =
                    (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
            }
        }
        block
    }

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (v, o) in out[..QK_K].iter_mut().enumerate() {
            *o = d * f32::from(self.scales[v / 16]) * self.level(v) as f32;
        }
    }

    fn dot(&self, x: &[BlockQ8]) -> f32 {
        let d = self.d.to_f32();
        let mut sum = 0.0f32;
        for (k, xb) in x.iter().enumerate().take(QK_K / BLOCK) {
            let dd = d * xb.d;
            for half in 0..2 {
                let first = BLOCK * k + 16 * half;
                let dot: i32 = (0..16)
                    .map(|l| self.level(first + l) * i32::from(xb.qs[16 * half + l]))
                    .sum();
                sum += dd * f32::from(self.scales[2 * k + half]) * dot as f32;
            }
        }
        sum
    }

    fn rows(isa: Isa, w: &[Self], x: &[BlockQ8], out: &mut [f32]) {
        crate::block_dot::q6_k_rows(isa, w, x, out);
    }

    fn rows_batch(isa: Isa, w: &[Self], x: &[BlockQ8], n: usize, out: &mut [f32], stride: usize) {
        crate::block_dot::q6_k_rows_batch(isa, w, x, n, out, stride);
    }

    fn widen(isa: Isa, blocks: &[Self], out: &mut [f32]) {
        crate::block_dot::q6_k_widen(isa, blocks, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml() {
        assert_eq!(std::mem::size_of::<BlockQ4K>(), 144);
        assert_eq!(std::mem::size_of::<BlockQ5K>(), 176);
        assert_eq!(std::mem::size_of::<BlockQ6K>(), 210);
    }

    #[test]
    fn scale_min_packing_round_trips() {
        let pairs: [(u8, u8); 8] =
            std::array::from_fn(|j| ((j * 9) as u8 % 64, (63 - j * 7) as u8));
        assert_eq!(scale_mins(&pack_scale_min(&pairs)), pairs);
    }

    fn round_trip_error<B: WeightBlock>(values: &[f32]) -> f32 {
        let block = B::quantize(values);
        let mut back = vec![0.0; B::VALUES];
        block.dequantize(&mut back);
        values
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn quantizers_stay_within_their_steps() {
        let values: Vec<f32> = (0..QK_K).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
        // Four and five bits over a range of 4: half-steps of about 0.13 and 0.07, plus the
        // 6-bit rounding of each sub-block's scale. Q6_K's steps are 2/32 = 0.0625; a value of
        // the other sign than the sub-block's extreme may clamp at level 31, a whole step off.
        assert!(round_trip_error::<BlockQ4K>(&values) < 0.2);
        assert!(round_trip_error::<BlockQ5K>(&values) < 0.1);
        assert!(round_trip_error::<BlockQ6K>(&values) < 0.07);
    }
}
