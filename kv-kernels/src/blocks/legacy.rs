//! ggml's first block formats: 32 values of a row with one f16 scale (Q4_0, Q5_0, Q8_0), or a
//! scale and a minimum (Q4_1, Q5_1). Byte `j` of a 4-bit block holds value `j` in its low
//! nibble and value `j + 16` in its high one; the 5-bit formats keep each value's fifth bit in
//! a 32-bit mask `qh` (bit `j` for value `j`).
//!
//! The quantizers are ggml's reference ones (`quantize_row_*_ref`), so a matrix quantized
//! here has the bytes llama.cpp's quantizer would write for the same values.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::{BlockQ8, WeightBlock, BLOCK};
use crate::isa::Isa;

/// ggml's `block_q4_1`: 32 weights as 4-bit steps above a minimum, `x = d * q + m`, 20 bytes.
///
/// Nibble order is ggml's: byte `j` holds value `j` in its low half and value `j + 16` in its
/// high half.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// The step between levels.
    pub d: f16,
    /// The value of level 0.
    pub m: f16,
    /// 32 levels in `0..16`, two per byte.
    pub qs: [u8; BLOCK / 2],
}

/// ggml's `block_q8_0`: 32 weights as signed bytes times a scale, `x = d * q`, 34 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// The scale.
    pub d: f16,
    /// 32 values in `-127..=127`.
    pub qs: [i8; BLOCK],
}

impl BlockQ4_1 {
    /// ggml's reference quantizer (`quantize_row_q4_1_ref`): the block's minimum and range
    /// over 15 steps, each value rounded to the nearest step.
    pub fn quantize(values: &[f32; BLOCK]) -> Self {
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let level = |x: f32| (((x - min) * id + 0.5) as u8).min(15);
        let mut qs = [0u8; BLOCK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            *q = level(values[j]) | (level(values[j + BLOCK / 2]) << 4);
        }
        Self {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qs,
        }
    }

    /// The 32 values this block stands for.
    pub fn dequantize(&self, out: &mut [f32; BLOCK]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = d * f32::from(q & 0x0F) + m;
            out[j + BLOCK / 2] = d * f32::from(q >> 4) + m;
        }
    }
}

impl BlockQ8_0 {
    /// ggml's reference quantizer (`quantize_row_q8_0_ref`): the largest magnitude maps to
    /// 127, every value rounds to the nearest step.
    pub fn quantize(values: &[f32; BLOCK]) -> Self {
        let (d, qs) = quantize_symmetric(values);
        Self {
            d: f16::from_f32(d),
            qs,
        }
    }

    /// The 32 values this block stands for.
    pub fn dequantize(&self, out: &mut [f32; BLOCK]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = d * f32::from(q);
        }
    }
}

/// `(d, q)` with `d = max|x| / 127` and `q = round(x / d)`.
fn quantize_symmetric(values: &[f32; BLOCK]) -> (f32, [i8; BLOCK]) {
    let amax = values.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; BLOCK];
    for (q, &x) in qs.iter_mut().zip(values) {
        *q = (x * id).round() as i8;
    }
    (d, qs)
}

/// ggml's `block_q4_0`: 32 weights as 4-bit levels around zero, `x = d * (q - 8)`, 18 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// The step.
    pub d: f16,
    /// 32 levels in `0..16`, two per byte.
    pub qs: [u8; BLOCK / 2],
}

/// ggml's `block_q5_0`: 32 weights as 5-bit levels around zero, `x = d * (q - 16)`, 22 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ5_0 {
    /// The step.
    pub d: f16,
    /// Each value's fifth bit (bit `j` of this little-endian `u32` for value `j`).
    pub qh: [u8; 4],
    /// The low four bits of 32 levels, two per byte.
    pub qs: [u8; BLOCK / 2],
}

/// ggml's `block_q5_1`: 32 weights as 5-bit steps above a minimum, `x = d * q + m`, 24 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ5_1 {
    /// The step.
    pub d: f16,
    /// The value of level 0.
    pub m: f16,
    /// Each value's fifth bit (bit `j` of this little-endian `u32` for value `j`).
    pub qh: [u8; 4],
    /// The low four bits of 32 levels, two per byte.
    pub qs: [u8; BLOCK / 2],
}

/// Value `j` of a 4-bit block (`j < 32`).
fn nibble(qs: &[u8; BLOCK / 2], j: usize) -> u8 {
    if j < BLOCK / 2 {
        qs[j] & 0x0F
    } else {
        qs[j - BLOCK / 2] >> 4
    }
}

/// Value `j` of a 5-bit block.
fn level5(qs: &[u8; BLOCK / 2], qh: [u8; 4], j: usize) -> u8 {
    nibble(qs, j) | ((((u32::from_le_bytes(qh) >> j) & 1) as u8) << 4)
}

/// Levels `q[j]` (below 32) packed as a 5-bit block's nibbles and fifth bits.
fn pack5(q: &[u8; BLOCK]) -> ([u8; BLOCK / 2], [u8; 4]) {
    let mut qs = [0u8; BLOCK / 2];
    let mut qh = 0u32;
    for j in 0..BLOCK / 2 {
        qs[j] = (q[j] & 0x0F) | ((q[j + BLOCK / 2] & 0x0F) << 4);
        qh |= u32::from(q[j] >> 4) << j;
        qh |= u32::from(q[j + BLOCK / 2] >> 4) << (j + BLOCK / 2);
    }
    (qs, qh.to_le_bytes())
}

