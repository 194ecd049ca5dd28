#!/usr/bin/env python3
"""kv-serve through the official `openai` Python client, end to end.

Run by scripts/openai-client-test.sh, which builds the binaries and installs the client into a
virtual environment:

    python3 scripts/openai_client_test.py --kv-serve BIN --kv-generate BIN --model GGUF \
        [--real-model GGUF]

With the tiny GGUF fixture (and a chat template written for its vocabulary) it checks chat and
completions, whole and streamed, with `n`, stop strings, log-probabilities and the usage chunk;
that greedy output through the server equals `kv-generate`'s for the same prompt ids; and that
the client sees OpenAI's error types for bad requests; that the Kubernetes manifests agree with
the server; and that kv-serve's KV events reach a pyzmq subscriber as vLLM publishes them
(frames, batches, stored, removed and cleared blocks, replay). With `--gemma3` it serves Gemma 3
(sliding-window layers in the paged pool) and checks its chat and its KV events. With
`--real-model` (SmolLM2) it checks
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
import msgpack
import yaml
import zmq
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

END_OF_REPLAY = b"\xff" * 8


def kv_events_checks(args):
    """kv-serve's KV events through pyzmq and msgpack, as a prefix-aware router reads them: a SUB
    socket the server connects to, vLLM's three frames (topic, sequence number, msgpack batch),
    BlockStored events whose token ids are the prompts sent, BlockRemoved only for blocks
    stored before, AllBlocksCleared after /reset_prefix_cache, and a replay that returns the
    batches published."""
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub_port = sub.bind_to_random_port("tcp://127.0.0.1")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    replay_port = free_port()
    block = 4
    # A pool of 16 blocks: the prompts below need more, so cached blocks get evicted.
    server = Server(
        args.kv_serve, args.model, "--served-model-name", "tiny", "--block-size", str(block),
        "--pool-tokens", "64", "--max-running", "2",
        "--kv-events", f"tcp://127.0.0.1:{sub_port}",
        "--kv-events-replay", f"tcp://*:{replay_port}",
        "--kv-events-topic", "kv@127.0.0.1@tiny",
    )
    topic = b"kv@127.0.0.1@tiny"
    live = []  # (sequence, payload)

    def receive(until):
        """Batches until `until(events so far)` holds, or 10 s pass."""
        deadline = time.time() + 10
        while time.time() < deadline:
            if sub.poll(100):
                frames = sub.recv_multipart()
                if len(frames) != 3 or frames[0] != topic:
                    sys.exit(f"FAILED: a KV events message is [topic, sequence, payload], "
                             f"not {frames!r}")
                live.append((int.from_bytes(frames[1], "big"), frames[2]))
            if until([e for _, p in live for e in msgpack.unpackb(p)[1]]):
                return True
        return False

    try:
        # The server connects to the SUB socket as it starts. libzmq attaches the connection,
        # and sends it the subscription, when this side next uses the socket: poll it for a
        # moment before the first event.
        deadline = time.time() + 1.0
        while time.time() < deadline:
            sub.poll(50)
        prompt = [5, 17, 42, 8, 9, 10, 11, 12, 13, 14]
        server.client.completions.create(model="tiny", prompt=prompt, max_tokens=3,
                                         temperature=0)
        stored_tokens = lambda events: [t for e in events if e[0] == "BlockStored" for t in e[3]]
        check(receive(lambda events: len(stored_tokens(events)) >= 8),
              "the prompt's full blocks are published as BlockStored")
        first = msgpack.unpackb(live[0][1])
        check(isinstance(first[0], float) and first[2] == 0,
              "a batch is [timestamp, events, data parallel rank 0]")
        stored = [e for _, p in live for e in msgpack.unpackb(p)[1] if e[0] == "BlockStored"]
        event = stored[0]
        check(event[2] is None and event[4] == block and event[3][:8] == prompt[:8]
              and len(event[3]) == block * len(event[1]) and event[6] in ("CPU", "GPU"),
              "BlockStored carries the prompt's tokens, block size, no parent for the first "
              "block, and the medium")
        # Many other prompts through a pool of 16 blocks evict the first prompt's blocks.
        for i in range(12):
            other = [(i * 7 + k) % 60 + 1 for k in range(13)]
            server.client.completions.create(model="tiny", prompt=other, max_tokens=2,
                                             temperature=0)
        check(receive(lambda events: any(e[0] == "BlockRemoved" for e in events)),
              "evicted blocks are published as BlockRemoved")
        with urllib.request.urlopen(urllib.request.Request(
                server.url + "/reset_prefix_cache", method="POST"), timeout=10) as r:
            check(r.status == 200, "POST /reset_prefix_cache answers 200")
        check(receive(lambda events: events and events[-1] == ["AllBlocksCleared"]),
              "a reset of the prefix cache is published as AllBlocksCleared")
        # What a router mirrors from the events alone: every removal names a block stored
        # before and still held, and no block is stored twice while held.
        held = set()
        for _, payload in live:
            for event in msgpack.unpackb(payload)[1]:
                if event[0] == "BlockStored":
                    for h in event[1]:
                        if h in held:
                            sys.exit(f"FAILED: block {h} stored twice while held")
                        held.add(h)
                elif event[0] == "BlockRemoved":
                    for h in event[1]:
                        if h not in held:
                            sys.exit(f"FAILED: block {h} removed but never stored")
                        held.discard(h)
                else:
                    held.clear()
        check(True, "every BlockRemoved names a stored block, none is stored twice while held")
        sequences = [s for s, _ in live]
        check(sequences == list(range(len(live))),
              f"sequence numbers count from 0 without gaps ({len(live)} batches)")
        # A late subscriber catches up through the replay socket: a DEALER sends the empty
        # delimiter a REQ socket would add, then the start, and reads every reply.
        replay = context.socket(zmq.DEALER)
        replay.connect(f"tcp://127.0.0.1:{replay_port}")
        replay.send_multipart([b"", (1).to_bytes(8, "big")])
        replayed = []
        while replay.poll(5000):
            _, sequence, payload = replay.recv_multipart()
            if sequence == END_OF_REPLAY:
                break
            replayed.append((int.from_bytes(sequence, "big"), payload))
        check(replayed == live[1:], "the replay returns every batch from the one asked for")
        replay.close(linger=0)
    finally:
        server.stop()
        sub.close(linger=0)


GEMMA_TEMPLATE = """{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}
{{ m['content'] }}<end_of_turn>
{% endfor %}{% if add_generation_prompt %}<start_of_turn>model
{% endif %}"""


def gemma3_checks(args):
    """kv-serve with Gemma 3 270M (five sliding-window layers to each full one, grouped in the
    engine's pool): chat through its own template, whole and streamed alike, and KV events
    that report each prompt's blocks once, from the full-attention group only."""
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub_port = sub.bind_to_random_port("tcp://127.0.0.1")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    # This GGUF carries no chat template: Gemma's turn format, written out.
    template = tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False)
    template.write(GEMMA_TEMPLATE)
    template.close()
    server = Server(args.kv_serve, args.gemma3, "--served-model-name", "gemma3",
                    "--chat-template", template.name,
                    "--block-size", "16", "--pool-tokens", "4096",
                    "--kv-events", f"tcp://127.0.0.1:{sub_port}")
    client = server.client
    try:
        deadline = time.time() + 1.0
        while time.time() < deadline:
            sub.poll(50)
        kwargs = dict(model="gemma3", messages=[{"role": "user", "content": "Name three colours."}],
                      max_tokens=16, temperature=0)
        whole = client.chat.completions.create(**kwargs)
        texts, _, _, _ = streamed_chat(client, **kwargs)
        check(whole.choices[0].message.content.strip() != "",
              f"Gemma 3 (a base model: no template of its own) answers a chat: {whole.choices[0].message.content!r}")
        check(texts[0] == whole.choices[0].message.content,
              "Gemma 3's streamed reply concatenates to the whole one")
        prompt = [(7 * k) % 1000 + 10 for k in range(40)]
        client.completions.create(model="gemma3", prompt=prompt, max_tokens=1, temperature=0)
        stored = []
        deadline = time.time() + 5
        while time.time() < deadline:
            if sub.poll(100):
                _, _, payload = sub.recv_multipart()
                stored += [e for e in msgpack.unpackb(payload)[1] if e[0] == "BlockStored"]
        mine = [e for e in stored if e[3][:16] == prompt[:16]]
        check(len(mine) == 1 and mine[0][1] and len(mine[0][1]) == 2
              and mine[0][3] == prompt[:32],
              "a 40-token prompt's two full blocks are reported once, from one layer group")
    finally:
        server.stop()
        sub.close(linger=0)
        Path(template.name).unlink()


