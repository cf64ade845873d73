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

from tokenizer_bridge.interface import image_vocab_layout
from tokenizer_bridge.nn.adversarial import GAN_LOSSES, GENERATOR_LOSSES
from tokenizer_bridge.nn.discriminator import check_discriminator_section
from tokenizer_bridge.vocab.layout import ImageLayout, check_layout_fields

from .optim import check_mixed_precision

STAGES = ("tokenizer", "llm")


@dataclass
class DataRecipe:
    """What the stage trains on.

    dataset: ``"shapes"`` (procedural captioned shapes) and, for the tokenizer stage, ``photo_fraction`` of random crops
    of the bundled photographs; for the tokenizer stage, ``"images"``: the user's images at ``path`` (an image folder,
    a JSONL/CSV list with an ``image_column``, a glob of webdataset ``.tar`` shards or a ``save_to_disk`` folder; see
    :mod:`mllm.data.sources`), streamed and augmented per sample (random resized crop covering ``crop_scale`` of the
    image area, horizontal flip) to ``image_size``, or to one of ``aspect_buckets`` (``[[H, W], ...]``, one bucket per
    step, for encoders that take any size); or, for the llm stage, ``"pretokenized"``: the ``vtok pretokenize`` output
    folder at ``path`` (its first ``num_train`` records; ``num_train <= 0`` uses all), whose visual-tokenizer
    fingerprint must match the recipe's ``visual_tokenizer``. ``tasks`` maps task names (``captioning``, ``text_to_image``,
    ``decompression``, ``interleaved``, ``instruction``) to mixture weights. What they train on depends on the records:
    shapes or pre-tokenized *captions* train every task (``interleaved`` and ``instruction`` synthesize documents and
    conversations from a few captioned images; ``decompression`` needs ``vtok pretokenize --compressed``); a
    pre-tokenized folder of *documents* trains ``interleaved`` on the documents themselves (loss after each one's
    ``prefix``), one of *conversations* ``instruction`` (loss on assistant turns), and any other task with a positive
    weight is refused for them.
    packing: (``llm`` stage) pack each step's samples into rows of at most ``max_tokens`` tokens (position ids
    restart per sample, see :mod:`mllm.data.packing`) with ``pack_strategy`` ``"ffd"`` (first-fit-decreasing over
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
    image_column: str = "image"
    eval_size: int = 16  # held-out images (tokenizer stage) or records (llm stage) of the train.eval_every evaluation
    crop_scale: list = field(default_factory=lambda: [0.35, 1.0])
    # dataset shapes, tokenizer stage: the area fraction (min, max) of each photo a training crop covers before it is
    # resized to image_size; smaller crops show the photos at the zoom of larger images (a 32 px crop of 1/16 of a
    # photo's area has the detail per pixel of the whole photo at 128 px)
    photo_crop_scale: list = field(default_factory=lambda: [0.1, 0.6])
    # dataset shapes, tokenizer stage: photo crops at this side instead of image_size; each step is then all shapes
    # (image_size) or, with probability photo_fraction, all photos (photo_size), for tokenizers that take any size
    photo_size: Optional[int] = None
    aspect_buckets: Optional[list] = None
    # tokenizer stage: image-level labels its codes are trained to carry (a label head on the quantized codes,
    # model.label_weight; tokenizer_bridge.nn.labels). dataset shapes: attribute names (colour, shape, position,
    # background), photo crops unlabelled; dataset images: label columns of the source (``folder`` in an image folder:
    # the class folder), each value a class, records without one unlabelled
    labels: Optional[list] = None

    def __post_init__(self):
        if self.labels is not None and (isinstance(self.labels, str) or not isinstance(self.labels, list)
                                        or not self.labels or len(set(self.labels)) != len(self.labels)):
            raise ValueError(f"data.labels must be a non-empty list of distinct label names, got {self.labels!r}")
        if self.dataset == "pretokenized" and not self.path:
            raise ValueError("data.dataset: pretokenized needs data.path: (a folder written by vtok pretokenize)")
        if self.dataset == "images" and not self.path:
            raise ValueError("data.dataset: images needs data.path: (an image folder, a JSONL/CSV list, a glob of .tar "
                             "shards or a save_to_disk folder)")
        if self.photo_size is not None and (isinstance(self.photo_size, bool) or not isinstance(self.photo_size, int)
                                            or self.photo_size < 1):
            raise ValueError(f"data.photo_size must be a positive integer (or null), got {self.photo_size!r}")
        scale = [float(v) for v in self.photo_crop_scale]
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"data.photo_crop_scale must be [min, max] with 0 < min <= max <= 1, got "
                             f"{list(self.photo_crop_scale)}")


@dataclass
class TrainRecipe:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    # AdamW's (beta1, beta2) of the stage's model; GAN tokenizer recipes use (0.5, 0.9), as VQGAN/IBQ/Open-MAGVIT2 do
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 50
    grad_clip: float = 1.0
    save_every: int = 500
    log_every: int = 25
    seed: int = 0
    num_workers: int = 0
    # summed over this many micro-batches per optimizer step (memory of batch_size / N, the update of batch_size)
    gradient_accumulation_steps: int = 1
    # > 0: keep an exponential moving average of the weights; final/ holds it (final-raw/ the trained weights)
    ema_decay: float = 0.0
    # recompute activations in the backward pass (HF LLM layers, tokenizer conv/ViT blocks): less memory, more compute
    gradient_checkpointing: bool = False
    # module names of the stage's model to keep fixed (no gradients, eval mode), e.g. [encoder, quantizer] to retrain
    # only the decoder of a tokenizer (with `init_from:`) while its image ids stay exactly the same
    freeze: list = field(default_factory=list)
    # experiment tracking through accelerate's trackers, beside log.jsonl: "none", "tensorboard" (the tensorboard
    # extra; event files under output_dir/tracking) or "wandb"
    report_to: str = "none"
    # > 0: every this many steps (and at the end) a held-out evaluation (eval_* metrics in the step's log line) and a
    # picture in output_dir/samples/step-N.png and the tracker. Tokenizer stage: held-out images over their
    # reconstructions. llm stage: the last data.eval_size records are held out (never trained on); a loss on them, and
    # for captions their images with the model's captions over images generated from their captions (greedy)
    eval_every: int = 0
    # llm stage: per-modality weights of target tokens and the PaLM z-loss coefficient (see mllm.training.losses.lm_loss)
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    z_loss_weight: float = 0.0
    # null: the accelerate launch config decides; "bf16": forward and loss under bfloat16 autocast (float32 weights
    # and optimizer), also on CPUs with bf16 instructions (the demo's LLM stage: 1.1-1.3x per step on 2 cores, but
    # its text-to-image fell from 1.00 to 0.57 on one of two seeds: bench/results/demo.md row 112)
    mixed_precision: Optional[str] = None
    # torch's fused AdamW kernel where it applies (mllm/training/optim.py); false: its for-loop one. They round
    # differently, so a run compared to the bit with another (a DeepSpeed run against a plain one) uses one kind
    fused_optimizer: bool = True

    def __post_init__(self):
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        check_mixed_precision(self.mixed_precision)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class LoraRecipe:
    """LoRA via PEFT for the ``llm`` stage (see :mod:`mllm.lora`).

    enabled: wrap the bridged LLM; only the adapters and the new token rows (specials + image ids) train.
    target_modules: PEFT's ``target_modules`` (``"all-linear"``: every linear layer except the output head).
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"


