//! Building a [`Transformer`] from a file's weights or from random numbers: each tensor from a
//! [`TensorSource`], the matrices placed as a [`WeightPlacement`] says, Q/K/V and the MLP's
//! gate and up projections fused into one matrix each.

use super::*;

impl<B: Backend> Transformer<B> {
    /// Builds the model from Hugging Face-named weights, f32 on the device; every tensor's
    /// shape is checked against `config`.
    pub fn from_weights(
        config: &ModelConfig,
        weights: Weights,
        device: &B::Device,
    ) -> Result<Self> {
        Self::from_weights_placed(config, weights, WeightPlacement::default(), device)
    }

    /// [`Transformer::from_weights`] with the matrices placed as `placement` says (on the
    /// device, or on the host in a kv-kernels format, a GGUF's own blocks included).
    pub fn from_weights_placed(
        config: &ModelConfig,
        mut weights: Weights,
        placement: WeightPlacement,
        device: &B::Device,
    ) -> Result<Self> {
        let name = weights.source_name().to_owned();
        config.validate(&name)?;
        if let Some(rotary) = config.variations.rotary_dim {
            lay_out_partial_rotary(config, &mut weights, rotary)?;
        }
        let gpt2_prefix = if weights.contains("wte.weight") {
            ""
        } else {
            "transformer."
        };
        build(config, &mut weights, gpt2_prefix, placement, device)
    }

    /// A model of `config`'s shape with deterministic random weights from `seed`: for tests,
    /// and for timing where the real weights cannot be carried.
    pub fn random(config: &ModelConfig, seed: u64, device: &B::Device) -> Result<Self> {
        Self::random_placed(config, seed, WeightPlacement::default(), device)
    }

    /// [`Transformer::random`] with the matrices placed as `placement` says.
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_model::{Logits, ModelConfig, Transformer, WeightFormat, WeightPlacement};
    ///
    /// let json = serde_json::json!({
    ///     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    ///     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    /// });
    /// let config = ModelConfig::from_hf_json(&json, "doc").unwrap();
    /// let device = Default::default();
    /// let dense = Transformer::<NdArray>::random(&config, 3, &device).unwrap();
    /// // The same weights on the host, multiplied by kv-kernels in f32: the same logits.
    /// let host = WeightPlacement::Host(WeightFormat::F32);
    /// let kernels = Transformer::<NdArray>::random_placed(&config, 3, host, &device).unwrap();
    /// let ids = [vec![1, 2, 3]];
    /// let a = dense.forward_uncached(&ids, None, Logits::All).unwrap();
    /// let b = kernels.forward_uncached(&ids, None, Logits::All).unwrap();
    /// a.into_data().assert_approx_eq::<f32>(&b.into_data(), Default::default());
    /// ```
    pub fn random_placed(
        config: &ModelConfig,
        seed: u64,
        placement: WeightPlacement,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate("random model")?;
        build(
            config,
            &mut RandomSource { state: seed },
            "transformer.",
            placement,
            device,
        )
    }
}

trait TensorSource {
    /// The tensor `name` (Hugging Face naming) of `shape`.
    fn tensor(&mut self, name: &str, shape: &[usize], role: Role) -> Result<HostTensor>;

    /// The 2-D tensor `name` of `shape` (PyTorch order) as a matrix in `format`.
    fn matrix(&mut self, name: &str, shape: [usize; 2], format: WeightFormat) -> Result<Matrix> {
        let dense = self.tensor(name, &shape, Role::Matrix)?;
        dense_matrix(name, dense, format.kernel_format().unwrap_or(Format::F32))
    }
}

/// What a tensor is for, which decides how a random model fills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Matrix,
    Bias,
    NormWeight,
}

impl TensorSource for Weights {
    fn tensor(&mut self, name: &str, shape: &[usize], _role: Role) -> Result<HostTensor> {
        self.take(name, shape)
    }

    fn matrix(&mut self, name: &str, shape: [usize; 2], format: WeightFormat) -> Result<Matrix> {
        self.take_matrix(name, shape, format)
    }
}