/// The value of largest magnitude, sign kept (ggml's symmetric formats scale by it).
fn signed_max(values: &[f32]) -> f32 {
    values
        .iter()
        .copied()
        .fold(0.0f32, |m, x| if x.abs() > m.abs() { x } else { m })
}

/// `Σ q_w q_x` over a block's signed levels `w(j)` and an activation block.
fn signed_dot(x: &BlockQ8, w: impl Fn(usize) -> i32) -> i32 {
    (0..BLOCK).map(|j| w(j) * i32::from(x.qs[j])).sum()
}

fn block_array(values: &[f32]) -> &[f32; BLOCK] {
    values.try_into().expect("a block of 32 values")
}

impl WeightBlock for BlockQ4_0 {
    const VALUES: usize = BLOCK;

    /// ggml's `quantize_row_q4_0_ref`: the value of largest magnitude maps to level 0
    /// (`d = max / -8`), every value rounds to the nearest level.
    fn quantize(values: &[f32]) -> Self {
        let max = signed_max(values);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let level = |x: f32| ((x * id + 8.5) as u8).min(15);
        let v = block_array(values);
        Self {
            d: f16::from_f32(d),
            qs: std::array::from_fn(|j| level(v[j]) | (level(v[j + BLOCK / 2]) << 4)),
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, o) in out[..BLOCK].iter_mut().enumerate() {
            *o = d * (f32::from(nibble(&self.qs, j)) - 8.0);
        }
    }

    fn dot(&self, x: &[BlockQ8]) -> f32 {
        let dot = signed_dot(&x[0], |j| i32::from(nibble(&self.qs, j)) - 8);
        self.d.to_f32() * x[0].d * dot as f32
    }

    fn rows(isa: Isa, w: &[Self], x: &[BlockQ8], out: &mut [f32]) {
        crate::block_dot::q4_0_rows(isa, w, x, out);
    }
}

impl WeightBlock for BlockQ5_0 {
    const VALUES: usize = BLOCK;

    /// ggml's `quantize_row_q5_0_ref`: as Q4_0 with 32 levels (`d = max / -16`).
    fn quantize(values: &[f32]) -> Self {
        let max = signed_max(values);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let v = block_array(values);
        let q: [u8; BLOCK] = std::array::from_fn(|j| ((v[j] * id + 16.5) as u8).min(31));
        let (qs, qh) = pack5(&q);
        Self {
            d: f16::from_f32(d),
            qh,
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, o) in out[..BLOCK].iter_mut().enumerate() {
            *o = d * (f32::from(level5(&self.qs, self.qh, j)) - 16.0);
        }
    }

    fn dot(&self, x: &[BlockQ8]) -> f32 {
        let dot = signed_dot(&x[0], |j| i32::from(level5(&self.qs, self.qh, j)) - 16);
        self.d.to_f32() * x[0].d * dot as f32
    }

    fn rows(isa: Isa, w: &[Self], x: &[BlockQ8], out: &mut [f32]) {
        crate::block_dot::q5_0_rows(isa, w, x, out);
    }
}

impl WeightBlock for BlockQ5_1 {
    const VALUES: usize = BLOCK;

    /// ggml's `quantize_row_q5_1_ref`: the minimum and range over 31 steps.
    fn quantize(values: &[f32]) -> Self {
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let v = block_array(values);
        let q: [u8; BLOCK] = std::array::from_fn(|j| (((v[j] - min) * id + 0.5) as u8).min(31));
        let (qs, qh) = pack5(&q);
        Self {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qh,
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (j, o) in out[..BLOCK].iter_mut().enumerate() {
            *o = d * f32::from(level5(&self.qs, self.qh, j)) + m;
        }
    }

    fn dot(&self, x: &[BlockQ8]) -> f32 {
        let dot = signed_dot(&x[0], |j| i32::from(level5(&self.qs, self.qh, j)));
        self.d.to_f32() * x[0].d * dot as f32 + self.m.to_f32() * x[0].s
    }

    fn rows(isa: Isa, w: &[Self], x: &[BlockQ8], out: &mut [f32]) {
        crate::block_dot::q5_1_rows(isa, w, x, out);
    }
}

impl WeightBlock for BlockQ4_1 {
    const VALUES: usize = BLOCK;

    fn quantize(values: &[f32]) -> Self {
        BlockQ4_1::quantize(block_array(values))
    }

    fn dequantize(&self, out: &mut [f32]) {
        BlockQ4_1::dequantize(self, (&mut out[..BLOCK]).try_into().expect("32 values"));
    }

    fn dot(&self, x: &[BlockQ8]) -> f32 {
        let dot = signed_dot(&x[0], |j| i32::from(nibble(&self.qs, j)));
        self.d.to_f32() * x[0].d * dot as f32 + self.m.to_f32() * x[0].s
    }
}

impl WeightBlock for BlockQ8_0 {
    const VALUES: usize = BLOCK;

    fn quantize(values: &[f32]) -> Self {
        BlockQ8_0::quantize(block_array(values))
    }

    fn dequantize(&self, out: &mut [f32]) {
        BlockQ8_0::dequantize(self, (&mut out[..BLOCK]).try_into().expect("32 values"));
    }

    fn dot(&self, x: &[BlockQ8]) -> f32 {
        let dot = signed_dot(&x[0], |j| i32::from(self.qs[j]));
        self.d.to_f32() * x[0].d * dot as f32
    }
}
