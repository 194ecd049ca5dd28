"""The per-run result every peer script of `kv-bench compare` prints, in kv-bench's schema."""


def run_result(prefill_s, step_ms, generated_ids):
    """One timed generation: the prompt pass (seconds), every decode step (milliseconds) and
    the tokens generated."""
    decode = sum(step_ms) / 1e3
    return {
        "total_s": prefill_s + decode,
        "prefill_ms": prefill_s * 1e3,
        "decode_s": decode,
        "step_ms": step_ms,
        "generated": len(generated_ids),
        "generated_ids": generated_ids,
        "cache_bytes": None,
    }
