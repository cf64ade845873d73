"""`UnifiedProcessor`: interleaved text + images -> ``input_ids``/``labels``; generated ids -> ``[str | PIL.Image]``.

Images are written into the token stream as spans (see :class:`~tokenizer_bridge.ImageVocab`), the early-fusion format
of Chameleon (Chameleon Team, 2024) and Emu3 (Wang et al., 2024). A text marks where an image goes with the
placeholder ``processor.image_token`` (``"<image>"``); the processor replaces each placeholder by the image's span.

It is a transformers processor: ``processor(text=x, images=...)`` is ``tokenizer(x)`` with the placeholders expanded,
keyword arguments merge as transformers merges them (:mod:`~tokenizer_bridge.processing_kwargs`), ``apply_chat_template``
takes ``{"type": "image"}`` content parts, and ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` keep the
chat template, the image vocabulary and the visual tokenizer. For training, ``target=`` is the part that gets the
loss: a sample is ``text + target`` (``text`` conditions, no loss; ``target`` gets the labels and the EOS)::

    captioning:     processor(text=["<image> caption:"], target=["a red circle"], images=[img])
    text-to-image:  processor(text=["draw: a red circle"], target=["<image>"], images=[img])
    plain LM:       processor(target=["a red circle <image>"], images=[img])          # everything is target
    generation:     processor(text=["draw: a red circle"], padding=True, padding_side="left", return_tensors="pt")

Images (or precomputed ``image_ids``) are consumed in reading order: sample 0's text, sample 0's target, sample 1's
text, ... when given as one flat list, or per sample when given as a list of lists.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin, Unpack

from .image_processing_visual_tokenizer import VisualTokenizerImageProcessor
from .interface import is_slot_tokenizer
from .interface import load_visual_tokenizer as open_visual_tokenizer  # ours or a wrapped Emu3/Janus/... VQ
from .modeling_visual_tokenizer import VisualTokenizer
from .processing_batch import PADDING_SIDES, Sample, image_span_length, pad_samples, padded_width, to_tensors
from .processing_decode import SpanDecodingMixin
from .processing_io import read_chat_template, read_json, resolve_folder, split_load_kwargs
from .processing_kwargs import (
    PROCESSOR_IMAGE_KWARGS,
    PROMPT_RENAMED,
    UnifiedProcessorKwargs,
    check_text_kwargs,
    content_parts_template,
)
from .vocab.image_vocab import ImageVocab
from .vocab.spans import check_budget, split_images

VISUAL_TOKENIZER_SUBFOLDER = "visual_tokenizer"
PROCESSOR_CONFIG_NAME = "processor_config.json"


class UnifiedProcessor(SpanDecodingMixin, ProcessorMixin):
    """Text tokenizer + image processor + :class:`ImageVocab` (+ optional :class:`VisualTokenizer`).

    Args:
        image_processor: a ``VisualTokenizerImageProcessor`` (PIL/arrays <-> ``pixel_values`` in [-1, 1]).
        tokenizer: the bridged text tokenizer (it holds ``<boi>``, ``<eoi>``, ``<eol>``, ``<img_k>``).
        image_vocab: where image ids live in the tokenizer's vocabulary.
        visual_tokenizer: needed only to encode raw images or decode image spans to pixels; data pipelines that
            pass precomputed ``image_ids`` can leave it out. A grid tokenizer (``VisualTokenizer``, a wrapped
            pretrained VQ) or a :class:`~tokenizer_bridge.SlotTokenizer` (sequence layout, optionally with token
            budgets: images are encoded into ``budget`` slots and spans decode with their own budget).
        padding_side: default padding side, ``"right"`` (training) or ``"left"`` (batched generation); None: the
            tokenizer's ``padding_side``. A ``padding_side=`` of the call wins over both.
        chat_template: the processor's chat template (a Jinja string or ``{name: template}``); None: the
            tokenizer's, with image content parts written as ``<image>`` placeholders (:meth:`apply_chat_template`).
        allow_missing_fingerprint: accept a visual tokenizer with an ``image_vocab`` that records no fingerprint
            (refused by default: nothing would show that the ids come from its codebook).
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        image_vocab: ImageVocab,
        visual_tokenizer: Optional[VisualTokenizer] = None,
        padding_side: Optional[str] = None,
        chat_template: Optional[Union[str, dict]] = None,
        allow_missing_fingerprint: bool = False,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_vocab = image_vocab
        self.visual_tokenizer = visual_tokenizer
        self.padding_side = padding_side  # checked by the setter
        self.allow_missing_fingerprint = allow_missing_fingerprint
        self.validate()

    @property
    def padding_side(self) -> str:
        """The side this processor pads on: its own ``padding_side``, else the tokenizer's (``"right"`` if neither)."""
        return self._padding_side or getattr(self.tokenizer, "padding_side", None) or "right"

    @padding_side.setter
    def padding_side(self, side: Optional[str]) -> None:
        if side is not None and side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES} or None, got {side!r}")
        self._padding_side = side

    @classmethod
    def get_attributes(cls) -> list[str]:
        # ProcessorMixin infers sub-processors from __init__ parameter names containing "tokenizer": that would
        # wrongly treat `visual_tokenizer` (a model) as a second text tokenizer.
        return ["image_processor", "tokenizer"]

    def validate(self) -> None:
        """Check that the tokenizer and visual tokenizer are the ones ``image_vocab`` was made for (also the grid
        size, against the image processor's output size when it resizes)."""
        self.image_vocab.check_tokenizer(self.tokenizer)
        if self.visual_tokenizer is not None:
            size = getattr(self.image_processor, "size", None)
            fixed = getattr(self.image_processor, "resize_mode", "none") != "none" and isinstance(size, dict)
            self.image_vocab.check_visual_tokenizer(
                self.visual_tokenizer, (size["height"], size["width"]) if fixed else None,
                allow_missing_fingerprint=self.allow_missing_fingerprint)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"]

    # ------------------------------------------------------------------ encoding
    @property
    def image_token(self) -> str:
        """The placeholder a text marks an image with (transformers' name; ``image_vocab.image_placeholder``)."""
        return self.image_vocab.image_placeholder

    @property
    def placeholder(self) -> str:
        """The name :attr:`image_token` had before (kept for callers)."""
        return self.image_token

    @property
    def image_token_id(self) -> int:
        """The id that opens every image span (``<boi>``); the span's own ids are the image vocabulary's."""
        return self.image_vocab.boi_token_id

    def __call__(
        self,
        images: Any = None,
        text: Union[str, Sequence[str], None] = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs: Unpack[UnifiedProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize texts, expanding every ``<image>`` placeholder into its image span.

        ``processor(text=x, images=...)`` is ``tokenizer(x)`` with each placeholder replaced by its image's span:
        ``input_ids`` and ``attention_mask``, no labels. For training, ``target=`` is the part that gets the loss:
        a sample is ``text + target`` (``text`` conditions, ``target`` is the label, EOS appended)::

            captioning:     processor(text=["<image> caption:"], target=["a red circle"], images=[img])
            text-to-image:  processor(text=["draw: a red circle"], target=["<image>"], images=[img])
            plain LM:       processor(target=["a red circle <image>"], images=[img])      # everything is target
            generation:     processor(text=["draw: a red circle"], padding=True, padding_side="left")

        Keyword arguments merge as in every transformers processor (flat, ``text_kwargs`` / ``images_kwargs``,
        ``common_kwargs``; defaults from the tokenizer's init kwargs): ``padding`` (default False),
        ``max_length``, ``pad_to_multiple_of``, ``padding_side`` (default: the processor's, else the tokenizer's),
        ``add_special_tokens``, ``return_tensors`` (default None: lists), ``return_attention_mask``,
        ``return_mm_token_type_ids``; the image processor's settings for raw images; and ours
        (:mod:`~tokenizer_bridge.processing_kwargs`): ``target``, ``image_ids``, ``add_eos``, ``return_loss_masks``,
        ``budget``, ``return_pixel_values``. Sequences are never truncated (cutting an image span would corrupt it):
        a sample longer than ``max_length`` is refused.

        Args:
            images: raw images (PIL / arrays / tensors) for the placeholders, a flat list in reading order or one list
                per sample; encoded with the visual tokenizer.
            text: the text of each sample (the conditioning part when ``target`` is given).
            target: the target part of each sample (gets the loss and the EOS).
            image_ids: precomputed image ids instead of ``images``: a tensor ``(n, h, w)`` (or ``(n, N)``; with a
                trailing level axis ``L`` for residual vocabularies), a list of per-image tensors (variable-size
                grids: each its own ``(h, w)``), or one such list per sample.
            return_loss_masks: also return ``image_token_mask`` (positions inside any image span, <boi>..<eoi>),
                ``text_loss_mask`` and ``image_loss_mask`` (target positions outside / inside image spans; together
                they are exactly ``labels != -100``).
            budget: slot tokenizers: the token budget raw ``images`` are encoded with (one of the vocabulary's
                ``budgets``; default: the full budget ``image_vocab.num_tokens``).

        Returns:
            ``BatchFeature`` with ``input_ids``, ``attention_mask``, ``labels`` (only with ``target``; -100 on the
            text part and padding), the optional masks and ``pixel_values`` (with ``return_pixel_values``).
        """
        if "prompt" in kwargs:
            raise TypeError(PROMPT_RENAMED)
        if videos is not None or audio is not None:
            raise ValueError("UnifiedProcessor takes text and images only: videos= and audio= must be None")
        if _is_text(images) and text is None:  # processor("a <image>", ...): text given first, as tokenizers take it
            images, text = None, images
        merged = self._merge_kwargs(UnifiedProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs,
                                    **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        check_text_kwargs(text_kwargs)
        target, image_ids = merged.get("target"), merged.get("image_ids")
        return_tensors = text_kwargs.get("return_tensors", images_kwargs.get("return_tensors"))
        texts, targets = self._as_batch(text, target)
        counts = [_count(p, self.placeholder) + _count(t, self.placeholder) for p, t in zip(texts, targets)]
        image_options = {k: v for k, v in images_kwargs.items() if k not in PROCESSOR_IMAGE_KWARGS}
        spans, pixel_values = self._image_spans(images, image_ids, counts, images_kwargs.get("budget"), image_options,
                                                keep_pixels=bool(images_kwargs.get("return_pixel_values")))
        segments = self._tokenize_segments(texts + targets)
        add_special = text_kwargs.get("add_special_tokens", True) is not False
        prefix, suffix = self._special_affixes() if add_special else ([], [])
        eos = self._eos_ids(text_kwargs.get("add_eos"), has_target=target is not None)
        if target is not None:
            suffix = []  # a training target ends with the EOS the processor adds itself
        samples = [self._build_sample(p, t, s, segments, prefix, eos + suffix)
                   for p, t, s in zip(texts, targets, spans)]
        width = padded_width(samples, text_kwargs.get("padding", False), text_kwargs.get("max_length"),
                             text_kwargs.get("pad_to_multiple_of"), text_kwargs.get("truncation"))
        # a side passed in the call wins; then the processor's own; then the tokenizer's (which _merge_kwargs put in)
        asked = kwargs.get("padding_side") or (kwargs.get("text_kwargs") or {}).get("padding_side")
        side = asked or self._padding_side or text_kwargs.get("padding_side") or self.padding_side
        data = pad_samples(samples, width, side, self._pad_id(), with_labels=target is not None,
                           masks=bool(text_kwargs.get("return_loss_masks")),
                           attention_mask=text_kwargs.get("return_attention_mask", True) is not False,
                           mm_token_type_ids=bool(merged.get("return_mm_token_type_ids")))
        data = to_tensors(data, return_tensors)
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data=data, tensor_type=return_tensors if pixel_values is not None else None)

    @staticmethod
    def _as_batch(text, target) -> tuple[list[Optional[str]], list[Optional[str]]]:
        if text is None and target is None:
            raise ValueError("pass text= (the text to tokenize; the conditioning part when a target is given) and/or "
                             "target= (the training target, which gets the loss)")
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        targets = [target] if isinstance(target, str) else (None if target is None else list(target))
        for name, values in (("text", texts), ("target", targets)):
            if values is not None and not all(v is None or isinstance(v, str) for v in values):
                raise ValueError(f"{name}= must be a string or a list of strings")
        if texts is not None and targets is not None and len(texts) != len(targets):
            raise ValueError(f"got {len(texts)} texts but {len(targets)} targets: pass one text per target")
        size = len(texts if texts is not None else targets)
        return texts or [None] * size, targets or [None] * size

    def _image_spans(self, images, image_ids, counts: list[int], budget: Optional[int] = None,
                     image_options: Optional[dict] = None, keep_pixels: bool = False
                     ) -> tuple[list[list[torch.Tensor]], Optional[torch.Tensor]]:
        """One list of image spans per sample, checked against the number of placeholders (and the preprocessed
        pixels of raw images when ``keep_pixels``)."""
        if images is not None and image_ids is not None:
            raise ValueError("pass either images= or image_ids=, not both")
        if budget is not None and images is None:
            raise ValueError("budget= applies to raw images= (precomputed image_ids carry their own token count)")
        if keep_pixels and images is None:
            raise ValueError("return_pixel_values=True needs raw images= (image_ids= carry no pixels)")
        source = images if images is not None else image_ids
        if source is None:
            if sum(counts):
                raise ValueError(
                    f"the batch has {sum(counts)} {self.placeholder} placeholders but no images= or image_ids= "
                    "were given"
                )
            return [[] for _ in counts], None
        groups = self._group(source, counts, raw=images is not None)
        flat, pixel_values = [item for group in groups for item in group], None
        if images is not None and flat:
            options = self._encode_options(budget)  # refuses (no visual tokenizer, a bad budget) before preprocessing
            pixel_values = self.preprocess_images(flat, **(image_options or {}))
            flat = list(self._encode(pixel_values, options))
        spans = iter([self.image_vocab.build_span(self._one_image_ids(ids)) for ids in flat])
        return [[next(spans) for _ in group] for group in groups], pixel_values if keep_pixels else None

    def _group(self, source, counts: list[int], raw: bool) -> list[list[Any]]:
        """Split ``source`` (flat or per sample) into one list per sample, checking the placeholder counts."""
        what = "images" if raw else "image_ids"
        if isinstance(source, (list, tuple)) and source and all(isinstance(g, (list, tuple)) for g in source):
            if len(source) != len(counts):
                raise ValueError(f"{what} has {len(source)} per-sample lists but the batch has {len(counts)} samples")
            for i, (group, count) in enumerate(zip(source, counts)):
                if len(group) != count:
                    raise ValueError(
                        f"sample {i} has {count} {self.placeholder} placeholders but {len(group)} {what} were given "
                        "for it"
                    )
            return [list(g) for g in source]
        flat = self._flatten_images(source) if raw else split_images(self.image_vocab, source)
        if len(flat) != sum(counts):
            raise ValueError(
                f"the batch has {sum(counts)} {self.placeholder} placeholders but {len(flat)} {what} were given"
            )
        starts = np.cumsum([0] + counts)
        return [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]

    @staticmethod
    def _flatten_images(images) -> list[Any]:
        if isinstance(images, (np.ndarray, torch.Tensor)):
            return [images] if images.ndim == 3 else list(images)  # one (H, W, C)/(C, H, W) image or a batch
        return list(images) if isinstance(images, (list, tuple)) else [images]

    def _one_image_ids(self, image_ids) -> torch.Tensor:
        image_ids = torch.as_tensor(image_ids)
        if image_ids.is_floating_point():
            raise ValueError(f"image_ids must be integers, got dtype {image_ids.dtype} (did you pass pixel_values?)")
        return image_ids.cpu()

    def _tokenize_segments(self, parts: list[Optional[str]]) -> dict[str, list[int]]:
        """Token ids of every distinct text segment between placeholders, tokenized without special tokens."""
        segments = sorted({seg for part in parts if part for seg in part.split(self.placeholder) if seg})
        if not segments:
            return {}
        encoded = self.tokenizer(segments, add_special_tokens=False)["input_ids"]
        for segment, ids in zip(segments, encoded):
            ids_t = torch.tensor(ids, dtype=torch.long)
            if (self.image_vocab.is_span_only_token(ids_t) | (ids_t == self.image_vocab.boi_token_id)).any():
                raise ValueError(
                    f"text {segment!r} tokenizes to image-vocabulary tokens (<boi>/<eoi>/<eol>/<img_k>/size "
                    f"tokens): write images as {self.placeholder} placeholders and pass images= or image_ids="
                )
        return dict(zip(segments, encoded))

    def _special_affixes(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text (usually just BOS before), found by probing
        it, so that ``processor(text=x)`` gives ``tokenizer(x)`` for a text without images."""
        probe = "a"
        with_special = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        plain = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start : start + len(plain)] == plain:
                return list(with_special[:start]), list(with_special[start + len(plain):])
        return [], []

    def _eos_ids(self, add_eos: Optional[bool], has_target: bool) -> list[int]:
        if add_eos is None:
            add_eos = has_target and self.tokenizer.eos_token_id is not None
        if not add_eos:
            return []
        if self.tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token")
        return [self.tokenizer.eos_token_id]

    def _build_sample(self, prompt, text, spans, segments, prefix, eos) -> Sample:
        sample, spans = Sample(), iter(spans)
        sample.extend(prefix, is_target=False, is_image=False)
        for part, is_target in ((prompt, False), (text, True)):
            if part is None:
                continue
            for k, segment in enumerate(part.split(self.placeholder)):
                if k:
                    sample.extend(next(spans).tolist(), is_target, is_image=True)
                if segment:
                    sample.extend(segments[segment], is_target, is_image=False)
        sample.extend(eos, is_target=True, is_image=False)
        return sample

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return candidate
        return 0  # any id works: padding is masked out of attention and loss

    def encode_images(self, images, budget: Optional[int] = None) -> torch.LongTensor:
        """Raw images -> image ids ``(n, h, w)`` (grid tokenizers) or ``(n, budget[, L])`` (slot tokenizers) with the
        image processor and the visual tokenizer.

        ``budget`` (slot tokenizers only) is one of the vocabulary's token budgets; default: the full budget
        ``image_vocab.num_tokens``.
        """
        options = self._encode_options(budget)  # refuses before preprocessing
        return self._encode(self.preprocess_images(images), options)

    def preprocess_images(self, images, **options) -> torch.Tensor:
        """Raw images -> ``pixel_values`` ``(n, 3, H, W)`` with the image processor (``options``: its settings)."""
        return torch.as_tensor(self.image_processor.preprocess(images, return_tensors="pt", **options)["pixel_values"])

    def encode_pixel_values(self, pixel_values: torch.Tensor, budget: Optional[int] = None) -> torch.LongTensor:
        """``pixel_values`` -> image ids with the visual tokenizer (see :meth:`encode_images`)."""
        return self._encode(pixel_values, self._encode_options(budget))

    def _encode(self, pixel_values: torch.Tensor, options: dict) -> torch.LongTensor:
        vt = self.visual_tokenizer
        return vt.encode(pixel_values.to(vt.device, vt.dtype), **options).cpu()

    def _encode_options(self, budget: Optional[int]) -> dict:
        if self.visual_tokenizer is None:
            raise ValueError(
                "this UnifiedProcessor has no visual tokenizer, so it cannot encode raw images: pass image_ids= "
                "(precomputed with VisualTokenizer.encode) or build the processor with visual_tokenizer="
            )
        vt, options = self.visual_tokenizer, {}
        if is_slot_tokenizer(vt):
            options["num_slots"] = self.check_budget(budget)
        elif budget is not None:
            raise ValueError(f"budget= applies to slot tokenizers (learned queries); {type(vt).__name__} gives a "
                             "fixed number of ids per image")
        return options

    def check_budget(self, budget: Optional[int] = None) -> int:
        """The token budget to encode with: ``budget`` checked against the vocabulary's budgets, or the full one."""
        return check_budget(self.image_vocab, budget)

    # ------------------------------------------------------------------ chat, counts, post-processing
    def apply_chat_template(self, conversation, chat_template: Optional[str] = None, **kwargs):
        """transformers' ``apply_chat_template`` (``tokenize`` or not, ``return_dict``, batches), where
        ``{"type": "image", "image": ...}`` content parts become image spans. Without a chat template of its own the
        processor uses its tokenizer's, with list contents written as text with ``<image>`` placeholders, so a
        text-only conversation renders exactly as ``tokenizer.apply_chat_template`` renders it."""
        if chat_template is None and self.chat_template is None:
            template = getattr(self.tokenizer, "chat_template", None)
            if isinstance(template, dict):
                template = template.get("default")
            if not template:
                raise ValueError("neither the processor nor its tokenizer has a chat template: pass chat_template= "
                                 "or set processor.chat_template")
            chat_template = content_parts_template(template, self.image_token)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _get_num_multimodal_tokens(self, image_sizes: Optional[Sequence] = None, **kwargs) -> MultiModalData:
        """How many tokens the span of an image of each ``(height, width)`` in ``image_sizes`` takes (vLLM's and
        transformers' processor protocol); ``kwargs``: the image processor's settings."""
        if image_sizes is None:
            return MultiModalData()
        counts = [image_span_length(self, int(h), int(w), **kwargs) for h, w in image_sizes]
        return MultiModalData(num_image_tokens=counts, num_image_patches=[1] * len(counts))

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        # ProcessorMixin.to_dict deep-copies every attribute named in __init__ (the visual tokenizer's weights
        # included) and cannot serialise ImageVocab; both are saved in their own files instead.
        out = {
            "processor_class": type(self).__name__,
            "image_processor": self.image_processor.to_dict(),
            "padding_side": self._padding_side,
            "own_chat_template": self.chat_template is not None,
        }
        if getattr(self, "auto_map", None):
            out["auto_map"] = self.auto_map
        return out

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False,
                        **kwargs) -> list[str]:
        """Write tokenizer files, processor_config.json, the chat template, preprocessor_config.json,
        image_vocab.json and ``visual_tokenizer/`` (config.json + model.safetensors) into ``save_directory``; with
        ``push_to_hub`` upload them all, after every file is written (``repo_id``, ``token``, ``commit_message``...
        as in transformers)."""
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        if push_to_hub:
            commit_message = kwargs.pop("commit_message", None)
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            token = kwargs.get("token")
            repo_id = self._create_repo(repo_id, **{k: v for k, v in kwargs.items() if k in ("token", "private")})
            timestamps = self._get_files_timestamps(save_directory)
        files = super().save_pretrained(save_directory)
        files += self.image_processor.save_pretrained(save_directory)
        files.append(self.image_vocab.save_pretrained(save_directory))
        if self.visual_tokenizer is not None:
            self.visual_tokenizer.save_pretrained(os.path.join(save_directory, VISUAL_TOKENIZER_SUBFOLDER))
        if push_to_hub:
            self._upload_modified_files(save_directory, repo_id, timestamps, commit_message=commit_message,
                                        token=token)
        return files

    @staticmethod
    def _create_repo(repo_id: str, **kwargs) -> str:
        from transformers.utils.hub import hf_api

        return hf_api().create_repo(repo_id, exist_ok=True, **kwargs).repo_id

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        visual_tokenizer: Optional[VisualTokenizer] = None,
        load_visual_tokenizer: bool = True,
        allow_missing_fingerprint: bool = False,
        **kwargs,
    ) -> "UnifiedProcessor":
        """Load a processor saved by :meth:`save_pretrained` from a folder or a Hub repository, and validate it.

        Load-time keywords go where transformers sends them: the image processor's settings (``do_normalize=``,
        ``size=``...) to it, ``padding_side=`` / ``chat_template=`` to the processor, the rest (``cls_token=``,
        ``trust_remote_code=``...) to ``AutoTokenizer.from_pretrained``; Hub keywords (``revision=``...) to all.
        The chat template saved beside the processor is loaded. The visual tokenizer comes from
        ``visual_tokenizer/`` unless one is passed (or ``load_visual_tokenizer`` is False). Refuses a tokenizer whose
        image tokens are not where image_vocab.json says, and a visual tokenizer whose fingerprint is not the one
        image_vocab.json was made for, or none is recorded (unless ``allow_missing_fingerprint``).
        """
        directory = resolve_folder(pretrained_model_name_or_path, **kwargs)
        own, image_kwargs, tokenizer_kwargs = split_load_kwargs(kwargs, VisualTokenizerImageProcessor)
        tokenizer = AutoTokenizer.from_pretrained(directory, **tokenizer_kwargs)
        image_processor = VisualTokenizerImageProcessor.from_pretrained(directory, **image_kwargs)
        vocab = ImageVocab.from_pretrained(directory)
        config = read_json(os.path.join(directory, PROCESSOR_CONFIG_NAME))
        subfolder = os.path.join(directory, VISUAL_TOKENIZER_SUBFOLDER)
        if visual_tokenizer is None and load_visual_tokenizer and os.path.isdir(subfolder):
            visual_tokenizer = open_visual_tokenizer(subfolder)
        try:
            return cls(
                image_processor,
                tokenizer,
                vocab,
                visual_tokenizer=visual_tokenizer,
                padding_side=own.get("padding_side", config.get("padding_side")),
                chat_template=own.get("chat_template", _own_template(read_chat_template(directory), tokenizer,
                                                                       config)),
                allow_missing_fingerprint=allow_missing_fingerprint,
            )
        except ValueError as error:
            raise ValueError(f"refusing to load the processor in {directory}: {error}") from None


def _count(part: Optional[str], placeholder: str) -> int:
    return part.count(placeholder) if part else 0


def _own_template(template, tokenizer, config: dict):
    """The saved chat template, unless it is the tokenizer's (transformers writes one chat_template.jinja for both):
    then None, and the processor wraps the tokenizer's so that image parts become placeholders. processor_config.json
    says which (``own_chat_template``); folders saved before it said are judged by equality with the tokenizer's."""
    if "own_chat_template" in config:
        return template if config["own_chat_template"] else None
    return None if template is not None and template == getattr(tokenizer, "chat_template", None) else template


def _is_text(value) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                      and all(isinstance(v, str) for v in value))