/// Deterministic pseudo-random weights (splitmix64): small matrices, zero-mean biases, unit
/// norm weights.
struct RandomSource {
    state: u64,
}

impl RandomSource {
    fn next_unit(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

impl TensorSource for RandomSource {
    fn tensor(&mut self, _name: &str, shape: &[usize], role: Role) -> Result<HostTensor> {
        let len = shape.iter().product();
        let data = match role {
            Role::NormWeight => vec![1.0; len],
            Role::Matrix => (0..len).map(|_| 0.08 * self.next_unit()).collect(),
            Role::Bias => (0..len).map(|_| 0.02 * self.next_unit()).collect(),
        };
        Ok(HostTensor::new(shape.to_vec(), data))
    }
}

/// Builds the model from any tensor source, its matrices placed as `placement` says.
fn build<B: Backend>(
    config: &ModelConfig,
    source: &mut dyn TensorSource,
    gpt2_prefix: &str,
    placement: WeightPlacement,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let host = match placement {
        WeightPlacement::Host(format) => Some(format),
        WeightPlacement::Device(_) => None,
    };
    let mut matrices = Matrices {
        source,
        host,
        device,
    };
    let parts = match config.architecture {
        Architecture::Gpt2 => build_gpt2(config, &mut matrices, gpt2_prefix)?,
        Architecture::Llama => build_llama(config, &mut matrices)?,
    };
    let model = Transformer {
        config: config.clone(),
        token_embedding: parts.token_embedding,
        positions: parts.positions,
        blocks: parts.blocks,
        final_norm: parts.final_norm,
        lm_head: parts.lm_head,
        execution: Execution::Sequential,
        split: PromptSplit::default(),
        layer_caches: LayerCaches::default(),
        device: device.clone(),
    };
    match placement {
        WeightPlacement::Device(WeightDtype::F32) | WeightPlacement::Host(_) => Ok(model),
        WeightPlacement::Device(dtype) => model.with_weight_dtype(dtype),
    }
}

/// What a family builder returns.
struct Parts<B: Backend> {
    blocks: Vec<Block<B>>,
    token_embedding: Embedding<B>,
    positions: PositionEncoding<B>,
    final_norm: Norm<B>,
    lm_head: Linear<B>,
}

/// A projection's weight before it becomes a layer: dense `[in, out]` for the device, or a
/// host matrix `[out, in]`.
enum Projection {
    Dense(HostTensor),
    Rows(Matrix),
}

/// The tensor source with the placement: hands out projections and embeddings in the form
/// the model will keep them.
struct Matrices<'a, B: Backend> {
    source: &'a mut dyn TensorSource,
    /// The kv-kernels format, when products run on the host.
    host: Option<WeightFormat>,
    device: &'a B::Device,
}

impl<B: Backend> Matrices<'_, B> {
    /// A dense tensor (norms, biases, position tables).
    fn tensor(&mut self, name: &str, shape: &[usize], role: Role) -> Result<HostTensor> {
        self.source.tensor(name, shape, role)
    }

    /// A PyTorch `nn.Linear` weight stored `[out, in]`.
    fn linear(&mut self, name: &str, inputs: usize, outputs: usize) -> Result<Projection> {
        Ok(match self.host {
            Some(format) => {
                Projection::Rows(self.source.matrix(name, [outputs, inputs], format)?)
            }
            None => Projection::Dense(
                self.source
                    .tensor(name, &[outputs, inputs], Role::Matrix)?
                    .transposed(),
            ),
        })
    }

    /// A GPT-2 Conv1D weight stored `[in, out]`.
    fn conv1d(&mut self, name: &str, inputs: usize, outputs: usize) -> Result<Projection> {
        let dense = self.source.tensor(name, &[inputs, outputs], Role::Matrix)?;
        Ok(match self.host {
            Some(format) => Projection::Rows(dense_matrix(
                name,
                dense.transposed(),
                format.kernel_format().unwrap_or(Format::F32),
            )?),
            None => Projection::Dense(dense),
        })
    }

