"""The correctness contract (docs/architecture.md, Validation), run on a build.

Dense builds are compared with `transformers` (`LlavaForConditionalGeneration.generate`),
CoreMatching builds with the `coreMatching` reference: the same kept image tokens,
the same core neurons, logits within the tolerance at the prefill and at every
decode step, and the same greedy tokens for 32 steps. Two cases: the shipped
example image with its question, and a random image with a random question.

The build runs through the runtime's own generation loop, `runtime.Pipeline.generate`, on
`OrtBackend` with the CPU provider: the loop, cache buffers and decode steps that users run are
the ones checked. A `GenerationTrace` brings back what the comparison needs besides the answer
(each token's logits, the image features, the kept tokens and core neurons). The result is the
manifest's typed validation record (`buildformat.ValidationRecord`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from buildformat import Criteria, Manifest, ValidationCase, ValidationRecord
from coreMatching import CoreMatchingConfig, CoreMatchingLlava
from models.answer import build_prompt
from runtime.ort_backend import OrtBackend
from runtime.pipeline import GenerationTrace, Pipeline, Prompt
from runtime.sampling import Sampling

log = logging.getLogger(__name__)

# A plain drawing (flat white background, a red circle and a blue square) kept for validation only, so
# that redrawing the demo examples does not change what every build is checked on. Its flat background
# gives exactly equal image tokens, whose equal scores both sides break by index; a noisy background
# gives near-equal scores that fp16 rounding reorders (see docs/architecture.md, fp16 criteria).
EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "validation_two_shapes.png"
EXAMPLE_QUESTION = "What colour is the circle?"
_WORDS = (
    "what",
    "where",
    "which",
    "how",
    "many",
    "is",
    "are",
    "the",
    "a",
    "of",
    "on",
    "in",
    "left",
    "right",
    "colour",
    "shape",
    "red",
    "blue",
    "green",
    "big",
    "small",
)


# What each precision's builds must meet (recorded in the manifest: `buildformat.Criteria`).
# float32: exact selections and tokens. float16 (docs/architecture.md): an 11-bit mantissa
# gives ~5e-4 relative error per operation, growing with depth, so logits are compared relative to
# their scale, selections must overlap by 90% (a count at the threshold can flip), and greedy
# decoding may part from the reference only at a near-tie, after which nothing is comparable. A
# textured background gives many image tokens nearly the k-th score: fp16 rounding reorders them, so a
# swap with a token within 5% of the score range of the cut is a near-tie too, not a difference.
# Such swaps change what the later layers compute: on the default model, 3% of one layer's core
# neurons swapped at near-ties moved the decode-step logits by 2.4% of their scale while the prefill
# (dense in neurons) stayed within 0.5%, so a case whose selections differ gets twice the tolerance.
CRITERIA = {
    "float32": Criteria(absolute=1e-4, relative=0.0, min_overlap=1.0, near_ties=False),
    "float16": Criteria(
        absolute=1e-3, relative=2e-2, min_overlap=0.9, near_ties=True, score_band=0.05, selection_slack=2.0
    ),
}


class ValidationError(RuntimeError):
    """A build failed its validation; the report says how."""

    def __init__(self, message: str, report: ValidationRecord) -> None:
        super().__init__(message)
        self.report = report


def corematching_from_manifest(manifest: Manifest) -> CoreMatchingConfig | None:
    """The reference's configuration for a build's budgets (None: dense)."""
    cm = manifest.corematching
    if cm is None:
        return None
    return CoreMatchingConfig(
        token_budget=cm.token_budget,  # type: ignore[arg-type]
        token_ratio=cm.token_ratio,
        neuron_ratio=cm.neuron_ratio,
        prune_layer=cm.prune_layer,
        neuron_layers=cm.neuron_layers,  # type: ignore[arg-type]
        neuron_chunks=cm.neuron_chunks,
        auto_min_tokens=cm.auto_range[0],
        auto_max_tokens=cm.auto_range[1],
        token_selector=cm.token_selector,
        token_merge=cm.token_merge,
        seed=cm.seed,
    )


def validation_cases(image_size: int, seed: int = 0) -> list[tuple[str, Any, str]]:
    """(name, PIL image, question): the shipped example, and a random image with a random question."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
    question = " ".join(rng.choice(_WORDS, size=7)).capitalize() + "?"
    with Image.open(EXAMPLE_IMAGE) as example:
        cases = [("example", example.convert("RGB"), EXAMPLE_QUESTION)]
    return [*cases, ("random", noise, question)]


