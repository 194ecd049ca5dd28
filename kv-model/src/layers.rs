//! The building blocks of both families: linear layers, norms and MLPs, as plain tensors
//! (inference only, so no parameters or gradients).

use std::sync::Arc;

use burn::tensor::{activation, backend::Backend, FloatDType, Tensor, TensorData};
use kv_kernels::{Matrix, Threads};

use crate::config::GatedActivation;
use crate::weights::HostTensor;

/// Uploads a host tensor of rank `D`.
pub(crate) fn upload<B: Backend, const D: usize>(
    host: HostTensor,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(host.data, host.shape), device)
}

/// Rows of activations up to which a host-kernel product splits its weight rows over
/// kv-kernels' workers (a decode step, a small batch); longer inputs (a prompt's runs, which
/// run side by side on the cores) take kv-kernels' batched products on the calling thread.
pub(crate) const HOST_KERNEL_MAX_ROWS: usize = 16;

/// A linear layer's weight: a backend tensor, or a host matrix multiplied by kv-kernels.
#[derive(Debug, Clone)]
pub(crate) enum LinearWeight<B: Backend> {
    /// `[in, out]` on the backend's device, so `x W` needs no transpose.
    Device(Tensor<B, 2>),
    /// `[out, in]` in host memory, in any [`kv_kernels::Format`] (the file's own blocks,
    /// for a GGUF).
    Host(Arc<Matrix>),
}

/// `y = x W + b`.
#[derive(Debug, Clone)]
pub(crate) struct Linear<B: Backend> {
    weight: LinearWeight<B>,
    /// `[1, out]`.
    bias: Option<Tensor<B, 2>>,
}

impl<B: Backend> Linear<B> {
    /// From a weight already laid out `[in, out]` and an optional `[out]` bias.
    pub fn new(weight: HostTensor, bias: Option<HostTensor>, device: &B::Device) -> Self {
        Self {
            weight: LinearWeight::Device(upload(weight, device)),
            bias: bias.map(|b| upload::<B, 1>(b, device).unsqueeze_dim(0)),
        }
    }

    /// From a host matrix `[out, in]` multiplied by kv-kernels, and an optional `[out]` bias.
    pub fn host(weight: Arc<Matrix>, bias: Option<HostTensor>, device: &B::Device) -> Self {
        Self {
            weight: LinearWeight::Host(weight),
            bias: bias.map(|b| upload::<B, 1>(b, device).unsqueeze_dim(0)),
        }
    }

    /// The same layer with its weight stored as `dtype` (the bias stays as it is; a host
    /// matrix keeps its own format).
    pub fn with_weight_dtype(self, dtype: FloatDType) -> Self {
        Self {
            weight: match self.weight {
                LinearWeight::Device(w) => LinearWeight::Device(w.cast(dtype)),
                host => host,
            },
            bias: self.bias,
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Device(w) => w.dims()[1],
            LinearWeight::Host(m) => m.rows(),
        }
    }

    /// Whether the weight is a host matrix multiplied by kv-kernels.
    pub fn is_host(&self) -> bool {
        matches!(self.weight, LinearWeight::Host(_))
    }

    /// The `[1, out]` bias, if any.
    pub fn bias(&self) -> Option<&Tensor<B, 2>> {
        self.bias.as_ref()
    }

    /// `x Wᵀ` over `n` rows of host values (`[n, in]` to `[n, out]`), for a host matrix;
    /// `None` for a device weight. Up to [`HOST_KERNEL_MAX_ROWS`] rows (a decode step) split
    /// the weight's rows over kv-kernels' spinning workers; more (a prompt's run, while other
    /// runs keep the other cores busy) run on the calling thread through the batched products.
    pub fn host_product(&self, x: &[f32], n: usize) -> Option<Vec<f32>> {
        match &self.weight {
            LinearWeight::Host(m) if n <= HOST_KERNEL_MAX_ROWS => {
                Some(m.par_matmul(x, n, Threads::global()))
            }
            LinearWeight::Host(m) => {
                let mut y = vec![0.0; n * m.rows()];
                m.matmul(x, n, &mut y);
                Some(y)
            }
            LinearWeight::Device(_) => None,
        }
    }

