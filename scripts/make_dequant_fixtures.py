#!/usr/bin/env python3
"""Writes kv-model/tests/fixtures/dequant.json: random raw blocks of every GGUF storage type
kv-cache reads, with the values gguf-py (the `gguf` package from PyPI, llama.cpp's own Python
library) dequantizes them to. kv-kernels' and kv-model's tests read each type's bytes and
compare.

Run by hand from the repository root, with numpy and gguf installed:

    python3 scripts/make_dequant_fixtures.py

(scripts/make_fixtures.py runs it too.)
"""

import json
from pathlib import Path

import numpy as np

FIXTURES = Path("kv-model/tests/fixtures")

# Byte offsets of each block's f16 fields (scales and minimums), rewritten with real halves
# of modest size so that every value is finite; every other byte stays random.
HALF_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
}


def make_dequant():
    """Random raw blocks of each kind, and gguf-py's dequantization of them."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    print("dequant.json")
    rng = np.random.default_rng(7)
    cases = {}
    for name in ["F16", "BF16", *HALF_FIELDS]:
        kind = T[name]
        block_size, type_size = GGML_QUANT_SIZES[kind]
        blocks = 2
        if name in ("F16", "BF16"):
            values = rng.uniform(-4, 4, size=blocks * block_size).astype(np.float32)
            if name == "F16":
                raw = np.frombuffer(values.astype(np.float16).tobytes(), dtype=np.uint8)
            else:
                raw = np.frombuffer(
                    (values.view(np.uint32) >> 16).astype(np.uint16).tobytes(), dtype=np.uint8
                )
        else:
            raw = rng.integers(0, 256, size=blocks * type_size, dtype=np.uint8)
            for b in range(blocks):
                for offset in HALF_FIELDS[name]:
                    at = b * type_size + offset
                    half = np.array([rng.uniform(-0.1, 0.1)], dtype=np.float16)
                    raw[at : at + 2] = np.frombuffer(half.tobytes(), dtype=np.uint8)
        values = quants.dequantize(raw.reshape(1, -1), kind).reshape(-1)
        assert np.all(np.isfinite(values)), name
        cases[name] = {
            "elements": int(values.size),
            "raw_hex": bytes(raw).hex(),
            "values": [float(v) for v in values],
        }
    path = FIXTURES / "dequant.json"
    path.write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    make_dequant()
