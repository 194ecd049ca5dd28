#!/usr/bin/env python3
"""The Hugging Face transformers peer of `kv-bench compare`: the same model, prompt ids and
token count, greedy, EOS ignored, f32 on the CPU (or a CUDA GPU), with a DynamicCache or with
none. Prints one JSON object in the schema of kv-bench's per-run results. A short untimed
generation runs first, so one-time set-up (lazy initialisation, CUDA context and kernel loading)
stays out of the numbers, as kv-bench's own warm-up runs keep it out of ours.

    OMP_WAIT_POLICY=PASSIVE python3 kv-bench/peers/hf_transformers.py \
        --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --prompt-ids 1,2,3 --new-tokens 64 \
        --cache dynamic|none [--threads 2] [--device cpu|cuda]

Set-up: a virtual environment with `pip install torch transformers gguf accelerate` (PyPI).
On a machine whose cores are shared, set OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP threads
otherwise spin while waiting and run about 10x slower.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402
from peer_result import run_result  # noqa: E402


def load(model_path, device):
    path = Path(model_path)
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.to(device)


def sync(device):
    """Waits for queued GPU work, so host clocks time finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run(model, ids, new_tokens, cache_kind):
    """One greedy generation: prefill time, then the time of every decode step. Reading each
    token back to the host (`int(token)`) waits for the GPU, as kv-bench's loop does."""
    step_ms = []
    generated = []
    sync(ids.device)
    start = time.perf_counter()
    if cache_kind == "none":
        sequence = ids
        logits = model(sequence, use_cache=False).logits[:, -1]
    else:
        cache = DynamicCache()
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    prefill = time.perf_counter() - start
    for step in range(new_tokens):
        step_start = time.perf_counter()
        token = logits.argmax(-1, keepdim=True)
        generated.append(int(token))
        if step + 1 == new_tokens:
            break
        if cache_kind == "none":
            sequence = torch.cat([sequence, token], dim=1)
            logits = model(sequence, use_cache=False).logits[:, -1]
        else:
            logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
        step_ms.append((time.perf_counter() - step_start) * 1e3)
    return run_result(prefill, step_ms, generated)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face directory or a .gguf file")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--cache", choices=["dynamic", "none"], default="dynamic")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="untimed generation first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load(args.model, device)
    model.eval()
    ids = torch.tensor([[int(i) for i in args.prompt_ids.split(",") if i]], device=device)
    if args.warmup_tokens > 0:
        run(model, ids, args.warmup_tokens, args.cache)
    result = run(model, ids, args.new_tokens, args.cache)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    result["system"] = f"transformers {transformers.__version__} (torch {torch.__version__}, {where})"
    result["cache"] = args.cache
    print(json.dumps(result))


if __name__ == "__main__":
    main()
