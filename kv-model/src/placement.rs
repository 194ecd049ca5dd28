//! Where a model's projection and embedding weights live and in what form: on the backend's
//! device as f32 or f16 tensors, or in host memory in any kv-kernels format (a GGUF's own
//! blocks included), multiplied by kv-kernels.

use burn::tensor::FloatDType;
use kv_kernels::Format;

/// The element type of projection weights kept on the backend's device.
///
/// Decoding one token reads every weight once, so on a CPU a step costs about the weights'
/// bytes over the memory bandwidth: `F16` halves those bytes. Activations, norms, the
/// embedding table and the KV cache stay `f32`; each product rounds its input row to `f16`,
/// accumulates in `f32` (on burn-flex) and rounds its output to `f16`, so logits move off the
/// `F32` model's by about 1% of their size (up to 0.2 on SmolLM2-135M) and greedy tokens can
/// part where two candidates are that close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// 4 bytes per weight: the reference numbers.
    #[default]
    F32,
    /// 2 bytes per weight (IEEE half precision). Needs a backend with `f16` matrix products:
    /// burn-flex or burn-cuda, not burn-ndarray.
    F16,
}

impl WeightDtype {
    /// Bytes per stored weight.
    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 => 2,
        }
    }

    pub(crate) fn float_dtype(self) -> FloatDType {
        match self {
            WeightDtype::F32 => FloatDType::F32,
            WeightDtype::F16 => FloatDType::F16,
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
        })
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "f16" => Ok(WeightDtype::F16),
            other => Err(format!(
                "unknown weight dtype `{other}`: expected f32 or f16"
            )),
        }
    }
}

/// The format of every projection and embedding matrix of a model whose products run through
/// kv-kernels ([`WeightPlacement::Host`]).
///
/// What each trades, on a CPU, where a decode step reads every weight once:
///
/// | format | bits per weight | numbers |
/// |---|---|---|
/// | `F32` | 32 | the reference (transformers' within float rounding) |
/// | `F16` | 16 | weights rounded to half precision |
/// | `Q8_0` | 8.5 | weights in 8-bit blocks; activations rounded to 8 bits per product |
/// | `Q6K` | 6.56 | ggml's Q6_K super-blocks; activations as above |
/// | `Q5_1`, `Q5_0` | 6, 5.5 | ggml's 5-bit blocks, with and without a minimum |
/// | `Q5K` | 5.5 | ggml's Q5_K super-blocks |
/// | `Q4_1`, `Q4_0` | 5, 4.5 | ggml's 4-bit blocks, with and without a minimum |
/// | `Q4K` | 4.5 | ggml's Q4_K super-blocks |
/// | `Native` | as stored | each matrix as its file stores it (llama.cpp's way) |
///
/// Converting a quantized file's matrices to another format cannot restore what quantizing
/// removed: `F32` on a Q4_1 file computes exactly with the Q4_1 values. The k-quants need rows
/// that are whole super-blocks of 256 values; a matrix whose rows are not keeps its file's
/// format (or f32, from a safetensors checkpoint) under those three, as llama.cpp's quantizer
/// falls back for such rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// Every matrix in f32.
    F32,
    /// Every matrix in f16.
    F16,
    /// Every matrix in ggml's Q8_0 blocks (quantized at load where the file has another
    /// format).
    Q8_0,
    /// Every matrix in ggml's Q4_1 blocks.
    Q4_1,
    /// Every matrix in ggml's Q4_0 blocks.
    Q4_0,
    /// Every matrix in ggml's Q5_0 blocks.
    Q5_0,
    /// Every matrix in ggml's Q5_1 blocks.
    Q5_1,
    /// Every matrix whose rows allow it in ggml's Q4_K super-blocks.
    Q4K,
    /// Every matrix whose rows allow it in ggml's Q5_K super-blocks.
    Q5K,
    /// Every matrix whose rows allow it in ggml's Q6_K super-blocks.
    Q6K,
    /// Each matrix in the format its file stores it in: a GGUF's F32, F16, Q8_0, Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q4_K, Q5_K and Q6_K tensors keep their bytes; BF16, Q2_K, Q3_K, IQ4_NL
    /// and IQ4_XS are requantized at load (see `GgmlType::requantize_to`); GPT-2's transposed
    /// matrices and safetensors checkpoints are held in f32.
    Native,
}

impl WeightFormat {
    /// Every format, in the order `--help` lists them.
    pub const ALL: [WeightFormat; 11] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Q8_0,
        WeightFormat::Q6K,
        WeightFormat::Q5_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5K,
        WeightFormat::Q4_1,
        WeightFormat::Q4_0,
        WeightFormat::Q4K,
        WeightFormat::Native,
    ];

    /// The command-line name: the kernel format's (`q4_k`...) or `native`.
    pub fn name(self) -> &'static str {
        match self.kernel_format() {
            Some(format) => format.name(),
            None => "native",
        }
    }

    /// The kernel format every matrix takes, `None` for [`WeightFormat::Native`].
    pub fn kernel_format(self) -> Option<Format> {
        match self {
            WeightFormat::F32 => Some(Format::F32),
            WeightFormat::F16 => Some(Format::F16),
            WeightFormat::Q8_0 => Some(Format::Q8_0),
            WeightFormat::Q4_1 => Some(Format::Q4_1),
            WeightFormat::Q4_0 => Some(Format::Q4_0),
            WeightFormat::Q5_0 => Some(Format::Q5_0),
            WeightFormat::Q5_1 => Some(Format::Q5_1),
            WeightFormat::Q4K => Some(Format::Q4K),
            WeightFormat::Q5K => Some(Format::Q5K),
            WeightFormat::Q6K => Some(Format::Q6K),
            WeightFormat::Native => None,
        }
    }

    /// The same element type as a device tensor, for backends that keep weights on their
    /// device: `F32` and `F16` only.
    pub fn device_dtype(self) -> Option<WeightDtype> {
        match self {
            WeightFormat::F32 => Some(WeightDtype::F32),
            WeightFormat::F16 => Some(WeightDtype::F16),
            _ => None,
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
                format!(
                    "unknown weight format `{s}`: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Where a model's matrices live and who multiplies by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightPlacement {
    /// On the backend's device as tensors of this element type, multiplied by the backend
    /// (every backend; GPUs).
    Device(WeightDtype),
    /// In host memory in this format, multiplied by kv-kernels' CPU kernels on its own
    /// threads (CPU backends: a GPU backend would copy every activation to the host).
    Host(WeightFormat),
}

impl Default for WeightPlacement {
    fn default() -> Self {
        WeightPlacement::Device(WeightDtype::F32)
    }
}