def _reference(model: Any, config: CoreMatchingConfig | None, ids: torch.Tensor, pixels: torch.Tensor, steps: int):
    """(tokens, logits [steps, V], image features [n_img, d], kept, core, scores [n_img]) of the PyTorch side."""
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0].float().numpy()
        if config is None:
            out = model.generate(
                input_ids=ids,
                pixel_values=pixels,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
            tokens = out.sequences[0, ids.shape[1] :].tolist()
            return tokens, torch.stack(out.logits)[:, 0].float().numpy(), features, None, None, None
    result = CoreMatchingLlava(model, config).generate(ids, pixels, max_new_tokens=steps, stop_at_eos=False)
    scores = result.token_scores.float().numpy()
    return result.tokens, result.step_logits.numpy(), features, result.kept_image_tokens, result.core_neurons, scores


def runtime_pipeline(
    build_dir: str | Path,
    manifest: Manifest,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    accuracy_level: int = 1,
    fused: bool = True,
) -> Pipeline:
    """The build as the runtime runs it: `Pipeline` on `OrtBackend`, CPU provider, at an ONNX Runtime graph
    optimization level (and MatMulNBits' accuracy level, for quantized builds); `fused`: the stacks' ONNX
    Runtime form where the build has one (else the portable form, which TensorRT reads)."""
    backend = OrtBackend(
        build_dir, manifest, provider="cpu", optimization_level=level, accuracy_level=accuracy_level, fused=fused
    )
    return Pipeline(Path(build_dir), manifest, backend)


def processor_prompt(manifest: Manifest, input_ids: np.ndarray, pixel_values: np.ndarray, steps: int) -> Prompt:
    """A runtime `Prompt` of the transformers processor's tensors (input_ids [1, S], pixel_values
    [1, 3, H, W] float32), answered with `steps` tokens. The processor expands the image token into
    its run of tokens, so the image starts at the first of them."""
    image_start = int(np.flatnonzero(input_ids[0] == manifest.model.image_token_id)[0])
    return Prompt(pixel_values=pixel_values, input_ids=input_ids, image_start=image_start, max_new_tokens=steps)


def greedy_trace(pipeline: Pipeline, prompt: Prompt) -> GenerationTrace:
    """The prompt's `max_new_tokens` greedy tokens (first maximum, as torch.argmax) through the pipeline's
    generation loop, with no stop at the end of sequence (validation compares a fixed number of tokens)."""
    trace = GenerationTrace()
    pipeline.run(prompt, Sampling(), stop_at_eos=False, trace=trace)
    return trace


def validate_build(
    build_dir: str | Path,
    manifest: Manifest,
    model: Any,
    processor: Any,
    steps: int = 32,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    accuracy_level: int = 1,
    criteria: Criteria | None = None,
    references: dict[str, tuple] | None = None,
) -> ValidationRecord:
    """Runs every case through the build (the runtime's pipeline, ONNX Runtime, CPU) and through the
    reference; compares. A build with fused stacks is run in both forms, the portable one's cases named
    `{case} (portable)`. accuracy_level: MatMulNBits' (quantized builds); criteria: None takes the
    precision's; references: the reference's results per case name when the caller already has them
    (`_reference`)."""
    config = corematching_from_manifest(manifest)
    precision = manifest.precision
    criteria = criteria or CRITERIA[precision]
    references = dict(references or {})
    cases = []
    for fused in (True, False) if manifest.fused else (True,):
        pipeline = runtime_pipeline(build_dir, manifest, level, accuracy_level, fused=fused)
        for name, image, question in validation_cases(manifest.model.image_size):
            inputs = processor(images=image, text=build_prompt(processor, question), return_tensors="pt")
            ids, pixels = inputs["input_ids"], inputs["pixel_values"].to(model.dtype)
            if name not in references:
                references[name] = _reference(model, config, ids, pixels, steps)
            got = greedy_trace(pipeline, processor_prompt(manifest, ids.numpy(), pixels.float().numpy(), steps))
            label = name if fused else f"{name} (portable)"
            cases.append(_compare(label, question, int(ids.shape[1]), steps, criteria, got, references[name]))
            log.info("validation %s: %s", label, "passed" if cases[-1].passed else "; ".join(cases[-1].problems))
    return ValidationRecord(
        reference="transformers" if config is None else "coreMatching",
        precision=precision,
        criteria=criteria,
        optimization_level=str(level).rsplit(".", 1)[-1],
        cases=tuple(cases),
    )


def selection_overlap(got: list[int], ref: list[int], scores: np.ndarray | None = None, band: float = 0.0) -> float:
    """Share of the reference's kept tokens that the build keeps, where a token the build keeps instead
    counts as shared if its reference score is within `band` x (score range) of the reference's k-th
    score: near-equal scores that half precision reorders are ties, not a wrong selection.

    scores: [n_img] the reference selector's scores (None: exact overlap)
    """
    shared = set(got) & set(ref)
    if scores is not None and band > 0 and ref:
        cut = float(scores[ref].min())  # the k-th score
        slack = band * float(scores.max() - scores.min())
        shared |= {t for t in set(got) - set(ref) if scores[t] >= cut - slack}
    return min(len(shared), len(ref)) / max(len(ref), 1)


def _compare(
    name: str, question: str, prompt: int, steps: int, criteria: Criteria, got: GenerationTrace, ref: tuple
) -> ValidationCase:
    ref_tokens, ref_logits, ref_features, ref_kept, ref_core, ref_scores = ref
    got_logits = got.step_logits  # [steps, V]
    kept_equal = None if ref_kept is None else got.kept_image_tokens == ref_kept
    core_equal = None if ref_core is None else got.core_neurons == ref_core
    tolerance = criteria.absolute + criteria.relative * float(np.abs(ref_logits).max())
    if kept_equal is False or core_equal is False:
        tolerance *= criteria.selection_slack
    equal = next((i for i, (a, b) in enumerate(zip(got.tokens, ref_tokens, strict=True)) if a != b), steps)
    # Logits are comparable only while both sides have been fed the same tokens.
    compared = min(equal + 1, steps)
    logit_diff = float(np.abs(got_logits[:compared] - ref_logits[:compared]).max())
    kept_overlap = core_overlap = None
    if ref_kept is not None:
        kept_overlap = selection_overlap(got.kept_image_tokens or [], ref_kept, ref_scores, criteria.score_band)
        core_overlap = min(
            (selection_overlap(got.core_neurons.get(layer, []), neurons) for layer, neurons in ref_core.items()),
            default=1.0,
        )
    problems = []
    if logit_diff > tolerance:
        problems.append(f"logits differ by {logit_diff:.3g} (tolerance {tolerance:.3g})")
    if equal < steps:
        margin = float(ref_logits[equal, ref_tokens[equal]] - ref_logits[equal, got.tokens[equal]])
        if not (criteria.near_ties and margin <= tolerance):
            problems.append(f"greedy tokens differ from step {equal} of {steps}")
    if kept_overlap is not None and kept_overlap < criteria.min_overlap:
        problems.append(f"kept image tokens differ from the reference's ({kept_overlap:.0%} shared)")
    if core_overlap is not None and core_overlap < criteria.min_overlap:
        problems.append(f"core neurons differ from the reference's ({core_overlap:.0%} shared in the worst layer)")
    assert got.image_features is not None  # the loop records them before any token
    kept = got.kept_image_tokens
    return ValidationCase(
        name=name,
        question=question,
        prompt_tokens=prompt,
        steps=steps,
        max_logit_diff=logit_diff,
        tolerance=tolerance,
        max_vision_diff=float(np.abs(got.image_features.astype(np.float32) - ref_features).max()),
        equal_tokens=equal,
        kept_equal=kept_equal,
        core_equal=core_equal,
        kept_overlap=kept_overlap,
        core_overlap=core_overlap,
        kept_image_tokens=None if kept is None else len(kept),
        problems=tuple(problems),
    )
