#!/usr/bin/env python3
"""Writes a Hugging Face model directory with random weights for a config.json, so that
kv-cache and transformers can be timed on the same weights of a real model's shape where the
real weights are not at hand (a GPU machine without network, say).

    python3 kv-bench/peers/random_model.py kv-bench/configs/smollm2-135m-instruct.json OUT_DIR

OUT_DIR receives config.json and model.safetensors (f32; 538 MB for SmolLM2-135M). Weights are
drawn the way transformers initialises a fresh model (normal, std = initializer_range), seeded.
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a config.json")
    parser.add_argument("out", help="the model directory to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.out, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"random {config.model_type} model, {params:,} parameters, written to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
