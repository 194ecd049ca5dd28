//! Every kernel at every instruction level this machine runs, against the scalar reference
//! and against plain f32 arithmetic on the dequantized values; block layouts against gguf-py.

use std::sync::Arc;

use kv_kernels::blocks::{quantize_row_with, BlockQ4_1, BlockQ8, BlockQ8_0, BLOCK};
use kv_kernels::{Format, Isa, KernelError, Matrix, Threads};
use proptest::prelude::*;

/// `x Wᵀ` in f64 over W's dequantized values: what every format's product approximates.
fn reference(matrix: &Matrix, x: &[f32], n: usize) -> Vec<f32> {
    let w = matrix.to_f32();
    let (rows, cols) = (matrix.rows(), matrix.cols());
    let mut y = vec![0.0; n * rows];
    for i in 0..n {
        for r in 0..rows {
            let dot: f64 = (0..cols)
                .map(|c| f64::from(w[r * cols + c]) * f64::from(x[i * cols + c]))
                .sum();
            y[i * rows + r] = dot as f32;
        }
    }
    y
}

/// The error 8-bit activations may add to one output: each block's rounding of `x` is at
/// most half a step (`max|x| / 254`) per value, times `Σ|w|` of the row.
fn activation_bound(matrix: &Matrix, x: &[f32], n: usize) -> Vec<f32> {
    let w = matrix.to_f32();
    let (rows, cols) = (matrix.rows(), matrix.cols());
    let mut bound = vec![0.0; n * rows];
    for i in 0..n {
        let xi = &x[i * cols..(i + 1) * cols];
        for r in 0..rows {
            let mut b = 0.0f32;
            for blk in 0..cols / BLOCK {
                let span = blk * BLOCK..(blk + 1) * BLOCK;
                let amax = xi[span.clone()].iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let wsum: f32 = w[r * cols..][span].iter().map(|v| v.abs()).sum();
                b += amax / 254.0 * wsum;
            }
            bound[i * rows + r] = b;
        }
    }
    bound
}

/// The formats whose blocks divide a row of `cols` values.
fn formats_for(cols: usize) -> impl Iterator<Item = Format> {
    Format::ALL
        .into_iter()
        .filter(move |f| cols.is_multiple_of(f.block_values()))
}

