#!/usr/bin/env python3
"""A KV events subscriber for measurements: binds a ZeroMQ SUB socket on 127.0.0.1:PORT (start
kv-serve with `--kv-events tcp://127.0.0.1:PORT`), decodes every msgpack batch as a router would,
and on SIGTERM prints how many batches, events and block hashes arrived and how many sequence
gaps it saw. Needs pyzmq and msgpack (scripts/openai-client-test.sh installs both).

    python3 kv-bench/peers/kv_events_subscriber.py PORT
"""
import signal
import sys

import msgpack
import zmq


def main():
    port = int(sys.argv[1])
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(f"tcp://127.0.0.1:{port}")
    batches = events = hashes = gaps = 0
    last = -1
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping:
        if not sub.poll(100):
            continue
        _, sequence, payload = sub.recv_multipart()
        sequence = int.from_bytes(sequence, "big")
        gaps += sequence != last + 1
        last = sequence
        batch = msgpack.unpackb(payload)
        batches += 1
        events += len(batch[1])
        hashes += sum(len(e[1]) for e in batch[1] if e[0] != "AllBlocksCleared")
    print(f"batches {batches} events {events} block hashes {hashes} gaps {gaps}", flush=True)


if __name__ == "__main__":
    main()
