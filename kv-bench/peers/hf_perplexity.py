#!/usr/bin/env python3
"""transformers' perplexity over exactly the token ids `kv-bench perplexity` scored, beside
kv-bench's own: the reference check of the f32 mode (the two should agree within 0.5%).

    kv-bench perplexity --weights f32 --kl-base none --tokens 2048 --chunk 512 --json ppl.json
    python3 kv-bench/peers/hf_perplexity.py --scored ppl.json

It reads the model path and the ids from kv-bench's JSON, runs the model once over all of them
in f32 on the CPU (transformers widens a GGUF's blocks to f32 as it loads, the values
kv-cache's f32 mode holds), and takes the mean negative log-likelihood of tokens 2..N given
their prefixes, as kv-bench does. Prints one line of JSON. Set-up as for hf_transformers.py.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from hf_transformers import load  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scored", required=True, help="kv-bench perplexity's --json output")
    parser.add_argument("--model", help="the model, if not the one the JSON names")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    scored = json.loads(Path(args.scored).read_text())
    ids = scored["token_ids"]
    ours = scored["runs"][0]
    torch.set_num_threads(args.threads)
    model = load(args.model or scored["model"], torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="mean")
    theirs = math.exp(float(nll))
    print(json.dumps({
        "system": f"transformers {transformers.__version__} (torch {torch.__version__})",
        "tokens": len(ids) - 1,
        "perplexity": theirs,
        "mean_nll": float(nll),
        "kv_cache": {"weights": ours["weights"], "perplexity": ours["perplexity"]},
        "relative_difference": ours["perplexity"] / theirs - 1.0,
    }))


if __name__ == "__main__":
    main()
