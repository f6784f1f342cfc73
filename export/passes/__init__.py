"""Graph-surgeon passes that turn the traced dense prefill into the CoreMatching prefill (docs/architecture.md).

- `insert_core_neuron_selection`: activation output -> `core_neurons.{i}` (TopK over counts).
- `insert_token_scores`: the prune layer's seams -> the token selector's image scores.
- `insert_core_token_selection`: image scores -> `keep_indices` (TopK + Gather of core tokens).
- `insert_token_merge`: the merge inputs -> the summary token or the nearest-token groups.
- `insert_ffn_gather`: `core_neurons.{i}` -> compacted FFN weight outputs (Gather).
- `check_tensorrt`: the operators and TopK sizes a TensorRT build accepts.
"""

from export.passes.checks import check_tensorrt
from export.passes.core_neurons import insert_core_neuron_selection
from export.passes.core_tokens import insert_core_token_selection
from export.passes.ffn_gather import insert_ffn_gather
from export.passes.merge import insert_token_merge
from export.passes.selectors import GRAPH_RULES, insert_token_scores

__all__ = [
    "GRAPH_RULES",
    "check_tensorrt",
    "insert_core_neuron_selection",
    "insert_core_token_selection",
    "insert_ffn_gather",
    "insert_token_merge",
    "insert_token_scores",
]