@dataclass
class AdversarialRecipe:
    """``adversarial:`` (tokenizer stage): train the visual tokenizer against a discriminator, as VQGAN and
    Open-MAGVIT2 do (see :mod:`tokenizer_bridge.nn.adversarial`). The discriminator is a second model of the loop,
    kept in checkpoints' ``state/`` only, never in the tokenizer's folders.

    enabled: add the adversarial loss.
    discriminator: ``{type: patchgan | stylegan, ...}``, the other keys being that class's keyword arguments
        (:mod:`tokenizer_bridge.nn.discriminator`; the StyleGAN one's ``image_size`` defaults to ``data.image_size``).
        Every checkpoint records it with its defaults filled in, and a resume rebuilds the discriminator from that.
    loss: ``hinge`` or ``non_saturating``: the discriminator's loss, and the generator's unless ``generator_loss``.
    generator_loss: ``null`` (the one of ``loss``), ``hinge`` (``-mean D(x_hat)``), ``non_saturating`` (softplus per
        patch) or ``non_saturating_image`` (softplus of each image's mean patch logit: Open-MAGVIT2 and IBQ train
        with it beside a hinge discriminator loss).
    start: the first step (counted from 0) with an adversarial term and discriminator updates (VQGAN's
        ``disc_start``); before it both are off and ``log.jsonl`` says ``adversary_active: 0``.
    weight: the generator term's weight; with ``adaptive_weight`` it multiplies VQGAN's adaptive weight (ratio of the
        gradient norms of the reconstruction(+perceptual) and generator losses at the decoder's last layer, clamped to
        [0, 1e4]); without, the weight is fixed (Open-MAGVIT2's ``gen_loss_weight``).
    lecam_weight / lecam_decay: LeCAM regularisation (Tseng et al. 2021; 0: off) and the decay of its EMA anchors.
    r1_weight: gamma of the R1 gradient penalty ``gamma / 2 * E ||grad D(x)||^2`` on real images (0: off).
    lr / betas / weight_decay: the discriminator's AdamW (``lr: null``: ``train.lr``), on the tokenizer's schedule.
    """

    enabled: bool = False
    discriminator: dict = field(default_factory=lambda: {"type": "patchgan"})
    loss: str = "hinge"
    generator_loss: Optional[str] = None
    start: int = 0
    weight: float = 0.1
    adaptive_weight: bool = True
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    r1_weight: float = 0.0
    lr: Optional[float] = None
    betas: list = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0

    def __post_init__(self):
        where = "adversarial"
        if self.loss not in GAN_LOSSES:
            raise ValueError(f"{where}.loss must be one of {sorted(GAN_LOSSES)}, got {self.loss!r}")
        if self.generator_loss is not None and self.generator_loss not in GENERATOR_LOSSES:
            raise ValueError(f"{where}.generator_loss must be null or one of {sorted(GENERATOR_LOSSES)}, got "
                             f"{self.generator_loss!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"{where}.start must be an integer step >= 0, got {self.start!r}")
        for name in ("weight", "lecam_weight", "r1_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"{where}.lecam_decay must lie in [0, 1), got {self.lecam_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{where}.betas must be two numbers in [0, 1), got {self.betas}")
        try:
            check_discriminator_section(self.discriminator)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}.discriminator: {error}") from None


@dataclass
class PerceptualRecipe:
    """``perceptual:`` (tokenizer stage): the frozen backbone of the perceptual loss, whose weight is the tokenizer's
    ``model.perceptual_weight`` (:class:`~tokenizer_bridge.nn.losses.PerceptualLoss`). No perceptual weights ship
    with the library or download here: ``backbone`` is the local folder of any Hugging Face vision model saved with
    ``save_pretrained`` (DINOv2, SigLIP, ConvNeXt, ...); ``perceptual.backbone=/path/to/model`` on the command line.

    layers: the backbone's hidden-state indices compared (null: every block).
    style_weight: > 0 adds that times the Gram-matrix (style) loss over the same layers (Gatys et al. 2016).
    """

    backbone: Optional[str] = None
    layers: Optional[list] = None
    style_weight: float = 0.0


IMAGE_VOCAB_LAYOUTS = ("auto", "grid", "sequence")
# ImageLayout fields the visual tokenizer fixes (tokenizer_bridge.interface.image_vocab_layout), and those the section
# spells its own way (layout: auto, unified_codebook): every other ImageLayout field is a key of the section.
FROM_VISUAL_TOKENIZER = ("codebook_size", "num_levels", "grid_size", "num_tokens", "budgets")
SPELLED_OTHERWISE = ("layout", "token_ids")
SECTION_KEYS = ("layout", "max_grid_size", "unified_codebook")  # the section's own keys


@dataclass(init=False)
class ImageVocabRecipe:
    """``model.image_vocab:`` of an llm recipe: the part of the :class:`~tokenizer_bridge.ImageLayout` the user
    chooses; the visual tokenizer fills in the rest (:meth:`image_layout`). Every key is optional; without any the
    layout is a fixed grid for 2-D tokenizers and a sequence of their slots for slot tokenizers, and residual
    tokenizers get one level per residual level.

    layout: ``"auto"`` (``"sequence"`` for tokenizers that emit 1-D ids, such as the slot tokenizer; ``"grid"``
        otherwise), ``"grid"`` or ``"sequence"``; it must agree with the tokenizer.
    max_grid_size: ``[H, W]``, the largest grid of a ``variable_size`` layout (default: the ``data.image_size``
        grid, which is also recorded as the size generated by default).
    unified_codebook: reuse existing text tokens as image ids (UniCode) instead of adding tokens: ``"first"`` (the
        first K non-special text tokens) or an explicit list of K token ids; ``null`` (default) adds new tokens.
    Any other key is an ``ImageLayout`` field the visual tokenizer does not fix -- ``variable_size``, ``level_order``,
    ``separate_level_ranges`` (default: separate unless the residual quantizer shares one codebook across levels),
    ``factors``, ``special_tokens`` -- with the meaning :class:`~tokenizer_bridge.ImageLayout` gives it; ``null``
    leaves a key unset.
    """

    layout: str
    max_grid_size: Optional[list]
    unified_codebook: Any
    layout_fields: dict

    def __init__(self, layout: str = "auto", max_grid_size: Optional[list] = None, unified_codebook: Any = None,
                 **layout_fields):
        _check_keys(layout_fields, _user_layout_fields(), "model.image_vocab", known=SECTION_KEYS)
        self.layout, self.max_grid_size, self.unified_codebook = layout, max_grid_size, unified_codebook
        self.layout_fields = {k: v for k, v in layout_fields.items() if v is not None}  # null: not set
        self._check_section_keys()
        known = dict(self.layout_fields, **({} if layout == "auto" else {"layout": layout}))
        if isinstance(unified_codebook, (list, tuple)):
            known["token_ids"] = unified_codebook
        _in_section(check_layout_fields, known)  # the layout's rules, as far as they go without the tokenizer

    def _check_section_keys(self) -> None:
        if self.layout not in IMAGE_VOCAB_LAYOUTS:
            raise ValueError(f"model.image_vocab.layout must be one of {IMAGE_VOCAB_LAYOUTS}, got {self.layout!r}")
        if self.max_grid_size is not None:
            if not self.layout_fields.get("variable_size"):
                raise ValueError("model.image_vocab.max_grid_size applies only with variable_size: true")
            if len(self.max_grid_size) != 2 or min(int(s) for s in self.max_grid_size) < 1:
                raise ValueError(f"model.image_vocab.max_grid_size must be [H, W], got {self.max_grid_size}")
        unified = self.unified_codebook
        if unified is not None and unified != "first" and not isinstance(unified, (list, tuple)):
            raise ValueError(f"model.image_vocab.unified_codebook must be null, 'first' or a list of token ids, got "
                             f"{unified!r}")

    def image_layout(self, visual_tokenizer, image_size: int, token_ids: Optional[list] = None):
        """The :class:`~tokenizer_bridge.ImageLayout` for ``visual_tokenizer`` at ``image_size``: its levels, grid
        (or slots and budgets) and codebook, with this section's choices; ``token_ids`` are the text tokens a
        ``unified_codebook`` reuses."""
        values = image_vocab_layout(visual_tokenizer, image_size)
        self._check_kind(values["layout"], type(visual_tokenizer).__name__)
        separate = values["num_levels"] > 1 and not visual_tokenizer.shared_codebook and token_ids is None
        values["separate_level_ranges"] = separate  # one id range per level unless the levels share a codebook
        values.update(self.layout_fields, token_ids=token_ids)
        if values.get("variable_size") and values["layout"] == "grid":
            grid, largest = values["grid_size"], [int(s) for s in (self.max_grid_size or values["grid_size"])]
            if grid[0] > largest[0] or grid[1] > largest[1]:
                raise ValueError(f"data.image_size={image_size} gives {grid[0]}x{grid[1]} id grids, larger than "
                                 f"model.image_vocab.max_grid_size {largest}")
            values["grid_size"] = largest
        return _in_section(lambda v: ImageLayout(**v), values)

    def _check_kind(self, kind: str, emitter: str) -> None:
        if self.layout == "sequence" and kind != "sequence":
            raise ValueError("model.image_vocab.layout: sequence needs a visual tokenizer that emits 1-D ids (a slot "
                             f"tokenizer); {emitter} emits 2-D id maps: use layout grid")
        if self.layout == "grid" and kind != "grid":
            raise ValueError(f"model.image_vocab.layout: grid needs 2-D id maps, but {emitter} emits 1-D slot ids: "
                             "use layout sequence (or auto)")


def _in_section(build, values: dict):
    """``build(values)``, its errors located in the recipe."""
    try:
        return build(values)
    except ValueError as error:
        raise ValueError(f"model.image_vocab: {error}") from None


def _user_layout_fields() -> list[str]:
    skipped = FROM_VISUAL_TOKENIZER + SPELLED_OTHERWISE
    return [f.name for f in dataclasses.fields(ImageLayout) if f.name not in skipped]


def image_vocab_recipe(model_section: dict) -> ImageVocabRecipe:
    """The typed ``image_vocab`` entry of an llm recipe's ``model`` section (defaults when absent)."""
    values = model_section.get("image_vocab") or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe section 'model.image_vocab' must be a mapping, got {type(values).__name__}")
    return ImageVocabRecipe(**values)


@dataclass
class Recipe:
    """A whole training stage.

    model: for ``tokenizer``, keyword arguments of ``VisualTokenizerConfig``; for ``llm``, ``base`` (a path to a
    pretrained causal LM, or null), ``config`` (keyword arguments of ``LlamaConfig`` for a model built from scratch)
    and ``image_vocab`` (the layout of the image tokens, :class:`ImageVocabRecipe`).
    visual_tokenizer: (``llm`` stage) path of the trained visual tokenizer to bridge to.
    init_from: (``tokenizer`` stage) a saved tokenizer to start from: its config updated by the ``model`` keys given
    here, and its weights wherever names and shapes still match (with ``train.freeze: [encoder, quantizer]``, a new
    decoder for the same image ids).
    lora: (``llm`` stage) train LoRA adapters + new token rows instead of the whole model.
    """

    stage: str
    output_dir: str
    model: dict = field(default_factory=dict)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    visual_tokenizer: Optional[str] = None
    init_from: Optional[str] = None
    lora: LoraRecipe = field(default_factory=LoraRecipe)
    adversarial: AdversarialRecipe = field(default_factory=AdversarialRecipe)
    perceptual: PerceptualRecipe = field(default_factory=PerceptualRecipe)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"recipe stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage == "llm" and not self.visual_tokenizer:
            raise ValueError("an llm recipe needs `visual_tokenizer:` (path of a trained visual tokenizer)")
        if self.init_from and self.stage != "tokenizer":
            raise ValueError(f"`init_from` (a saved tokenizer to start from) applies to the tokenizer stage; an "
                             f"{self.stage} recipe starts from model.base")
        if self.lora.enabled and self.stage != "llm":
            raise ValueError(f"`lora.enabled` applies to the llm stage only, not to stage {self.stage!r}")
        if self.stage == "llm" and isinstance(self.model, dict):
            image_vocab_recipe(self.model)  # unknown or invalid image_vocab keys fail before any training
        if self.stage != "tokenizer" and (self.adversarial.enabled or self.perceptual.backbone):
            raise ValueError(f"`adversarial` and `perceptual` apply to the tokenizer stage only, not to stage "
                             f"{self.stage!r}")
        weight = self.model.get("perceptual_weight", 0) if isinstance(self.model, dict) else 0
        if self.stage == "tokenizer" and weight and weight > 0 and not self.perceptual.backbone:
            raise ValueError(f"model.perceptual_weight={weight} needs perceptual.backbone: the local folder of a "
                             "Hugging Face vision model (no perceptual weights ship or download); or set "
                             "model.perceptual_weight=0")


def _check_keys(values: dict, fields, where: str, known=()) -> None:
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown recipe key(s) {unknown} in section {where!r}; known keys: "
                         f"{sorted({*fields, *known})}")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"recipe section {where!r} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(values, fields, where)
    kwargs = {}
    for name, value in values.items():
        sub = {DataRecipe: "data", TrainRecipe: "train", LoraRecipe: "lora", AdversarialRecipe: "adversarial",
               PerceptualRecipe: "perceptual"}
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