    /// Projections that share an input, fused into one product (Q/K/V, gate/up).
    fn fuse(&self, parts: Vec<Projection>, name: &str) -> Result<Projection> {
        if let Some(Projection::Dense(_)) = parts.first() {
            let dense: Vec<HostTensor> = parts
                .into_iter()
                .map(|p| match p {
                    Projection::Dense(t) => t,
                    Projection::Rows(_) => unreachable!("one placement per model"),
                })
                .collect();
            return Ok(Projection::Dense(HostTensor::concat_columns(&dense)));
        }
        let rows: Vec<Matrix> = parts
            .into_iter()
            .map(|p| match p {
                Projection::Rows(m) => m,
                Projection::Dense(_) => unreachable!("one placement per model"),
            })
            .collect();
        // A file may store the parts in different formats (a Q4_K_M layer's V in more bits
        // than its Q and K): the stack keeps each in its own, so nothing is requantized.
        Ok(Projection::Rows(Matrix::stack(&rows).map_err(|e| {
            ModelError::Kernel {
                source_name: "model".into(),
                tensor: name.into(),
                source: e,
            }
        })?))
    }

    /// A layer from a projection and its optional `[out]` bias.
    fn layer(&self, weight: Projection, bias: Option<HostTensor>) -> Linear<B> {
        match weight {
            Projection::Dense(w) => Linear::new(w, bias, self.device),
            Projection::Rows(m) => Linear::host(Arc::new(m), bias, self.device),
        }
    }

    /// The token embedding `[vocab, hidden]` and, with tied embeddings, the LM head over the
    /// same values (held once on the host; transposed for the device).
    fn embedding(
        &mut self,
        name: &str,
        vocab: usize,
        hidden: usize,
        untied_head: Option<&str>,
    ) -> Result<(Embedding<B>, Linear<B>)> {
        match self.host {
            Some(format) => {
                let table = Arc::new(self.source.matrix(name, [vocab, hidden], format)?);
                let head = match untied_head {
                    Some(head) => Arc::new(self.source.matrix(head, [vocab, hidden], format)?),
                    None => Arc::clone(&table),
                };
                Ok((
                    Embedding::Host(table),
                    Linear::host(head, None, self.device),
                ))
            }
            None => {
                let table = self.source.tensor(name, &[vocab, hidden], Role::Matrix)?;
                let head = match untied_head {
                    Some(head) => self.source.tensor(head, &[vocab, hidden], Role::Matrix)?,
                    None => table.clone(),
                };
                Ok((
                    Embedding::Device(upload(table, self.device)),
                    Linear::new(head.transposed(), None, self.device),
                ))
            }
        }
    }
}

/// A dense `[rows, cols]` tensor as a matrix in `format`.
fn dense_matrix(name: &str, tensor: HostTensor, format: Format) -> Result<Matrix> {
    Matrix::from_f32(format, tensor.shape[0], tensor.shape[1], &tensor.data).map_err(|e| {
        ModelError::Kernel {
            source_name: "model".into(),
            tensor: name.into(),
            source: e,
        }
    })
}

