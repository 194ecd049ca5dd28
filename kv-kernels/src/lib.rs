//! # kv-kernels
//!
//! CPU kernels for the products that dominate decoding: a weight matrix times a few rows of
//! activations, with the weights kept in the format a GGUF file stores them in (ggml's
//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks, the Q4_K, Q5_K and Q6_K super-blocks) or in
//! f16/f32, so a quantized model runs from memory about its file's size and each step reads
//! that many bytes, not a widened copy.
//!
//! - [`Matrix`]: a `[rows, cols]` matrix in one [`Format`], or stacked from parts of several
//!   (a llama.cpp mix fuses a layer's Q, K and V stored in different types); `y = x Wᵀ` on the
//!   calling thread ([`Matrix::matmul`], [`Matrix::matmul_rows`]) or split over [`Threads`]
//!   ([`Matrix::par_matmul`]). The 32-value block formats are stored eight rows interleaved,
//!   so one vector instruction serves eight rows (the `packed` module's docs say how and what
//!   it costs: nothing in memory); the k-quants stay row-major with row kernels.
//!   Many activation rows (a prompt) meet each group of eight rows four at a time, its bytes
//!   loaded once per pass; f32 weights go through `gemm` where they are stored, f16 and
//!   row-major block weights widened a few hundred rows at a time into a buffer that stays
//!   in cache.
//! - [`blocks`]: the block layouts with ggml's dequantization and reference quantizers;
//!   activations meet every block format as 8-bit blocks of 32 with an f32 scale
//!   ([`blocks::BlockQ8`]).
//! - [`Isa`]: the instruction set the kernels run on, detected at run time, with a scalar
//!   reference for every kernel.
//! - [`Threads`]: persistent workers that spin between products and park when idle.
//! - [`attention`]: a prompt's softmax attention for a block of queries over one key head,
//!   both products and the softmax in vector registers, each query row over exactly its keys.
//! - [`quantized_kv`]: one attention head's keys and values in 8 or 4 bits as KIVI holds
//!   them (a quantized KV cache's storage), and attention that widens them one head at a time
//!   into a buffer that stays in the core's cache.
//! - [`vector`]: element-wise functions in vector registers (a softmax row's `exp`, the
//!   SiLU-gated product of a Llama MLP).
//!
//! The crate depends on no tensor library, so it can be tested and reused alone.

#![warn(missing_docs)]

pub mod attention;
mod block_dot;
pub mod blocks;
mod dot;
mod error;
mod isa;
mod matrix;
mod packed;
pub mod quantized_kv;
mod threads;
pub mod vector;

pub use error::{KernelError, Result};
pub use isa::Isa;
pub use matrix::{Format, Matrix};
pub use threads::Threads;