    /// Bytes the weight takes.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Device(w) => w.shape().num_elements() * w.dtype().size(),
            LinearWeight::Host(m) => m.byte_len(),
        }
    }

    /// `[batch, seq, in]` to `[batch, seq, out]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_columns(x, 0, self.out_features())
    }

    /// `[batch, seq, in]` to `[batch, seq, len]`: output features `start..start + len` only,
    /// multiplying by a view of those weight columns (no copy of the weights).
    pub fn forward_columns(&self, x: Tensor<B, 3>, start: usize, len: usize) -> Tensor<B, 3> {
        let [batch, seq, features] = x.dims();
        // The whole weight is used as it is, not through a view of all its columns.
        let whole = start == 0 && len == self.out_features();
        let columns = |t: &Tensor<B, 2>| {
            if whole {
                t.clone()
            } else {
                t.clone().narrow(1, start, len)
            }
        };
        let rows = x.reshape([batch * seq, features]);
        let y = match &self.weight {
            LinearWeight::Device(weight) => {
                let activation_dtype = rows.dtype();
                let weight_dtype = weight.dtype();
                if weight_dtype == activation_dtype {
                    rows.matmul(columns(weight))
                } else {
                    rows.cast(FloatDType::from(weight_dtype))
                        .matmul(columns(weight))
                        .cast(FloatDType::from(activation_dtype))
                }
            }
            LinearWeight::Host(matrix) => host_product(matrix, rows, start..start + len),
        };
        let y = match &self.bias {
            Some(bias) => y + columns(bias),
            None => y,
        };
        y.reshape([batch, seq, len])
    }
}

/// `x Wᵀ` over output features `outputs` of a host matrix: `[n, in]` to `[n, outputs]`.
///
/// Up to [`HOST_KERNEL_MAX_ROWS`] rows (a decode step) split the product's rows over
/// kv-kernels' spinning workers; more rows (a prompt's run of positions, while other runs keep
/// the other cores busy) run on the calling thread through kv-kernels' batched products, which
/// read the weights where they are stored.
fn host_product<B: Backend>(
    matrix: &Arc<Matrix>,
    x: Tensor<B, 2>,
    outputs: std::ops::Range<usize>,
) -> Tensor<B, 2> {
    let [n, _] = x.dims();
    let device = x.device();
    let len = outputs.len();
    let values: Vec<f32> = x
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 after convert");
    let y = if n <= HOST_KERNEL_MAX_ROWS {
        matrix.par_matmul_rows(&values, n, outputs, Threads::global())
    } else {
        matrix.matmul_rows(&values, n, outputs)
    };
    Tensor::from_data(TensorData::new(y, [n, len]), &device)
}

/// Normalisation over the last dimension.
#[derive(Debug, Clone)]
pub(crate) enum Norm<B: Backend> {
    /// `(x - mean) / sqrt(var + eps) * weight + bias` (GPT-2).
    Layer {
        /// `[hidden]`.
        weight: Tensor<B, 1>,
        /// `[hidden]`.
        bias: Tensor<B, 1>,
        /// Added to the variance.
        eps: f32,
    },
    /// `x / sqrt(mean(x²) + eps) * weight` (Llama).
    Rms {
        /// `[hidden]`.
        weight: Tensor<B, 1>,
        /// Added to the mean square.
        eps: f32,
    },
}