fn build_gpt2<B: Backend>(
    c: &ModelConfig,
    m: &mut Matrices<'_, B>,
    prefix: &str,
) -> Result<Parts<B>> {
    let hidden = c.hidden_size;
    let device = m.device;
    let layer_norm = |m: &mut Matrices<'_, B>, name: &str| -> Result<Norm<B>> {
        Ok(Norm::Layer {
            weight: upload(
                m.tensor(&format!("{name}.weight"), &[hidden], Role::NormWeight)?,
                device,
            ),
            bias: upload(
                m.tensor(&format!("{name}.bias"), &[hidden], Role::Bias)?,
                device,
            ),
            eps: c.norm_eps,
        })
    };
    let mut norms = Vec::new();
    for i in 0..c.num_layers {
        norms.push((
            layer_norm(m, &format!("{prefix}h.{i}.ln_1"))?,
            layer_norm(m, &format!("{prefix}h.{i}.ln_2"))?,
        ));
    }
    let final_norm = layer_norm(m, &format!("{prefix}ln_f"))?;
    let conv1d = |m: &mut Matrices<'_, B>, name: &str, inputs: usize, outputs: usize| {
        let weight = m.conv1d(&format!("{name}.weight"), inputs, outputs)?;
        let bias = m.tensor(&format!("{name}.bias"), &[outputs], Role::Bias)?;
        Ok::<_, ModelError>(m.layer(weight, Some(bias)))
    };
    let mut blocks = Vec::with_capacity(c.num_layers);
    for (i, (attention_norm, mlp_norm)) in norms.into_iter().enumerate() {
        let p = format!("{prefix}h.{i}");
        blocks.push(Block {
            spec: LayerSpec::new(i, c),
            attention_norm,
            attention: Attention {
                qkv: conv1d(m, &format!("{p}.attn.c_attn"), hidden, 3 * hidden)?,
                qk_norms: None,
                output: conv1d(m, &format!("{p}.attn.c_proj"), hidden, hidden)?,
            },
            attention_post_norm: None,
            mlp_post_norm: None,
            mlp_norm,
            mlp: Mlp::Gelu {
                fc: conv1d(m, &format!("{p}.mlp.c_fc"), hidden, c.intermediate_size)?,
                proj: conv1d(m, &format!("{p}.mlp.c_proj"), c.intermediate_size, hidden)?,
            },
        });
    }
    let (token_embedding, lm_head) =
        m.embedding(&format!("{prefix}wte.weight"), c.vocab_size, hidden, None)?;
    let wpe = m.tensor(
        &format!("{prefix}wpe.weight"),
        &[c.max_positions, hidden],
        Role::Matrix,
    )?;
    Ok(Parts {
        blocks,
        token_embedding,
        positions: PositionEncoding::Learned(upload(wpe, device)),
        final_norm,
        lm_head,
    })
}

