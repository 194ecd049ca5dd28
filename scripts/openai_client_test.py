#!/usr/bin/env python3
"""kv-serve through the official `openai` Python client, end to end.

Run by scripts/openai-client-test.sh, which builds the binaries and installs the client into a
virtual environment:

    python3 scripts/openai_client_test.py --kv-serve BIN --kv-generate BIN --model GGUF \
        [--real-model GGUF]

With the tiny GGUF fixture (and a chat template written for its vocabulary) it checks chat and
completions, whole and streamed, with `n`, stop strings, log-probabilities and the usage chunk;
that greedy output through the server equals `kv-generate`'s for the same prompt ids; and that
the client sees OpenAI's error types for bad requests. With `--real-model` (SmolLM2) it checks
that a streamed reply containing multi-byte characters (CJK, emoji) concatenates to the whole
reply.
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
from openai import OpenAI
import yaml
from prometheus_client.parser import text_string_to_metric_families

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Remote:
    """A server already running at `url` (replicas behind a load balancer)."""

    def __init__(self, url):
        self.url = url
        self.client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def stop(self):
        pass


class Server:
    """A kv-serve process on a free loopback port."""

    def __init__(self, binary, model, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [binary, "--model", model, "--port", str(self.port), *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        while True:
            if self.process.poll() is not None:
                self.fail("kv-serve exited before it was healthy")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.fail("kv-serve was not healthy within 300 s")
            time.sleep(0.1)
        self.client = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def fail(self, message):
        self.log.seek(0)
        sys.exit(f"{message}; its output:\n{self.log.read().decode(errors='replace')}")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


def check(condition, message):
    if not condition:
        sys.exit(f"FAILED: {message}")
    print(f"ok: {message}")


def streamed_chat(client, **kwargs):
    """Each choice's concatenated deltas, finish reasons, and the usage chunk."""
    texts, finishes, usage, roles = {}, {}, None, set()
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
            check(chunk.choices == [], "the usage chunk has no choices")
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            texts.setdefault(choice.index, "")
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage, roles