def kv_cache_dtype_checks(args):
    """kv-serve with a narrower pool: in the same MiB an f16 pool holds twice the f32 pool's
    blocks and an int8 pool more still (each row's values in a byte, and its scale),
    vllm:cache_config_info says which, and each serves greedy and sampled requests."""
    blocks = {}
    for dtype in ["f32", "f16", "int8"]:
        server = Server(args.kv_serve, args.model, "--served-model-name", "tiny",
                        "--block-size", "4", "--pool-mib", "2", "--kv-cache-dtype", dtype)
        try:
            with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
                families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
            config = families["vllm:cache_config_info"].samples[0].labels
            check(config["cache_dtype"] == dtype, f"vllm:cache_config_info says {dtype}")
            blocks[dtype] = int(config["num_gpu_blocks"])
            for temperature in [0, 0.8]:
                reply = server.client.completions.create(
                    model="tiny", prompt=[5, 17, 42, 8, 9, 10, 11, 12], max_tokens=12,
                    temperature=temperature, seed=3, extra_body={"ignore_eos": True})
                check(reply.usage.completion_tokens == 12,
                      f"a {dtype} pool serves a request at temperature {temperature}")
        finally:
            server.stop()
    check(blocks["f16"] == 2 * blocks["f32"], f"an f16 pool holds twice the blocks: {blocks}")
    check(blocks["f16"] < blocks["int8"] < 4 * blocks["f32"],
          f"an int8 pool holds more blocks than f16, fewer than 4x f32: {blocks}")


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
    parser.add_argument("--gemma3", help="Gemma 3 270M's GGUF, for a model with sliding layers")
    parser.add_argument("--url", help="test a running server serving the tiny fixture as `tiny` "
                        "(with the template above) instead of starting one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        template = Path(folder) / "template.jinja"
        template.write_text(TEMPLATE)
        tiny_model_checks(args, str(template))
    if not args.url:
        deployment_checks(args)
        kv_events_checks(args)
        kv_cache_dtype_checks(args)
    if args.real_model:
        real_model_checks(args)
    if args.gemma3:
        gemma3_checks(args)
    print("all openai client checks passed")


if __name__ == "__main__":
    main()
