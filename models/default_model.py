"""Build the embedded default model: a complete, offline llava-hf directory.

The directory is what `python -m export build` uses when no `--model` is given,
so it must look exactly like a downloaded llava-hf checkpoint: config.json,
safetensors weights, a tokenizer (tokenizer.json), preprocessor_config.json and
a processor with the LLaVA-1.5 chat template. The tokenizer is real (byte-level
BPE trained here on a built-in English corpus, deterministically); the shipped
weights are trained on the procedural shapes dataset (`training/train.py`,
`scripts/train_default_model.py`); `write_checkpoint` writes random weights of
any preset with the same tokenizer, for tests and benchmarks.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.presets import ModelPreset, build_random_model

if TYPE_CHECKING:
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "default-small"
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
IMAGE_TOKEN = "<image>"
TRAINED_VOCAB = 1024  # the BPE vocabulary the training corpus gives (the default model's)

# LLaVA-1.5's template (as in llava-hf/llava-1.5-7b-hf): one user turn with an image
# and a question renders as "USER: <image>\n{question} ASSISTANT:". `<s>` is not in the
# template: the tokenizer's post-processor prepends it, as Llama's does.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}{%- else -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}"
    "{{ '<image>\n' }}"
    "{%- endfor -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{{ content['text'] + ' ' }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# OpenAI CLIP normalisation (what LLaVA-1.5's vision tower was trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_COLOURS = (
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "grey",
    "cyan",
    "magenta",
)
_SHAPES = (
    "circle",
    "square",
    "triangle",
    "rectangle",
    "star",
    "line",
    "dot",
    "ring",
    "cross",
    "diamond",
    "oval",
    "box",
    "ball",
    "cube",
)
_PLURALS = {"box": "boxes", "cross": "crosses"}
_POSITIONS = (
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the middle",
    "in the center",
    "in the corner",
    "next to the circle",
    "above the square",
    "below the triangle",
    "behind the box",
    "in front of the ball",
)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_SIZES = ("small", "large", "big", "tiny", "huge", "medium")
_OBJECTS = (
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "person",
    "man",
    "woman",
    "child",
    "bird",
    "table",
    "chair",
    "cup",
    "book",
    "phone",
    "sign",
    "bus",
    "train",
    "boat",
    "road",
    "street",
    "sky",
    "cloud",
    "sun",
    "water",
    "grass",
    "flower",
    "window",
    "door",
    "wall",
    "floor",
    "picture",
    "image",
    "photo",
    "background",
    "shirt",
    "hat",
    "bag",
    "plate",
    "food",
    "bottle",
)
_GENERAL = (
    "The quick brown fox jumps over the lazy dog.",
    "A picture is worth a thousand words, and this image shows a simple scene.",
    "Please describe the image in detail.",
    "Answer the question using a single word or phrase.",
    "The model looks at the image and answers the question about it.",
    "There is nothing else in the picture except a plain background.",
    "It is a sunny day and people are walking along the street near the park.",
    "I think the answer is yes, because the shape is clearly visible.",
    "I do not know, the image is too dark to see anything clearly.",
    "Is this a photo taken indoors or outdoors? It looks like it was taken outdoors.",
    "What is written on the sign? The sign says stop.",
    "Where is the dog? The dog is sitting under the table next to the chair.",
    "Which object is the largest? The largest object is the blue rectangle.",
    "Count the objects carefully and give the total number.",
    "The colours are bright and the shapes do not overlap.",
)


# Common English words (general vocabulary, so ordinary questions do not fall apart into bytes).
_COMMON_WORDS_TEXT = """
about above across after again against all almost alone along already also always among animal another
answer any anything appear apple area around arrow ask away baby back bad ball banana beach because bed
before begin behind believe below beside best better between beyond bicycle big bike boat body both bottom
boy bread bridge bright bring build building but buy call camera can cannot card carry center change cheese
child children city clean clear clock close clothes coat cold come computer could country cover cow cut dark
day describe detail different difficult dinner direction dish does doing done down draw dress drink drive
during each early east easy eat edge egg either else empty end enough even evening every everything exactly
example eye face fall family far farm fast father feel few field fill find finger fire first fish flat fly
follow foot for forest fork form found four free fresh friend from front fruit full game garden girl give
glass good great green ground group grow hair half hand happy hard have head hear heavy help here high hill
hold hole horse hot hour how hundred idea inside instead into island just keep kind kitchen know lake lamp
land large last late laugh leaf learn leave left leg less letter level light like line little live long look
lot low machine make many map mean middle might milk minute mirror money more morning most mother mountain
mouth move much must name narrow near need never new night nobody noise north nose nothing now number object
ocean office often old only open other outside over own page paint pair paper part party pass pattern people
perhaps person piece place plant play point pool possible pretty probably question quite rain read ready
really reason river rock roof room round run same sand say school sea seat second see seem shadow shape
sheep shoe shop short should show side simple since sit size sleep slow snow soft some something sometimes
song soon sound south space speak stand start still stone store story straight strange strong student such
summer surface table take talk tall teacher tell than thank that their them then there these thing think
this those thought through time today together tomorrow toward town toy truck true turn under until upon
usually very view visible walk want warm watch wave way weather week well west wheel when while whole why
wide wild will wind winter with without wood word work world would write wrong yard year yesterday young
"""


def _plural(shape: str) -> str:
    return _PLURALS.get(shape, shape + "s")


def training_corpus() -> list[str]:
    """The built-in English corpus: visual-QA style sentences in the chat format, plus general text."""
    lines: list[str] = list(_GENERAL)
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"USER: <image>\nWhat colour is the {shape}? ASSISTANT: The {shape} is {colour}.")
        lines.append(f"Is there a {colour} {shape} in the image? Yes, there is a {colour} {shape}.")
        lines.append(f"Is the {shape} {colour}? No, it is not {colour}.")
    for n, (number, shape) in enumerate(itertools.product(_NUMBERS, _SHAPES)):
        noun = shape if number == "one" else _plural(shape)
        lines.append(f"USER: <image>\nHow many {_plural(shape)} are there? ASSISTANT: There are {number} {noun}.")
        lines.append(f"I can count {number} {noun} ({n % 11}) in this picture.")
    for position, shape, size in itertools.product(_POSITIONS, _SHAPES, _SIZES):
        lines.append(f"Where is the {size} {shape}? The {size} {shape} is {position}.")
    for obj, colour in itertools.product(_OBJECTS, _COLOURS[:6]):
        lines.append(f"USER: <image>\nWhat is in the picture? ASSISTANT: A {colour} {obj}.")
        lines.append(f"The {obj} in the photo is {colour} and it is next to a {_OBJECTS[len(obj) % 7]}.")
    # The common words in short, fixed groups (no randomness: the corpus must be identical every run).
    words = _COMMON_WORDS_TEXT.split()
    for i in range(0, len(words), 8):
        group = words[i : i + 8]
        lines.append(" ".join(group).capitalize() + ".")
        lines.append(f"The {group[0]} and the {group[-1]} are {_COLOURS[i % len(_COLOURS)]}.")
    return lines


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A Llama-like byte-level BPE tokenizer with `vocab_size` tokens, `<image>` last.

    Byte-level BPE never needs `<unk>` (every byte has a token), but the token is
    kept so the special-token layout matches Llama's (<unk> 0, <s> 1, </s> 2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # A vocabulary beyond what the corpus trains (a 7B-width preset's 32064) is the trained one with
    # `<unused_i>` tokens appended after `<image>`: ids a random model may emit, never produced by text.
    trained = min(vocab_size, TRAINED_VOCAB)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=trained - 1,  # leave the last id for <image>, as LLaVA appends it after the text vocab
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    if tok.get_vocab_size() != trained - 1:
        # The corpus ran out of merges: the preset's vocabulary would not match the tokenizer.
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {trained - 1}")
    tok.add_special_tokens([IMAGE_TOKEN])
    if vocab_size > trained:
        tok.add_special_tokens([f"<unused_{i}>" for i in range(vocab_size - trained)])
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
        padding_side="left",  # batched generation pads on the left
        clean_up_tokenization_spaces=False,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, preset: ModelPreset) -> LlavaProcessor:
    """The LLaVA processor for `preset`: CLIP preprocessing at `image_size` and the chat template.

    The Pillow backend of the CLIP image processor is used: it needs no torchvision and
    matches what the torch-free runtime does with Pillow.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": preset.image_size},
        crop_size={"height": preset.image_size, "width": preset.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=preset.patch_size,
        vision_feature_select_strategy=preset.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )


