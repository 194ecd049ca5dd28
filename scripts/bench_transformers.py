#!/usr/bin/env python3
"""Times Hugging Face transformers on the same model and prompt as `kv-generate`, as the peer
that benchmarks compare against. Prints one JSON object like `kv-generate --json`'s timings.

    OMP_WAIT_POLICY=PASSIVE python3 scripts/bench_transformers.py \
        --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is KV caching?" --chat \
        --max-new-tokens 64 [--no-kv-cache] [--threads 2]

Greedy decoding of exactly --max-new-tokens tokens (EOS ignored), in f32 (transformers
dequantizes the GGUF), prefill timed separately from decode as kv-generate does.
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-kv-cache", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = Path(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    results = []
    for _ in range(args.runs):
        generated = []
        start = time.perf_counter()
        if args.no_kv_cache:
            sequence = ids
            logits = model(sequence, use_cache=False).logits[:, -1]
        else:
            cache = DynamicCache()
            logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(args.max_new_tokens):
            token = logits.argmax(-1, keepdim=True)
            generated.append(int(token))
            if step + 1 == args.max_new_tokens:
                break
            if args.no_kv_cache:
                sequence = torch.cat([sequence, token], dim=1)
                logits = model(sequence, use_cache=False).logits[:, -1]
            else:
                logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
        decode = time.perf_counter() - start
        results.append((prefill, decode, generated))

    prefill, decode, generated = min(results, key=lambda r: r[1])
    print(
        json.dumps(
            {
                "peer": f"transformers {__import__('transformers').__version__} / torch {torch.__version__}",
                "threads": args.threads,
                "cache": "none" if args.no_kv_cache else "dynamic",
                "prompt_tokens": ids.shape[1],
                "generated_ids": generated,
                "timings": {
                    "prefill_ms": prefill * 1e3,
                    "decode_ms": decode * 1e3,
                    "tokens_per_s": (len(generated) - 1) / decode if decode > 0 else 0.0,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
