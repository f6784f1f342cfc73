"""Asking a repository's model over gRPC streaming (tritonclient), in the Triton environment.

    python -m bench.triton.client --url 127.0.0.1:8001 --model corematching --concurrency 2 < requests.json

stdin: a JSON list of {"image": path, "question": text, "max_tokens": n}, where "messages" (a list of
chat messages, sent as MESSAGES) may replace "question" and "stop" (a list of strings, sent as STOP)
may come too; stdout: a JSON list, in the same order, of {"pieces": [...], "result": {...} | null,
"error": str | null, "seconds": s, "first_token_seconds": s}. Each concurrent worker holds its own stream.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def ask(client: Any, model: str, item: dict[str, Any], responses: queue.Queue) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    def tensor(name: str, value: np.ndarray, kind: str) -> Any:
        t = grpcclient.InferInput(name, list(value.shape), kind)
        t.set_data_from_numpy(value)
        return t

    inputs = [tensor("IMAGE", np.array([Path(item["image"]).read_bytes()], dtype=np.object_), "BYTES")]
    if "question" in item:
        inputs.append(tensor("QUESTION", np.array([item["question"].encode()], dtype=np.object_), "BYTES"))
    if "messages" in item:
        messages = json.dumps(item["messages"]).encode()
        inputs.append(tensor("MESSAGES", np.array([messages], dtype=np.object_), "BYTES"))
    if "stop" in item:
        inputs.append(tensor("STOP", np.array([s.encode() for s in item["stop"]], dtype=np.object_), "BYTES"))
    if "max_tokens" in item:
        inputs.append(tensor("MAX_TOKENS", np.array([item["max_tokens"]], dtype=np.int32), "INT32"))
    start = time.perf_counter()
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    out: dict[str, Any] = {"pieces": [], "result": None, "error": None, "first_token_seconds": None}
    while True:
        result, error = responses.get(timeout=300)
        if error is not None:
            out["error"] = str(error)
            break
        if out["first_token_seconds"] is None:
            out["first_token_seconds"] = time.perf_counter() - start
        token = result.as_numpy("TOKEN_ID")
        if token is not None and int(token[0]) >= 0:
            out["pieces"].append(result.as_numpy("TEXT")[0].decode())
        if result.get_response().parameters["triton_final_response"].bool_param:
            raw = result.as_numpy("RESULT")
            out["result"] = json.loads(raw[0]) if raw is not None and raw[0] else None
            break
    out["seconds"] = time.perf_counter() - start
    return out


def run(url: str, model: str, items: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    import tritonclient.grpc as grpcclient

    results: list[dict[str, Any] | None] = [None] * len(items)
    todo: queue.Queue = queue.Queue()
    for index, item in enumerate(items):
        todo.put((index, item))

    def worker() -> None:
        client = grpcclient.InferenceServerClient(url)
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            while True:
                try:
                    index, item = todo.get_nowait()
                except queue.Empty:
                    return
                results[index] = ask(client, model, item, responses)
        finally:
            client.stop_stream()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="host:port of Triton's gRPC endpoint")
    parser.add_argument("--model", default="corematching")
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    items = json.load(sys.stdin)
    start = time.perf_counter()
    results = run(args.url, args.model, items, args.concurrency)
    json.dump({"results": results, "seconds": time.perf_counter() - start}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