def _save_processor(processor: LlavaProcessor, out: Path) -> None:
    """Save in the llava-hf hub layout: preprocessor_config.json on its own, processor_config.json without it.

    transformers 5 nests the image processor inside processor_config.json; the hub
    checkpoints (and the torch-free runtime) read preprocessor_config.json, and one
    copy of the preprocessing settings avoids two that can disagree.
    """
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    _rewrite_json(out / "processor_config.json", drop=("image_processor",))
    # Recorded explicitly so that code asking `tokenizer.add_bos_token` gets the truth
    # (tokenizer.json's post-processor prepends <s> either way).
    _rewrite_json(out / "tokenizer_config.json", add={"add_bos_token": True, "add_eos_token": False})


def _rewrite_json(path: Path, drop: tuple[str, ...] = (), add: dict[str, object] | None = None) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in drop:
        data.pop(key, None)
    data.update(add or {})
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_checkpoint(out_dir: str | Path, preset: ModelPreset, seed: int = 0, dtype: object = None) -> Path:
    """A complete llava-hf directory for `preset` with random weights and the project's real tokenizer.

    The preset's vocabulary must be the tokenizer's (its `<image>` id included): the default
    model's, or a tiny test preset resized to it (`preset.replace(vocab_size=..., image_token_id=...)`).
    dtype: the stored weights' dtype (default float32).
    """
    import torch

    out = Path(out_dir)
    model = build_random_model(preset, seed=seed)
    save_checkpoint(model, preset, out, dtype=dtype or torch.float32)
    logger.info("wrote %s (%s, random weights, seed %d)", out, preset.name, seed)
    return out


def save_checkpoint(model: Any, preset: ModelPreset, out_dir: str | Path, dtype: object = None) -> Path:
    """Save `model` (of `preset`) with the project tokenizer and processor as a llava-hf directory.

    dtype: the stored weights' dtype (default: the model's). The directory is created if needed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(preset.vocab_size)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # The model's embedding rows and the tokenizer ids must agree, or image features land on text tokens.
    if len(tokenizer) != preset.vocab_size or image_id != preset.image_token_id:
        raise RuntimeError(
            f"tokenizer ({len(tokenizer)} tokens, <image>={image_id}) does not match preset "
            f"{preset.name!r} (vocab {preset.vocab_size}, image_token_id {preset.image_token_id})"
        )
    if dtype is not None and dtype != model.dtype:
        model = copy.deepcopy(model).to(dtype)  # the caller's model keeps its precision
        for sub in (model.config.text_config, model.config.vision_config):
            sub.dtype = dtype  # keep config.json consistent with the stored weights
    # transformers 5 always writes safetensors (there is no pickle option any more).
    model.save_pretrained(out, max_shard_size="1GB")
    _save_processor(build_processor(tokenizer, preset), out)
    return out