def tiny_model_checks(args, template_path):
    if args.url:
        server = Remote(args.url)
    else:
        server = Server(
            args.kv_serve, args.model, "--chat-template", template_path,
            "--served-model-name", "tiny", "--block-size", "4", "--pool-tokens", "2048",
        )
    client = server.client
    try:
        models = client.models.list()
        check([m.id for m in models.data] == ["tiny"], "/v1/models lists the served model")

        # Greedy through the server equals kv-generate's output for the same prompt ids.
        generated = subprocess.run(
            [args.kv_generate, "--model", args.model, "--prompt-ids", "5,17,42,8",
             "--max-new-tokens", "12", "--json"],
            check=True, capture_output=True, text=True,
        )
        expected = json.loads(generated.stdout)
        reply = client.completions.create(
            model="tiny", prompt=[5, 17, 42, 8], max_tokens=12, temperature=0
        )
        check(reply.choices[0].text == expected["text"],
              "greedy completion equals kv-generate's text")
        check(reply.usage.completion_tokens == len(expected["generated_ids"]),
              "usage counts kv-generate's tokens")

        # Chat, whole and streamed, with n and the usage chunk.
        messages = [{"role": "user", "content": "Tell!"}]
        whole = client.chat.completions.create(
            model="tiny", messages=messages, n=2, seed=3, max_tokens=20,
            extra_body={"ignore_eos": True},
        )
        check(len(whole.choices) == 2, "n=2 gives two choices")
        texts, finishes, usage, roles = streamed_chat(
            client, model="tiny", messages=messages, n=2, seed=3, max_tokens=20,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        check(roles == {0, 1}, "each streamed choice opens with the assistant role")
        check(all(texts[c.index] == c.message.content for c in whole.choices),
              "streamed chat concatenates to the whole reply, choice by choice")
        check(finishes == {0: "length", 1: "length"}, "each choice ends with its finish reason")
        check(usage is not None and usage.completion_tokens == 40
              and usage.prompt_tokens == whole.usage.prompt_tokens,
              "the usage chunk counts both choices")

        # Stop strings end the text before them.
        text = whole.choices[0].message.content
        stop = text[len(text) // 2: len(text) // 2 + 2]
        stopped = client.chat.completions.create(
            model="tiny", messages=messages, seed=3, max_tokens=20, stop=[stop],
            extra_body={"ignore_eos": True},
        )
        check(stopped.choices[0].message.content == text[: text.find(stop)]
              and stopped.choices[0].finish_reason == "stop",
              "a stop string ends the reply before it")

        # Log-probabilities, chat and completions.
        lp = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True,
            top_logprobs=3, extra_body={"ignore_eos": True},
        )
        content = lp.choices[0].logprobs.content
        check(len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
              and all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content),
              "chat log-probabilities: greedy tokens are their positions' most likely")
        comp = client.completions.create(
            model="tiny", prompt="Once", max_tokens=5, temperature=0, logprobs=2,
            extra_body={"ignore_eos": True},
        )
        check(len(comp.choices[0].logprobs.tokens) == 5, "completion log-probabilities")

        # Streamed completions.
        chunks = list(client.completions.create(
            model="tiny", prompt="Once", max_tokens=8, seed=9, stream=True,
            extra_body={"ignore_eos": True},
        ))
        whole_completion = client.completions.create(
            model="tiny", prompt="Once", max_tokens=8, seed=9, extra_body={"ignore_eos": True}
        )
        check("".join(c.choices[0].text for c in chunks if c.choices)
              == whole_completion.choices[0].text,
              "streamed completion concatenates to the whole one")

        # The metrics parse with Prometheus's own text parser and carry the names an inference
        # gateway's endpoint picker scrapes (vLLM's).
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        for name in ["vllm:num_requests_waiting", "vllm:num_requests_running",
                     "vllm:kv_cache_usage_perc"]:
            samples = families[name].samples if name in families else []
            check(any(s.labels.get("model_name") == "tiny" and s.value >= 0 for s in samples),
                  f"{name} is a gauge labelled with the model")
        usage = [s.value for s in families["vllm:kv_cache_usage_perc"].samples]
        check(all(0.0 <= v <= 1.0 for v in usage), "vllm:kv_cache_usage_perc is a share")
        config = families["vllm:cache_config_info"].samples
        check(config and config[0].labels["block_size"] == "4"
              and int(config[0].labels["num_gpu_blocks"]) > 0,
              "vllm:cache_config_info names the block size and the blocks")
        check("kv_serve_generation_tokens" in families, "kv-serve's own series stay")

        # The render routes give the ids the model is fed: a chat's prompt (as many as its
        # usage counts), and completions prompts, token ids kept as given.
        def post(path, body):
            request = urllib.request.Request(
                server.url + path, data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as r:
                return json.loads(r.read())
        chat_messages = [{"role": "user", "content": "Hi there"}]
        rendered = post("/v1/chat/completions/render", {"model": "tiny", "messages": chat_messages})
        reply = client.chat.completions.create(
            model="tiny", messages=chat_messages, max_tokens=2, temperature=0)
        check(len(rendered["token_ids"]) == reply.usage.prompt_tokens,
              "chat render gives the prompt the chat counts")
        rendered = post("/v1/completions/render", {"model": "tiny", "prompt": [[5, 17], [42]]})
        check(rendered == [{"token_ids": [5, 17]}, {"token_ids": [42]}],
              "completions render keeps token-id prompts")

        # Errors arrive as the client's exception types.
        for kwargs, kind, what in [
            ({"model": "gpt-4"}, openai.NotFoundError, "an unknown model is 404"),
            ({"temperature": 5}, openai.BadRequestError, "temperature 5 is 400"),
            ({"max_tokens": 0}, openai.BadRequestError, "max_tokens 0 is 400"),
            ({"messages": []}, openai.BadRequestError, "empty messages are 400"),
        ]:
            request = {"model": "tiny", "messages": messages, **kwargs}
            try:
                client.chat.completions.create(**request)
                check(False, what)
            except kind as e:
                check(e.status_code in (400, 404), what)
        check(client.models.list().data[0].id == "tiny", "the server still answers")
    finally:
        server.stop()
    if args.url:
        return

    # An API key.
    keyed = Server(args.kv_serve, args.model, "--served-model-name", "tiny",
                   "--api-key", "sesame")
    try:
        try:
            keyed.client.models.list()
            check(False, "a wrong key is refused")
        except openai.AuthenticationError:
            check(True, "a wrong key is refused")
        good = OpenAI(base_url=keyed.url + "/v1", api_key="sesame", max_retries=0)
        check(good.models.list().data[0].id == "tiny", "the right key is accepted")
    finally:
        keyed.stop()


def deployment_checks(args):
    """deploy/kubernetes agrees with kv-serve: its container's arguments start a server (with
    the tiny fixture in place of the image's model), whose metrics name the block size the
    endpoint picker's prefix-cache scorer hashes by, on the port the InferencePool targets."""
    folder = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
    docs = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    container = docs[("Deployment", "kv-serve")]["spec"]["template"]["spec"]["containers"][0]
    pool = docs[("InferencePool", "kv-serve")]["spec"]
    check(pool["targetPorts"][0]["number"] == container["ports"][0]["containerPort"] == 8000,
          "the InferencePool targets the container's port")
    check(pool["selector"]["matchLabels"]
          == docs[("Deployment", "kv-serve")]["spec"]["template"]["metadata"]["labels"],
          "the InferencePool selects the kv-serve pods")
    picker = yaml.safe_load(docs[("ConfigMap", "kv-serve-epp")]["data"]["kv-serve-plugins.yaml"])
    prefix = next(p for p in picker["plugins"] if p["type"] == "prefix-cache-scorer")
    server = Server(args.kv_serve, args.model, *container["args"])
    try:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        config = families["vllm:cache_config_info"].samples[0].labels
        check(int(config["block_size"]) == prefix["parameters"]["blockSize"],
              "the deployment's block size is the one the picker hashes prompts by")
        check(server.client.models.list().data[0].id == "smollm2",
              "the deployment's served model name is what /v1/models lists")
    finally:
        server.stop()


def real_model_checks(args):
    server = Server(args.kv_serve, args.real_model, "--pool-tokens", "4096")
    client = server.client
    try:
        model = client.models.list().data[0].id
        # Greedy replies known to hold CJK characters and emoji (four-byte UTF-8, split over
        # several tokens each).
        for prompt in ["Translate to Chinese: Good morning", "Copy this text: 🚀✨ Rust 🦀"]:
            kwargs = dict(model=model, messages=[{"role": "user", "content": prompt}],
                          max_tokens=24, temperature=0)
            whole = client.chat.completions.create(**kwargs).choices[0].message.content
            texts, _, _, _ = streamed_chat(client, **kwargs)
            check(any(ord(ch) > 0x2E80 for ch in whole),
                  f"SmolLM2's reply holds CJK or emoji: {whole!r}")
            check(texts[0] == whole, "its streamed reply concatenates to the whole one")
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kv-serve", required=True)
    parser.add_argument("--kv-generate", required=True)
    parser.add_argument("--model", required=True, help="the tiny GGUF fixture")
    parser.add_argument("--real-model", help="SmolLM2's GGUF, for multi-byte streaming")
    parser.add_argument("--url", help="test a running server serving the tiny fixture as `tiny` "
                        "(with the template above) instead of starting one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        template = Path(folder) / "template.jinja"
        template.write_text(TEMPLATE)
        tiny_model_checks(args, str(template))
    if not args.url:
        deployment_checks(args)
    if args.real_model:
        real_model_checks(args)
    print("all openai client checks passed")


if __name__ == "__main__":
    main()
