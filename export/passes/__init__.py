"""Graph-surgeon passes that turn the traced dense prefill into the CoreMatching prefill (SPEC §3).

- `insert_core_neuron_selection`: activation output -> `core_neurons.{i}` (TopK over counts).
- `insert_core_token_selection`: `keep_indices` input -> TopK + Gather of core tokens.
- `insert_ffn_gather`: `core_neurons.{i}` -> compacted FFN weight outputs (Gather).
- `check_tensorrt`: the operators and TopK sizes a TensorRT build accepts.
"""

from export.passes.checks import check_tensorrt
from export.passes.core_neurons import insert_core_neuron_selection
from export.passes.core_tokens import insert_core_token_selection
from export.passes.ffn_gather import insert_ffn_gather

__all__ = ["check_tensorrt", "insert_core_neuron_selection", "insert_core_token_selection", "insert_ffn_gather"]