fn build_llama<B: Backend>(c: &ModelConfig, m: &mut Matrices<'_, B>) -> Result<Parts<B>> {
    let hidden = c.hidden_size;
    let device = m.device;
    let rope = c.rope.clone().ok_or_else(|| {
        ModelError::config(&c.model_type, "a Llama-family model needs rope settings")
    })?;
    let variations = &c.variations;
    // An RMSNorm over `width` values; Gemma's checkpoints store `w` for a scale of `1 + w`.
    let rms_of = |m: &mut Matrices<'_, B>, name: &str, width: usize| -> Result<Norm<B>> {
        let mut weight = m.tensor(name, &[width], Role::NormWeight)?;
        if variations.norm_weight_offset != 0.0 {
            weight
                .data
                .iter_mut()
                .for_each(|w| *w += variations.norm_weight_offset);
        }
        Ok(Norm::Rms {
            weight: upload(weight, device),
            eps: c.norm_eps,
        })
    };
    let rms = |m: &mut Matrices<'_, B>, name: &str| rms_of(m, name, hidden);
    // Per layer: the norm before attention, the one before the MLP and, with sandwich norms,
    // those after each (Gemma names the one before the MLP `pre_feedforward_layernorm` and
    // uses `post_attention_layernorm` for the one after attention).
    let mut norms = Vec::new();
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let input = rms(m, &format!("{p}.input_layernorm.weight"))?;
        norms.push(if variations.sandwich_norms {
            (
                input,
                rms(m, &format!("{p}.pre_feedforward_layernorm.weight"))?,
                Some(rms(m, &format!("{p}.post_attention_layernorm.weight"))?),
                Some(rms(m, &format!("{p}.post_feedforward_layernorm.weight"))?),
            )
        } else {
            (
                input,
                rms(m, &format!("{p}.post_attention_layernorm.weight"))?,
                None,
                None,
            )
        });
    }
    let final_norm = rms(m, "model.norm.weight")?;
    // One projection: its weight and, if the model has them, its bias.
    let linear = |m: &mut Matrices<'_, B>,
                  name: &str,
                  inputs: usize,
                  outputs: usize,
                  bias: bool|
     -> Result<(Projection, Option<HostTensor>)> {
        let weight = m.linear(&format!("{name}.weight"), inputs, outputs)?;
        let bias = if bias {
            Some(m.tensor(&format!("{name}.bias"), &[outputs], Role::Bias)?)
        } else {
            None
        };
        Ok((weight, bias))
    };
    let (q_out, kv_out) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut blocks = Vec::with_capacity(c.num_layers);
    for (i, (attention_norm, mlp_norm, attention_post_norm, mlp_post_norm)) in
        norms.into_iter().enumerate()
    {
        let p = format!("model.layers.{i}");
        let qk_norms = match variations.qk_norm {
            true => Some((
                rms_of(m, &format!("{p}.self_attn.q_norm.weight"), c.head_dim)?,
                rms_of(m, &format!("{p}.self_attn.k_norm.weight"), c.head_dim)?,
            )),
            false => None,
        };
        // Q/K/V: three matrices fused here, or one as the file stores it (Phi-3).
        let (qkv, qkv_bias) = if variations.fused_projections {
            linear(
                m,
                &format!("{p}.self_attn.qkv_proj"),
                hidden,
                q_out + 2 * kv_out,
                c.qkv_bias,
            )?
        } else {
            let (q, q_bias) = linear(
                m,
                &format!("{p}.self_attn.q_proj"),
                hidden,
                q_out,
                c.qkv_bias,
            )?;
            let (k, k_bias) = linear(
                m,
                &format!("{p}.self_attn.k_proj"),
                hidden,
                kv_out,
                c.qkv_bias,
            )?;
            let (v, v_bias) = linear(
                m,
                &format!("{p}.self_attn.v_proj"),
                hidden,
                kv_out,
                c.qkv_bias,
            )?;
            let bias = match (q_bias, k_bias, v_bias) {
                (Some(q), Some(k), Some(v)) => Some(HostTensor::concat(&[q, k, v])),
                _ => None,
            };
            (m.fuse(vec![q, k, v], &format!("{p}.self_attn.qkv"))?, bias)
        };
        let (o, o_bias) = linear(
            m,
            &format!("{p}.self_attn.o_proj"),
            q_out,
            hidden,
            c.dense_bias,
        )?;
        // Gate and up: fused here, or one matrix as the file stores it (Phi-3).
        let (gate_up, gate_up_bias) = if variations.fused_projections {
            linear(
                m,
                &format!("{p}.mlp.gate_up_proj"),
                hidden,
                2 * c.intermediate_size,
                c.dense_bias,
            )?
        } else {
            let (gate, gate_bias) = linear(
                m,
                &format!("{p}.mlp.gate_proj"),
                hidden,
                c.intermediate_size,
                c.dense_bias,
            )?;
            let (up, up_bias) = linear(
                m,
                &format!("{p}.mlp.up_proj"),
                hidden,
                c.intermediate_size,
                c.dense_bias,
            )?;
            let bias = match (gate_bias, up_bias) {
                (Some(g), Some(u)) => Some(HostTensor::concat(&[g, u])),
                _ => None,
            };
            (m.fuse(vec![gate, up], &format!("{p}.mlp.gate_up"))?, bias)
        };
        let (down, down_bias) = linear(
            m,
            &format!("{p}.mlp.down_proj"),
            c.intermediate_size,
            hidden,
            c.dense_bias,
        )?;
        blocks.push(Block {
            spec: LayerSpec::new(i, c),
            attention_norm,
            attention: Attention {
                qkv: m.layer(qkv, qkv_bias),
                qk_norms,
                output: m.layer(o, o_bias),
            },
            attention_post_norm,
            mlp_norm,
            mlp: Mlp::Gated {
                gate_up: m.layer(gate_up, gate_up_bias),
                down: m.layer(down, down_bias),
                activation: variations.activation,
            },
            mlp_post_norm,
        });
    }
    let head = (!c.tie_word_embeddings).then_some("lm_head.weight");
    let (token_embedding, lm_head) =
        m.embedding("model.embed_tokens.weight", c.vocab_size, hidden, head)?;
    let rotary = RotaryTable::from_inv_freq(rotary_inv_freq(c, &rope), device)?;
    let local = match &variations.local_rope {
        Some(local) => Some(RotaryTable::from_inv_freq(
            rotary_inv_freq(c, local),
            device,
        )?),
        None => None,
    };
    Ok(Parts {
        blocks,
        token_embedding,
        positions: PositionEncoding::Rotary(rotary, local),
        final_norm,
        lm_head,
    })
}

