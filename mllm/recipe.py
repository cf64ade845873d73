"""Typed training recipes filled from YAML.

A recipe is a :class:`Recipe` dataclass: which ``stage`` to train (``tokenizer`` or ``llm``), the ``model`` section
(passed straight into the model's config class, never re-declared as flags), the ``data`` section and the ``train``
section. Unknown keys are errors that name the key and the section, raised before any training starts.

Command-line overrides use dotted keys: ``train.steps=100 data.image_size=64``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

STAGES = ("tokenizer", "llm")


@dataclass
class DataRecipe:
    """What the stage trains on.

    dataset: ``"shapes"`` (procedural captioned shapes) and, for the tokenizer stage, ``photo_fraction`` of random crops
    of the bundled photographs; or, for the llm stage, ``"pretokenized"``: the ``vtok pretokenize`` output folder at
    ``path`` (its first ``num_train`` records; ``num_train <= 0`` uses all), whose visual-tokenizer fingerprint must
    match the recipe's ``visual_tokenizer``. ``tasks`` maps task names (``captioning``, ``text_to_image``,
    ``decompression``, ``interleaved``, ``instruction``) to mixture weights.
    packing: (``llm`` stage) pack each step's samples into rows of at most ``max_tokens`` tokens (position ids
    restart per sample, see :mod:`mllm.packing`) with ``pack_strategy`` ``"ffd"`` (first-fit-decreasing over
    ``pack_buffer`` samples) or ``"greedy"`` (stream order), instead of padding them to the longest.
    """

    dataset: str = "shapes"
    image_size: int = 32
    num_train: int = 4096
    photo_fraction: float = 0.5
    tasks: dict = field(default_factory=lambda: {"captioning": 0.5, "text_to_image": 0.5})
    prompt_dropout: float = 0.0
    seed: int = 0
    packing: bool = False
    max_tokens: int = 2048
    pack_buffer: int = 1024
    pack_strategy: str = "ffd"
    path: Optional[str] = None

    def __post_init__(self):
        if self.dataset == "pretokenized" and not self.path:
            raise ValueError("data.dataset: pretokenized needs data.path: (a folder written by vtok pretokenize)")


@dataclass
class TrainRecipe:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    save_every: int = 500
    log_every: int = 25
    seed: int = 0
    num_workers: int = 0
    # llm stage: per-modality weights of target tokens and the PaLM z-loss coefficient (see mllm.losses.lm_loss)
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    z_loss_weight: float = 0.0


@dataclass
class LoraRecipe:
    """LoRA via PEFT for the ``llm`` stage (see :mod:`mllm.peft_presets`).

    enabled: wrap the bridged LLM; only the adapters and the new token rows (specials + image ids) train.
    target_modules: PEFT's ``target_modules`` (``"all-linear"``: every linear layer except the output head).
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"


@dataclass
class Recipe:
    """A whole training stage.

    model: for ``tokenizer``, keyword arguments of ``VisualTokenizerConfig``; for ``llm``, ``base`` (a path to a
    pretrained causal LM, or null) and ``config`` (keyword arguments of ``LlamaConfig`` for a model built from scratch).
    visual_tokenizer: (``llm`` stage) path of the trained visual tokenizer to bridge to.
    lora: (``llm`` stage) train LoRA adapters + new token rows instead of the whole model.
    """

    stage: str
    output_dir: str
    model: dict = field(default_factory=dict)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    visual_tokenizer: Optional[str] = None
    lora: LoraRecipe = field(default_factory=LoraRecipe)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"recipe stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage == "llm" and not self.visual_tokenizer:
            raise ValueError("an llm recipe needs `visual_tokenizer:` (path of a trained visual tokenizer)")
        if self.lora.enabled and self.stage != "llm":
            raise ValueError(f"`lora.enabled` applies to the llm stage only, not to stage {self.stage!r}")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"recipe section {where!r} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown recipe key(s) {unknown} in section {where!r}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        sub = {DataRecipe: "data", TrainRecipe: "train", LoraRecipe: "lora"}
        ftype = fields[name].type
        target = next((c for c in sub if c.__name__ == ftype or c is ftype), None)
        kwargs[name] = _build(target, value, f"{where}.{name}" if where else name) if target else value
    return cls(**kwargs)


def recipe_from_dict(values: dict) -> Recipe:
    return _build(Recipe, values, "")


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a nested dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return values


def load_recipe(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> Recipe:
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    return recipe_from_dict(apply_overrides(values, overrides or []))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(recipe_to_dict(recipe), f, sort_keys=False)
