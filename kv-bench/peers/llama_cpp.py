#!/usr/bin/env python3
"""The llama.cpp peer of `kv-bench compare --peer llama-cpp`: the same GGUF file as it is
stored, prompt ids and token count, greedy, EOS ignored, on the CPU with llama.cpp's own KV
cache (it has no run without one). Prints one JSON object in the schema of kv-bench's per-run
results, with the time of every decode step. A short untimed generation runs first, as
kv-bench's own warm-up runs.

    kv-bench/peers/llama_cpp.sh build     # once: libllama and the Python bindings' sources
    python3 kv-bench/peers/llama_cpp.py --model FILE.gguf --prompt-ids 1,2,3 \
        --new-tokens 64 [--threads 2]

It drives llama.cpp through the ctypes bindings of the llama-cpp-python sdist that
`llama_cpp.sh build` unpacks (found through LLAMA_CPP_PYTHON, by default in the kv-cache
cache folder) and the libllama that script builds (LLAMA_CPP_LIB_PATH), so the library and
its bindings come from one release. The prompt goes through `Llama.eval`; a step is an argmax
over the last logits in numpy and one `llama_decode` of the chosen token, which Python
lengthens by some tens of microseconds out of several milliseconds (counted against
llama.cpp here). LLAMA_REPACK=0 turns off llama.cpp's weight repacking, as llama-bench's
`--repack 0`.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("KV_CACHE_DIR", Path.home() / ".cache" / "kv-cache"))
SDIST = Path(os.environ.get("LLAMA_CPP_PYTHON", CACHE / "llama.cpp" / "llama_cpp_python-0.3.36"))
os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(SDIST / "vendor" / "llama.cpp" / "build" / "bin"))
sys.path.insert(0, str(SDIST))

import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402
from peer_result import run_result  # noqa: E402


def last_logits(llm):
    """The logits of the last token evaluated (the only row llama.cpp computes here)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def run(llm, ids, new_tokens):
    """One greedy generation: prefill time, then the time of every decode step."""
    llm.reset()  # the next eval drops every cached position
    step_ms = []
    generated = []
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    for step in range(new_tokens):
        step_start = time.perf_counter()
        token = int(np.argmax(last_logits(llm)))
        generated.append(token)
        if step + 1 == new_tokens:
            break
        # One token through llama_decode directly (Llama.eval's bookkeeping costs about
        # 0.3 ms a step); llama.cpp places it after the positions its cache holds.
        one = (llama_cpp.llama_token * 1)(token)
        if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
            raise RuntimeError(f"llama_decode failed at step {step}")
        step_ms.append((time.perf_counter() - step_start) * 1e3)
    return run_result(prefill, step_ms, generated)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a .gguf file")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--cache", choices=["dynamic"], default="dynamic",
                        help="llama.cpp always decodes through its own cache")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", choices=["cpu"], default="cpu")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="untimed generation first")
    args = parser.parse_args()
    ids = [int(i) for i in args.prompt_ids.split(",") if i]
    if os.environ.get("LLAMA_REPACK", "1") == "0":
        # As llama-bench's `--repack 0`: no extra buffer types, so no weight repacking (its
        # AMX kernels fault on some machines whose CPU reports AMX).
        bindings = llama_cpp.llama_cpp  # the ctypes module `Llama` takes its defaults from
        defaults = bindings.llama_model_default_params

        def without_repacking():
            params = defaults()
            params.use_extra_bufts = False
            return params

        bindings.llama_model_default_params = without_repacking
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=len(ids) + args.new_tokens + 8,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=0,
        verbose=False,
    )
    if args.warmup_tokens > 0:
        run(llm, ids, args.warmup_tokens)
    result = run(llm, ids, args.new_tokens)
    result["system"] = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, {args.threads} threads)"
    result["cache"] = args.cache
    print(json.dumps(result))


if __name__ == "__main__":
    main()