/// The `head_dim / 2` inverse frequencies of a rotary table for `rope`: those of the rotated
/// channels, then zeros (angle 0: cosine 1, sine 0) for the channels partial rotary passes
/// through, in the layout [`lay_out_partial_rotary`] gives the heads.
fn rotary_inv_freq(c: &ModelConfig, rope: &crate::config::RopeConfig) -> Vec<f32> {
    let mut inv_freq = rope.inv_freq(c.rotary_dim());
    inv_freq.resize(c.head_dim / 2, 0.0);
    inv_freq
}

/// Where each channel of a head goes when rotary covers only its first `rotary` channels:
/// `[rot_a, pass_a, rot_b, pass_b]` (each rotated half, then half of the passed channels),
/// so that the rotate-half table pairs channel `i` with `i + head_dim / 2` as transformers
/// pairs `i` with `i + rotary / 2`, and the passed channels pair with each other at angle 0.
/// Entry `i` is the stored channel that lands at `i`.
fn partial_rotary_order(head_dim: usize, rotary: usize) -> Vec<usize> {
    let (rot, pass) = (rotary / 2, (head_dim - rotary) / 2);
    let half = |first_rot: usize, first_pass: usize| {
        (first_rot..first_rot + rot).chain(first_pass..first_pass + pass)
    };
    half(0, rotary).chain(half(rot, rotary + pass)).collect()
}

/// Partial rotary (Phi-4-mini) run as full rotary: every head's query and key channels are
/// reordered at load ([`partial_rotary_order`]) in the Q and K projections, their biases and
/// their norms. Scores are sums over channels, so the same order on queries and keys leaves
/// them unchanged, and values (the attention's output) are not touched: every attention
/// path, cache and rotation runs as it does for a fully rotated model, at no cost per token.
fn lay_out_partial_rotary(c: &ModelConfig, weights: &mut Weights, rotary: usize) -> Result<()> {
    let order = partial_rotary_order(c.head_dim, rotary);
    let heads = |count: usize, offset: usize| -> Vec<usize> {
        (0..count)
            .flat_map(|h| order.iter().map(move |&j| offset + h * c.head_dim + j))
            .collect()
    };
    let (q_rows, kv_rows) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut permute = |name: String, order: &[usize], required: bool| -> Result<()> {
        match weights.contains(&name) || required {
            true => weights.permute_rows(&name, order),
            false => Ok(()),
        }
    };
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}.self_attn");
        if c.variations.fused_projections {
            // Q's rows, then K's, then V's (unchanged).
            let mut fused = heads(c.num_heads, 0);
            fused.extend(heads(c.num_kv_heads, q_rows));
            fused.extend(q_rows + kv_rows..q_rows + 2 * kv_rows);
            permute(format!("{p}.qkv_proj.weight"), &fused, true)?;
            permute(format!("{p}.qkv_proj.bias"), &fused, false)?;
        } else {
            let (q, k) = (heads(c.num_heads, 0), heads(c.num_kv_heads, 0));
            permute(format!("{p}.q_proj.weight"), &q, true)?;
            permute(format!("{p}.q_proj.bias"), &q, false)?;
            permute(format!("{p}.k_proj.weight"), &k, true)?;
            permute(format!("{p}.k_proj.bias"), &k, false)?;
        }
        if c.variations.qk_norm {
            permute(format!("{p}.q_norm.weight"), &order, true)?;
            permute(format!("{p}.k_norm.weight"), &order, true)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::partial_rotary_order;

    #[test]
    fn partial_rotary_pairs_the_rotated_channels_across_the_halves() {
        // Heads of 8, rotary on 4: rotated pairs (0, 2) and (1, 3); passed 4..8.
        let order = partial_rotary_order(8, 4);
        assert_eq!(order, [0, 1, 4, 5, 2, 3, 6, 7]);
        // Channel i pairs with i + 4: rotated with rotated as transformers pairs them.
        for i in 0..2 {
            assert_eq!(order[i + 4], order[i] + 2);
        }
        assert_eq!(partial_rotary_order(6, 6), [0, 1, 2, 3, 4, 5]);
    }
}