/// Rows, columns (1 to 4 blocks of 32, or 1 or 2 k-quant super-blocks of 256), activation
/// rows, weights and activations.
fn matrix_strategy() -> impl Strategy<Value = (usize, usize, usize, Vec<f32>, Vec<f32>)> {
    let blocks = prop_oneof![1usize..5, Just(8), Just(16)];
    (1usize..20, blocks, 1usize..10).prop_flat_map(|(rows, blocks, n)| {
        let cols = blocks * BLOCK;
        (
            Just(rows),
            Just(cols),
            Just(n),
            prop::collection::vec(-2.0f32..2.0, rows * cols),
            prop::collection::vec(-3.0f32..3.0, n * cols),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Integer dots are exact at every level, so quantized products agree with the scalar
    /// kernel to float-summation order; float formats likewise.
    #[test]
    fn every_level_matches_the_scalar_kernel((rows, cols, n, w, x) in matrix_strategy()) {
        for format in formats_for(cols) {
            let matrix = Matrix::from_f32(format, rows, cols, &w).unwrap();
            let mut want = vec![0.0; n * rows];
            matrix.matmul_with(Isa::Scalar, &x, n, &mut want);
            for isa in Isa::available() {
                let mut got = vec![0.0; n * rows];
                matrix.matmul_with(isa, &x, n, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    prop_assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{format} {isa}: {g} vs {w}");
                }
            }
        }
    }

    /// Each format's product is x times its own stored values, up to the 8-bit rounding of
    /// `x` for the block formats (and none for f32/f16).
    #[test]
    fn products_equal_the_dequantized_arithmetic((rows, cols, n, w, x) in matrix_strategy()) {
        for format in formats_for(cols) {
            let matrix = Matrix::from_f32(format, rows, cols, &w).unwrap();
            let want = reference(&matrix, &x, n);
            let bound = activation_bound(&matrix, &x, n);
            let mut got = vec![0.0; n * rows];
            matrix.matmul(&x, n, &mut got);
            for ((g, w), b) in got.iter().zip(&want).zip(&bound) {
                let allowed = if format.is_blocked() { b * 1.01 + 1e-4 } else { 1e-4 * (1.0 + w.abs()) };
                prop_assert!((g - w).abs() <= allowed, "{format}: {g} vs {w} (bound {allowed})");
            }
        }
    }

    /// Splitting rows over threads changes nothing.
    #[test]
    fn split_products_equal_one_thread((rows, cols, n, w, x) in matrix_strategy()) {
        let threads = Threads::new(3, Threads::DEFAULT_SPIN);
        for format in formats_for(cols) {
            // Enough rows that the split really happens.
            let tall: Vec<f32> = w.iter().cycle().take(rows * 40 * cols).copied().collect();
            let matrix = Arc::new(Matrix::from_f32(format, rows * 40, cols, &tall).unwrap());
            let mut want = vec![0.0; n * rows * 40];
            matrix.matmul(&x, n, &mut want);
            prop_assert_eq!(matrix.par_matmul(&x, n, &threads), want);
        }
    }

    /// A product over a range of output rows, which may start and end inside a group of eight
    /// interleaved rows, equals those rows of the whole product.
    #[test]
    fn row_ranges_equal_the_whole_product(
        (rows, cols, n, w, x) in matrix_strategy(),
        start in 0usize..20,
        len in 1usize..20,
    ) {
        let threads = Threads::new(2, Threads::DEFAULT_SPIN);
        let start = start % rows;
        let end = (start + len).min(rows);
        for format in formats_for(cols) {
            let matrix = Arc::new(Matrix::from_f32(format, rows, cols, &w).unwrap());
            let mut whole = vec![0.0; n * rows];
            matrix.matmul(&x, n, &mut whole);
            let part = matrix.par_matmul_rows(&x, n, start..end, &threads);
            for i in 0..n {
                for (j, r) in (start..end).enumerate() {
                    let (g, w) = (part[i * (end - start) + j], whole[i * rows + r]);
                    prop_assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{format} row {r}: {g} vs {w}");
                }
            }
        }
    }

    /// Several activation rows share each group's loads (a prompt's products), but every
    /// output takes the one-row kernel's steps: equal bit for bit, at every level.
    #[test]
    fn activation_rows_together_equal_each_alone((rows, cols, n, w, x) in matrix_strategy()) {
        // Fewer than 16 rows of f32 and f16 share each weight load across three activation
        // rows (a speculative pass); the block formats share each group's loads; the k-quants
        // (rows of 256 values or more) unpack each block once for up to four.
        let k_quants = [Format::Q4K, Format::Q5K, Format::Q6K];
        let k_quants = if cols % 256 == 0 { &k_quants[..] } else { &[] };
        for &format in [Format::Q8_0, Format::Q4_1, Format::F32, Format::F16].iter().chain(k_quants) {
            let matrix = Matrix::from_f32(format, rows, cols, &w).unwrap();
            for isa in Isa::available() {
                let mut together = vec![0.0; n * rows];
                matrix.matmul_with(isa, &x, n, &mut together);
                for i in 0..n {
                    let mut alone = vec![0.0; rows];
                    matrix.matmul_with(isa, &x[i * cols..(i + 1) * cols], 1, &mut alone);
                    prop_assert_eq!(&together[i * rows..(i + 1) * rows], &alone[..], "{} {} row {}", format, isa, i);
                }
            }
        }
    }

    /// The vector quantizer gives the scalar one's bytes, scale and sum exactly, ties (here
    /// every `k + 0.5` once the block's largest magnitude is 127) included.
    #[test]
    fn activation_quantizer_is_the_same_at_every_level(
        values in prop::collection::vec(-3.0f32..3.0, 4 * BLOCK),
        halves in prop::collection::vec(-254i32..=254, BLOCK),
    ) {
        let mut ties: Vec<f32> = halves.iter().map(|&h| h as f32 / 2.0).collect();
        ties[0] = 127.0;
        let row = [values, ties, vec![0.0; BLOCK]].concat();
        let mut want = Vec::new();
        quantize_row_with(Isa::Scalar, &row, &mut want);
        for isa in Isa::available() {
            let mut got = Vec::new();
            quantize_row_with(isa, &row, &mut got);
            prop_assert_eq!(&got, &want, "{}", isa);
        }
    }

    /// Reordering and stacking rows moves blocks whole.
    #[test]
    fn select_and_stack_move_rows_whole((rows, cols, _n, w, _x) in matrix_strategy()) {
        for format in formats_for(cols) {
            let matrix = Matrix::from_f32(format, rows, cols, &w).unwrap();
            let dense = matrix.to_f32();
            let order: Vec<usize> = (0..rows).rev().collect();
            let picked = matrix.select_rows(&order).to_f32();
            for (i, &r) in order.iter().enumerate() {
                prop_assert_eq!(&picked[i * cols..(i + 1) * cols], &dense[r * cols..(r + 1) * cols]);
            }
            let both = Matrix::stack(&[matrix.clone(), matrix.clone()]).unwrap();
            prop_assert_eq!(both.rows(), 2 * rows);
            prop_assert_eq!(both.to_f32(), [dense.clone(), dense].concat());
        }
    }
}

/// A prompt's products (many activation rows: `gemm` for f32/f16, f16 widened 64 rows at a
/// time; the batch kernels for the block formats), whole and over a row range split across
/// threads, equal the dequantized arithmetic as the matrix-vector path does.
#[test]
fn prompt_sized_products_equal_the_dequantized_arithmetic() {
    for cols in [96, 512] {
        prompt_sized_products(cols);
    }
}

fn prompt_sized_products(cols: usize) {
    let (rows, n) = (137, 21);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 401) as f32 / 100.0 - 2.0)
        .collect();
    let x: Vec<f32> = (0..n * cols)
        .map(|i| ((i * 104_729) % 601) as f32 / 100.0 - 3.0)
        .collect();
    let threads = Threads::new(2, Threads::DEFAULT_SPIN);
    for format in formats_for(cols) {
        let matrix = Arc::new(Matrix::from_f32(format, rows, cols, &w).unwrap());
        let want = reference(&matrix, &x, n);
        let bound = activation_bound(&matrix, &x, n);
        let allowed = |w: f32, b: f32| {
            if format.is_blocked() {
                b * 1.01 + 1e-4
            } else {
                1e-4 * (1.0 + w.abs())
            }
        };
        let mut got = vec![0.0; n * rows];
        matrix.matmul(&x, n, &mut got);
        for ((g, w), b) in got.iter().zip(&want).zip(&bound) {
            assert!((g - w).abs() <= allowed(*w, *b), "{format}: {g} vs {w}");
        }
        let (start, end) = (3, 135);
        let part = matrix.par_matmul_rows(&x, n, start..end, &threads);
        for i in 0..n {
            for (j, r) in (start..end).enumerate() {
                let (g, w, b) = (
                    part[i * (end - start) + j],
                    want[i * rows + r],
                    bound[i * rows + r],
                );
                assert!(
                    (g - w).abs() <= allowed(w, b),
                    "{format} row {r}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn quantizers_round_as_ggml_does() {
    // Q8_0: the largest magnitude is ±127, others round to nearest.
    let values: [f32; BLOCK] = std::array::from_fn(|i| i as f32 - 16.0);
    let q = BlockQ8_0::quantize(&values);
    assert_eq!(q.qs[0], -127);
    assert_eq!(q.qs[16], 0);
    assert_eq!(q.qs[24], (8.0f32 * 127.0 / 16.0).round() as i8);
    // Q4_1: the minimum is level 0, the maximum level 15.
    let q = BlockQ4_1::quantize(&values);
    assert_eq!(q.qs[0] & 0x0F, 0);
    assert_eq!(q.qs[15] >> 4, 15);
    assert_eq!(q.m.to_f32(), -16.0);
    // Activations keep an f32 scale.
    let a = BlockQ8::quantize(&values);
    assert_eq!(a.d, 16.0 / 127.0);
}

/// The gguf-py cases kv-model's loader is tested on (random blocks with real f16 scales,
/// written by scripts/make_dequant_fixtures.py) and the values gguf-py dequantizes them to:
/// every format kv-kernels keeps reads them as llama.cpp does.
#[test]
fn ggml_bytes_read_as_gguf_py_dequantizes_them() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../kv-model/tests/fixtures/dequant.json"
    );
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (name, format) in [
        ("F16", Format::F16),
        ("Q8_0", Format::Q8_0),
        ("Q4_0", Format::Q4_0),
        ("Q4_1", Format::Q4_1),
        ("Q5_0", Format::Q5_0),
        ("Q5_1", Format::Q5_1),
        ("Q4_K", Format::Q4K),
        ("Q5_K", Format::Q5K),
        ("Q6_K", Format::Q6K),
    ] {
        let case = &cases[name];
        let raw = hex::decode(case["raw_hex"].as_str().unwrap()).unwrap();
        let elements = case["elements"].as_u64().unwrap() as usize;
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let (rows, cols) = if format.is_blocked() {
            (elements / format.block_values(), format.block_values())
        } else {
            (1, elements)
        };
        let matrix = Matrix::from_ggml_bytes(format, rows, cols, &raw).unwrap();
        assert_eq!(matrix.byte_len(), raw.len(), "{name}");
        for (i, (g, w)) in matrix.to_f32().iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name} element {i}: {g} vs {w}"
            );
        }
        // And the product over those bytes equals the dequantized arithmetic at every level.
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.3).cos()).collect();
        let want = reference(&matrix, &x, 1);
        let bound = activation_bound(&matrix, &x, 1);
        for isa in Isa::available() {
            let mut y = vec![0.0; matrix.rows()];
            matrix.matmul_with(isa, &x, 1, &mut y);
            for ((g, w), b) in y.iter().zip(&want).zip(&bound) {
                assert!((g - w).abs() <= b * 1.01 + 1e-4, "{name} {isa}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors_that_say_what_to_fix() {
    let err = Matrix::from_f32(Format::Q4_1, 2, 48, &[0.0; 96]).unwrap_err();
    assert_eq!(
        err,
        KernelError::RaggedBlocks {
            format: Format::Q4_1,
            block: 32,
            cols: 48
        }
    );
    assert!(err.to_string().contains("f32 or f16 always do"), "{err}");
    let err = Matrix::from_f32(Format::Q4K, 1, 96, &[0.0; 96]).unwrap_err();
    assert!(err.to_string().contains("blocks of 256 values"), "{err}");
    let err = Matrix::from_ggml_bytes(Format::Q8_0, 2, 32, &[0; 60]).unwrap_err();
    assert!(err.to_string().contains("needs 68 bytes, got 60"), "{err}");
    let a = Matrix::from_f32(Format::F32, 1, 32, &[0.0; 32]).unwrap();
    let b = Matrix::from_f32(Format::F32, 1, 64, &[0.0; 64]).unwrap();
    assert_eq!(
        Matrix::stack(&[a, b]),
        Err(KernelError::MismatchedWidths {
            first: 32,
            other: 64
        })
    );
    assert_eq!(Matrix::stack(&[]), Err(KernelError::NothingToStack));
}

/// A stack of parts in different formats (a Q4_K_M layer's Q, K and V) multiplies each part
/// with its own kernels: the product equals the parts' products side by side, at every
/// level, over any row range, split over threads or not, and with a prompt's many rows.
#[test]
fn mixed_format_stacks_equal_their_parts() {
    let cols = 512;
    let layout = [
        (Format::Q5_0, 13),
        (Format::Q4K, 9),
        (Format::Q5_0, 3),
        (Format::Q8_0, 17),
        (Format::Q6K, 8),
    ];
    let parts: Vec<Matrix> = layout
        .iter()
        .enumerate()
        .map(|(k, &(format, rows))| {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| (((i + 31 * k) * 7919) % 401) as f32 / 100.0 - 2.0)
                .collect();
            Matrix::from_f32(format, rows, cols, &w).unwrap()
        })
        .collect();
    let stacked = Arc::new(Matrix::stack(&parts).unwrap());
    assert_eq!(stacked.format(), None);
    assert_eq!(
        stacked.part_formats(),
        layout.map(|(format, rows)| (rows, format)).to_vec(),
        "runs of one format stay apart where they are not adjacent"
    );
    let rows: usize = layout.iter().map(|&(_, r)| r).sum();
    assert_eq!(stacked.rows(), rows);
    assert_eq!(
        stacked.byte_len(),
        parts.iter().map(Matrix::byte_len).sum::<usize>()
    );
    let threads = Threads::new(3, Threads::DEFAULT_SPIN);
    for n in [1, 3, 20] {
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 104_729) % 601) as f32 / 100.0 - 3.0)
            .collect();
        let mut want = vec![0.0; n * rows];
        let mut first = 0;
        for part in &parts {
            let mut y = vec![0.0; n * part.rows()];
            part.matmul(&x, n, &mut y);
            for i in 0..n {
                want[i * rows + first..][..part.rows()]
                    .copy_from_slice(&y[i * part.rows()..(i + 1) * part.rows()]);
            }
            first += part.rows();
        }
        let mut got = vec![0.0; n * rows];
        stacked.matmul(&x, n, &mut got);
        assert_eq!(got, want, "{n} rows");
        assert_eq!(stacked.par_matmul(&x, n, &threads), want, "{n} rows, split");
        // A range that cuts a group of eight interleaved Q8_0 rows reads those rows one at a
        // time: the same integer dots, summed in another order.
        for range in [0..rows, 5..30, 20..rows] {
            let part = stacked.matmul_rows(&x, n, range.clone());
            for i in 0..n {
                let got = &part[i * range.len()..(i + 1) * range.len()];
                let whole = &want[i * rows + range.start..i * rows + range.end];
                for (g, w) in got.iter().zip(whole) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{range:?}: {g} vs {w}"
                    );
                }
            }
        }
        for isa in Isa::available() {
            let mut at_level = vec![0.0; n * rows];
            stacked.matmul_with(isa, &x, n, &mut at_level);
            let mut reference = vec![0.0; n * rows];
            stacked.matmul_with(Isa::Scalar, &x, n, &mut reference);
            for (g, w) in at_level.iter().zip(&reference) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{isa}: {g} vs {w}");
            }
        }
    }
    // Rows reordered across parts, and back to dense values, move whole.
    let order: Vec<usize> = (0..rows).rev().collect();
    let reversed = stacked.select_rows(&order);
    let dense = stacked.to_f32();
    let back = reversed.to_f32();
    for (i, &r) in order.iter().enumerate() {
        assert_eq!(
            back[i * cols..(i + 1) * cols],
            dense[r * cols..(r + 1) * cols]
        );
    }
}

#[test]
fn isa_names_parse_back_and_best_is_available() {
    for isa in Isa::ALL {
        assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
    }
    assert!(Isa::best().is_available());
    assert!(Isa::available().contains(&Isa::Scalar));
}
