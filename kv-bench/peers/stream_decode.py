#!/usr/bin/env python3
"""Decode speed of one streamed chat request against any OpenAI-compatible server (kv-serve,
llama-server), as a client sees it: tokens after the first over the time from the first
streamed content to the last. Greedy (temperature 0), so two servers of the same model give
comparable answers; the answer's text is printed so the runs can be checked alike.

    stream_decode.py --url http://127.0.0.1:8080 --prompt-file quote.txt --max-tokens 200 --rounds 3

Prints one JSON line per round: completion tokens, decode tokens/s, and the text's SHA-256.
Standard library only.
"""

import argparse
import hashlib
import http.client
import json
import time
import urllib.parse


def stream_once(url: str, prompt: str, max_tokens: int) -> dict:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    if response.status != 200:
        raise SystemExit(f"{url}: HTTP {response.status}: {response.read()[:300]!r}")
    first = last = None
    text = []
    usage = None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            content = choice.get("delta", {}).get("content")
            if content:
                now = time.perf_counter()
                first = first or now
                last = now
                text.append(content)
    connection.close()
    tokens = usage["completion_tokens"] if usage else None
    decode = (last - first) if first is not None else 0.0
    joined = "".join(text)
    return {
        "completion_tokens": tokens,
        "decode_tokens_per_s": (tokens - 1) / decode if tokens and decode > 0 else None,
        "text_sha256": hashlib.sha256(joined.encode()).hexdigest()[:16],
        "text_start": joined[:60],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--prompt-file", required=True)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    prompt = open(args.prompt_file, encoding="utf-8").read().strip()
    for _ in range(args.rounds):
        print(json.dumps(stream_once(args.url, prompt, args.max_tokens)), flush=True)


if __name__ == "__main__":
    main()
