"""The model's inputs and outputs, and a conversation's example, as Markdown: the repository's README
(README.template.md's `{interface}`) and docs/serving/triton.md (bench/triton/throughput.py) carry it.
A Python string rather than a data file, so a wheel install has it without a package-data entry."""

from __future__ import annotations

INTERFACE = r"""## Inputs and outputs

| input | type [shape] | |
|---|---|---|
| `IMAGE` | BYTES [1] | the PNG / JPEG file's bytes (its base64 text through the HTTP generate endpoint) |
| `QUESTION` | BYTES [1], optional | one question about the image; or, instead: |
| `MESSAGES` | BYTES [1], optional | a conversation: a JSON list of chat messages (below), instead of `QUESTION` |
| `STOP` | BYTES [-1], optional | up to 4 stop strings, one per element: the answer ends before the first of them |
| `MAX_TOKENS` | INT32 [1], optional | the answer's length limit (default 64) |
| `TEMPERATURE`, `TOP_P` | FP32 [1], optional | sampling (0 and 1, the defaults: greedy) |
| `SEED` | INT64 [1], optional | the sampling seed |

| output | type [shape] | |
|---|---|---|
| `TEXT` | BYTES [1] | per token: the new text (`""` in the final response) |
| `TOKEN_ID` | INT64 [1] | per token: the token (-1 in the final response) |
| `KEPT_IMAGE_TOKENS` | INT64 [-1] | final response: the image tokens the selection kept |
| `RESULT` | BYTES [1] | final response: a JSON object (answer, finish_reason, token_ids, timings, ...) |

A request sends `QUESTION` or `MESSAGES`, not both. `MESSAGES` holds OpenAI-style messages:
`{"role": "system" | "user" | "assistant", "content": ...}` ("developer" counts as "system"), the
content a string or a list of parts `{"type": "text", "text": ...}`, `{"type": "image"}` or
`{"type": "image_url", ...}`. The image's bytes still go in `IMAGE`; the one message whose content
has an image part (a user's) is where the image goes, and its URL, if any, is not read. LLaVA-1.5
takes one image per conversation, and the last message is the user's question. The conversation is
rendered with the build's chat template, and a prompt longer than the build's limit is refused.
`STOP` is a list tensor, as TensorRT-LLM's `stop_words` is: the HTTP generate endpoint takes it as
a JSON array. `MESSAGES` is nested, so it travels as one JSON string. A bad input (a broken image,
an empty question, both `QUESTION` and `MESSAGES`, a message list the model cannot take, five stop
strings, `MAX_TOKENS` beyond the cache) is a Triton error for that request, one line naming the
fix; the instance goes on.

## A conversation

gRPC streaming:

    import json, numpy as np, tritonclient.grpc as grpcclient

    def strings(name, values):
        tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=object))
        return tensor

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Where is it?"},
    ]
    client = grpcclient.InferenceServerClient("localhost:8001")
    client.start_stream(callback=lambda result, error: print(error or result.as_numpy("TEXT")[0].decode(), end=""))
    client.async_stream_infer("{name}", [
        strings("IMAGE", [open("photo.png", "rb").read()]),
        strings("MESSAGES", [json.dumps(messages).encode()]),
        strings("STOP", [b"\n"]),
    ])

HTTP: `POST /v2/models/{name}/generate_stream` with
`{"IMAGE": "<base64 of the file>", "MESSAGES": "<the list as a JSON string>", "STOP": ["\n"]}`.
"""


def interface(name: str) -> str:
    """The text for the model `name`."""
    return INTERFACE.replace("{name}", name)