impl<B: Backend> Norm<B> {
    /// `[batch, seq, hidden]` to the same shape.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Norm::Layer { weight, bias, eps } => {
                let mean = x.clone().mean_dim(2);
                let centered = x - mean;
                let var = centered.clone().powi_scalar(2).mean_dim(2);
                let normed = centered / var.add_scalar(*eps).sqrt();
                normed * weight.clone().unsqueeze::<3>() + bias.clone().unsqueeze::<3>()
            }
            Norm::Rms { weight, eps } => {
                let mean_square = x.clone().powi_scalar(2).mean_dim(2);
                x / mean_square.add_scalar(*eps).sqrt() * weight.clone().unsqueeze::<3>()
            }
        }
    }
}

impl<B: Backend> Norm<B> {
    /// Per head: `[batch, heads, seq, head_dim]` normed over `head_dim` (Q/K norms).
    pub fn forward_heads(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, heads, seq, head_dim] = x.dims();
        self.forward(x.reshape([batch, heads * seq, head_dim]))
            .reshape([batch, heads, seq, head_dim])
    }
}

/// The feed-forward half of a block.
#[derive(Debug, Clone)]
pub(crate) enum Mlp<B: Backend> {
    /// `proj(gelu_tanh(fc(x)))` (GPT-2).
    Gelu {
        /// `[hidden, inner]`.
        fc: Linear<B>,
        /// `[inner, hidden]`.
        proj: Linear<B>,
    },
    /// `down(act(gate(x)) * up(x))` (SwiGLU in Llama, GeGLU in Gemma), with gate and up
    /// fused into one product.
    Gated {
        /// `[hidden, 2 * inner]`: the gate's columns, then up's.
        gate_up: Linear<B>,
        /// `[inner, hidden]`.
        down: Linear<B>,
        /// What the gate goes through.
        activation: GatedActivation,
    },
}

impl<B: Backend> Mlp<B> {
    /// The same MLP with its weights stored as `dtype`.
    pub fn with_weight_dtype(self, dtype: FloatDType) -> Self {
        match self {
            Mlp::Gelu { fc, proj } => Mlp::Gelu {
                fc: fc.with_weight_dtype(dtype),
                proj: proj.with_weight_dtype(dtype),
            },
            Mlp::Gated {
                gate_up,
                down,
                activation,
            } => Mlp::Gated {
                gate_up: gate_up.with_weight_dtype(dtype),
                down: down.with_weight_dtype(dtype),
                activation,
            },
        }
    }

    /// Bytes the weights take.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Mlp::Gelu { fc, proj } => fc.weight_bytes() + proj.weight_bytes(),
            Mlp::Gated { gate_up, down, .. } => gate_up.weight_bytes() + down.weight_bytes(),
        }
    }

    /// `[batch, seq, hidden]` to the same shape.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Mlp::Gelu { fc, proj } => proj.forward(gelu_tanh(fc.forward(x))),
            Mlp::Gated {
                gate_up,
                down,
                activation,
            } => {
                let inner = gate_up.out_features() / 2;
                let (gate, up) = if x.dims()[1] == 1 {
                    // One token: one product over the fused weights (the same bytes read,
                    // one call fewer); its halves are short contiguous runs.
                    let both = gate_up.forward(x);
                    (
                        both.clone().narrow(2, 0, inner),
                        both.narrow(2, inner, inner),
                    )
                } else {
                    // A prompt: a product per half, so each result is contiguous and the
                    // element-wise ops below run on whole buffers, not strided views.
                    (
                        gate_up.forward_columns(x.clone(), 0, inner),
                        gate_up.forward_columns(x, inner, inner),
                    )
                };
                let gate = match activation {
                    GatedActivation::Silu => activation::silu(gate),
                    GatedActivation::GeluTanh => gelu_tanh(gate),
                };
                down.forward(gate * up)
            }
        }
    }
}

/// GELU with the tanh approximation GPT-2 was trained with (`gelu_new`):
/// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x³)))`.
fn gelu_tanh<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044_715))
        .mul_scalar((2.0 / std::f32::consts::PI).sqrt());
    x.clone().mul_scalar(0.5) * (inner.tanh().add_scalar(1.0))
}
