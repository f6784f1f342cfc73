"""Decode fidelity: how closely neuron-sparse decoding follows the dense model, teacher-forced.

The evaluation's answers are one word, so accuracy never exercises the decode-time neuron
sparsity. Here the dense model writes `steps` + 1 greedy tokens for each question (no stop at the
end of sequence); every setting is then fed the same tokens, and each of its `steps` decode
steps' next-token distribution is compared with the dense one: top-1 agreement and
KL(dense || sparse). Every image token is kept (k = n_img), so the figures isolate the neuron
sparsity of the decoding steps (beta).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from coreMatching.errors import ConfigError
from vqadata.data import Item

BETAS = (0.2, 0.4, 0.6)


@dataclass(frozen=True)
class FidelityConfig:
    betas: tuple[float, ...] = BETAS
    steps: int = 16
    prune_layer: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"fidelity steps must be at least 1, got {self.steps}")
        for beta in self.betas:
            if not 0.0 < beta <= 1.0:
                raise ConfigError(f"fidelity betas must be in (0, 1], got {beta}")


@dataclass(frozen=True)
class Fidelity:
    beta: float
    questions: int
    steps: int
    top1: float  # share of steps whose argmax equals the dense argmax
    kl: float  # mean KL(dense || sparse) per step, nats


def decode_fidelity(
    model: Any,
    processor: Any,
    items: Iterable[Item],
    config: FidelityConfig,
    on_item: Callable[[int], None] | None = None,
) -> list[Fidelity]:
    import torch

    from coreMatching import CoreMatchingConfig, CoreMatchingLlava
    from models.answer import build_prompt, load_image
    from models.loading import num_image_tokens

    n_img = num_image_tokens(model.config)
    dense = CoreMatchingLlava(model, CoreMatchingConfig.keep_all(n_img, prune_layer=config.prune_layer))
    sparse = {
        beta: CoreMatchingLlava(
            model, CoreMatchingConfig(token_budget=n_img, neuron_ratio=beta, prune_layer=config.prune_layer)
        )
        for beta in config.betas
    }
    agree = {beta: 0 for beta in config.betas}
    kl = {beta: 0.0 for beta in config.betas}
    count = 0
    questions = 0
    for done, item in enumerate(items, 1):
        image = load_image(item.load_image())
        inputs = processor(images=image, text=build_prompt(processor, item.question), return_tensors="pt")
        ids = inputs["input_ids"]
        features = dense.image_features(inputs["pixel_values"].to(model.dtype))
        with torch.inference_mode():
            # Row 0 is the prefill's (dense in neurons either way); rows 1.. are the decode steps compared.
            reference = [logits for _, logits, _ in dense.stream(ids, None, config.steps + 1, False, features)]
            tokens = [int(torch.argmax(logits)) for logits in reference]
            for beta, runner in sparse.items():
                state = runner.prefill(ids, image_features=features)
                for step in range(config.steps):
                    logits = runner.decode_step(state, tokens[step])  # fed the dense model's token
                    p = torch.log_softmax(reference[step + 1].double(), dim=-1)
                    q = torch.log_softmax(logits.double(), dim=-1)
                    kl[beta] += float((p.exp() * (p - q)).sum())
                    agree[beta] += int(torch.argmax(logits)) == tokens[step + 1]
        count += config.steps
        questions += 1
        if on_item is not None:
            on_item(done)
    return [
        Fidelity(beta, questions, config.steps, agree[beta] / max(count, 1), kl[beta] / max(count, 1))
        for beta in config.betas
    ]
