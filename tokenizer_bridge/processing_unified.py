"""`UnifiedProcessor`: interleaved text + images -> ``input_ids``/``labels``; generated ids -> ``[str | PIL.Image]``.

Images are written into the token stream as spans (see :class:`~tokenizer_bridge.ImageVocab`), the early-fusion format
of Chameleon (Chameleon Team, 2024) and Emu3 (Wang et al., 2024). A text marks where an image goes with the
placeholder ``vocab.image_placeholder`` (``"<image>"``); the processor replaces each placeholder by the image's span.

Training convention: a sample is ``prompt + text``. The ``prompt`` conditions and gets no loss; ``text`` is the
target and gets the loss (plus the EOS appended after it)::

    captioning:     processor(prompt=["<image> caption:"], text=["a red circle"], images=[img])
    text-to-image:  processor(prompt=["draw: a red circle"], text=["<image>"], images=[img])
    plain LM:       processor(text=["a red circle <image>"], images=[img])          # everything is target
    generation:     processor(prompt=["draw: a red circle"], padding_side="left")   # no labels, no EOS

Images (or precomputed ``image_ids``) are consumed in reading order: sample 0's prompt, sample 0's text, sample 1's
prompt, ... when given as one flat list, or per sample when given as a list of lists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_visual_tokenizer import VisualTokenizerImageProcessor
from .interface import is_slot_tokenizer
from .interface import load_visual_tokenizer as open_visual_tokenizer  # ours or a wrapped Emu3/Janus/... VQ
from .modeling_visual_tokenizer import VisualTokenizer
from .vocab.image_vocab import ImageVocab
from .vocab.pieces import IGNORE_INDEX, one_sequence, split_input_ids
from .vocab.spans import check_budget, split_images

VISUAL_TOKENIZER_SUBFOLDER = "visual_tokenizer"
PROCESSOR_CONFIG_NAME = "processor_config.json"
PADDING_SIDES = ("left", "right")
# from_pretrained kwargs that AutoProcessor forwards and that mean something to AutoTokenizer
_TOKENIZER_LOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "trust_remote_code")


@dataclass
class _Sample:
    """One tokenized sample before padding: token ids plus, per position, 'is target' and 'is inside an image'."""

    ids: list[int] = field(default_factory=list)
    target: list[bool] = field(default_factory=list)
    image: list[bool] = field(default_factory=list)

    def extend(self, tokens: Sequence[int], is_target: bool, is_image: bool) -> None:
        self.ids.extend(int(t) for t in tokens)
        self.target.extend([is_target] * len(tokens))
        self.image.extend([is_image] * len(tokens))


class UnifiedProcessor(ProcessorMixin):
    """Text tokenizer + image processor + :class:`ImageVocab` (+ optional :class:`VisualTokenizer`).

    Args:
        image_processor: a ``VisualTokenizerImageProcessor`` (PIL/arrays <-> ``pixel_values`` in [-1, 1]).
        tokenizer: the bridged text tokenizer (it holds ``<boi>``, ``<eoi>``, ``<eol>``, ``<img_k>``).
        image_vocab: where image ids live in the tokenizer's vocabulary.
        visual_tokenizer: needed only to encode raw images or decode image spans to pixels; data pipelines that
            pass precomputed ``image_ids`` can leave it out. A grid tokenizer (``VisualTokenizer``, a wrapped
            pretrained VQ) or a :class:`~tokenizer_bridge.SlotTokenizer` (sequence layout, optionally with token
            budgets: images are encoded into ``budget`` slots and spans decode with their own budget).
        padding_side: default padding side, ``"right"`` (training) or ``"left"`` (batched generation).
        allow_missing_fingerprint: accept a visual tokenizer with an ``image_vocab`` that records no fingerprint
            (refused by default: nothing would show that the ids come from its codebook).
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        image_vocab: ImageVocab,
        visual_tokenizer: Optional[VisualTokenizer] = None,
        padding_side: str = "right",
        chat_template: Optional[str] = None,
        allow_missing_fingerprint: bool = False,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        self.image_vocab = image_vocab
        self.visual_tokenizer = visual_tokenizer
        self.padding_side = padding_side
        self.allow_missing_fingerprint = allow_missing_fingerprint
        self.validate()

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
    def __call__(
        self,
        text: Union[str, Sequence[str], None] = None,
        *,
        prompt: Union[str, Sequence[str], None] = None,
        images: Any = None,
        image_ids: Any = None,
        padding: Union[bool, str] = True,
        max_length: Optional[int] = None,
        padding_side: Optional[str] = None,
        add_special_tokens: bool = True,
        add_eos: Optional[bool] = None,
        return_tensors: Optional[str] = "pt",
        return_loss_masks: bool = False,
        budget: Optional[int] = None,
    ) -> BatchFeature:
        """Tokenize ``prompt + text`` samples, expanding every ``<image>`` placeholder into its image span.

        Args:
            text: the target part of each sample (gets the loss), or ``None`` for prompt-only (generation) inputs.
            prompt: the conditioning part of each sample (no loss); ``None`` means no prompt.
            images: raw images (PIL / arrays) for the placeholders, a flat list in reading order or one list per
                sample; encoded with the visual tokenizer.
            image_ids: precomputed image ids instead of ``images``: a tensor ``(n, h, w)`` (or ``(n, N)``; with a
                trailing level axis ``L`` for residual vocabularies), a list of per-image tensors (variable-size
                grids: each its own ``(h, w)``), or one such list per sample.
            padding: ``True``/``"longest"``, ``"max_length"`` (needs ``max_length``) or ``False``. Sequences are
                never truncated: cutting an image span would corrupt it.
            padding_side: ``"left"`` or ``"right"``; defaults to ``self.padding_side``.
            add_special_tokens: put the tokenizer's own leading special tokens (BOS) once at the sequence start.
                Text between image spans is tokenized without special tokens.
            add_eos: append EOS after the target; defaults to ``True`` when ``text`` is given.
            return_tensors: ``"pt"``, ``"np"`` or ``None`` (lists).
            return_loss_masks: also return ``image_token_mask`` (positions inside any image span, <boi>..<eoi>),
                ``text_loss_mask`` and ``image_loss_mask`` (target positions outside / inside image spans; together
                they are exactly ``labels != -100``).
            budget: slot tokenizers: the token budget raw ``images`` are encoded with (one of the vocabulary's
                ``budgets``; default: the full budget ``image_vocab.num_tokens``). Precomputed ``image_ids`` carry
                their own count.

        Returns:
            ``BatchFeature`` with ``input_ids``, ``attention_mask``, ``labels`` (only when ``text`` is given; -100 on
            the prompt and padding) and the optional masks.
        """
        prompts, texts = self._as_batch(prompt, text)
        counts = [_count(p, self.placeholder) + _count(t, self.placeholder) for p, t in zip(prompts, texts)]
        spans = self._image_spans(images, image_ids, counts, budget)
        segments = self._tokenize_segments(prompts + texts)
        prefix = self._special_prefix() if add_special_tokens else []
        eos = self._eos_ids(add_eos, has_target=text is not None)
        samples = [
            self._build_sample(p, t, s, segments, prefix, eos) for p, t, s in zip(prompts, texts, spans)
        ]
        side = padding_side or self.padding_side
        data = self._pad(samples, padding, max_length, side, with_labels=text is not None, masks=return_loss_masks)
        return BatchFeature(data=_convert(data, return_tensors))

    @property
    def placeholder(self) -> str:
        return self.image_vocab.image_placeholder

    @staticmethod
    def _as_batch(prompt, text) -> tuple[list[Optional[str]], list[Optional[str]]]:
        if prompt is None and text is None:
            raise ValueError("pass text= (the target part, which gets the loss) and/or prompt= (the conditioning)")
        prompts = [prompt] if isinstance(prompt, str) else (None if prompt is None else list(prompt))
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        if prompts is not None and texts is not None and len(prompts) != len(texts):
            raise ValueError(f"got {len(prompts)} prompts but {len(texts)} texts: pass one prompt per text")
        size = len(prompts if prompts is not None else texts)
        return prompts or [None] * size, texts or [None] * size

    def _image_spans(self, images, image_ids, counts: list[int], budget: Optional[int] = None
                     ) -> list[list[torch.Tensor]]:
        """One list of image spans per sample, checked against the number of placeholders."""
        if images is not None and image_ids is not None:
            raise ValueError("pass either images= or image_ids=, not both")
        if budget is not None and images is None:
            raise ValueError("budget= applies to raw images= (precomputed image_ids carry their own token count)")
        source = images if images is not None else image_ids
        if source is None:
            if sum(counts):
                raise ValueError(
                    f"the batch has {sum(counts)} {self.placeholder} placeholders but no images= or image_ids= "
                    "were given"
                )
            return [[] for _ in counts]
        groups = self._group(source, counts, raw=images is not None)
        flat = [item for group in groups for item in group]
        if images is not None:
            flat = list(self.encode_images(flat, budget=budget)) if flat else []
        spans = iter([self.image_vocab.build_span(self._one_image_ids(ids)) for ids in flat])
        return [[next(spans) for _ in group] for group in groups]

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

    def _special_prefix(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (usually just BOS), found by probing it."""
        probe = "a"
        with_special = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        plain = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start : start + len(plain)] == plain:
                return list(with_special[:start])
        return []

    def _eos_ids(self, add_eos: Optional[bool], has_target: bool) -> list[int]:
        if add_eos is None:
            add_eos = has_target and self.tokenizer.eos_token_id is not None
        if not add_eos:
            return []
        if self.tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token")
        return [self.tokenizer.eos_token_id]

    def _build_sample(self, prompt, text, spans, segments, prefix, eos) -> _Sample:
        sample, spans = _Sample(), iter(spans)
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

    def _pad(self, samples: list[_Sample], padding, max_length, side, with_labels, masks) -> dict[str, list]:
        if side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {side!r}")
        longest = max(len(s.ids) for s in samples)
        if padding == "max_length":
            if max_length is None:
                raise ValueError('padding="max_length" needs max_length=')
            if longest > max_length:
                raise ValueError(f"a sample has {longest} tokens, more than max_length={max_length} (no truncation)")
            width = max_length
        elif padding in (True, "longest"):
            width = longest
        elif padding in (False, "do_not_pad"):
            width = None
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        columns = {"input_ids": [], "attention_mask": []}
        if with_labels:
            columns["labels"] = []
        if masks:
            columns.update(image_token_mask=[], text_loss_mask=[], image_loss_mask=[])
        for s in samples:
            n = len(s.ids)
            rows = {
                "input_ids": (s.ids, self._pad_id()),
                "attention_mask": ([1] * n, 0),
                "labels": ([i if t else IGNORE_INDEX for i, t in zip(s.ids, s.target)], IGNORE_INDEX),
                "image_token_mask": (s.image, False),
                "text_loss_mask": ([t and not m for t, m in zip(s.target, s.image)], False),
                "image_loss_mask": ([t and m for t, m in zip(s.target, s.image)], False),
            }
            for name in columns:
                values, fill = rows[name]
                pad = [fill] * ((width or n) - n)
                columns[name].append(pad + values if side == "left" else values + pad)
        return columns

    def encode_images(self, images, budget: Optional[int] = None) -> torch.LongTensor:
        """Raw images -> image ids ``(n, h, w)`` (grid tokenizers) or ``(n, budget[, L])`` (slot tokenizers) with the
        image processor and the visual tokenizer.

        ``budget`` (slot tokenizers only) is one of the vocabulary's token budgets; default: the full budget
        ``image_vocab.num_tokens``.
        """
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
        pixel_values = torch.as_tensor(self.image_processor.preprocess(images)["pixel_values"])  # (n, 3, H, W)
        return vt.encode(pixel_values.to(vt.device, vt.dtype), **options).cpu()

    def check_budget(self, budget: Optional[int] = None) -> int:
        """The token budget to encode with: ``budget`` checked against the vocabulary's budgets, or the full one."""
        return check_budget(self.image_vocab, budget)

    # ------------------------------------------------------------------ decoding
    def decode(self, input_ids, lenient: bool = False, skip_special_tokens: bool = True, repair: bool = False,
               decode_kwargs: Optional[dict] = None) -> list:
        """One sequence -> ``[str | PIL.Image]`` in order (text segments and decoded image spans).

        A malformed image span raises :class:`MalformedImageSpanError` naming the problem. With ``lenient=True`` it
        becomes the string ``"[malformed image: <reason>]"`` and stray image tokens outside spans are dropped. With
        ``repair=True`` (implies ``lenient``) it is repaired instead (:meth:`ImageVocab.repair_span`: missing ids
        filled, extra ones dropped, ``<eoi>`` added) and the image is preceded by the string
        ``"[repaired image: <what was done>]"``; a span that cannot be repaired is marked as malformed.
        ``decode_kwargs`` go to the visual tokenizer's ``decode`` (e.g. ``steps`` and ``generator`` of a diffusion
        decoder). A budgeted span decodes with its own budget (its number of slots).

        ``input_ids`` may be ``labels``: every ``-100`` is skipped. Ids that are no token -- not integers, negative,
        or ``>= len(tokenizer)`` -- raise ``ValueError`` in every mode (see
        :func:`~tokenizer_bridge.vocab.pieces.one_sequence`).
        """
        pieces = split_input_ids(self.image_vocab, self._one_sequence(input_ids), lenient, repair)
        image_ids = [value for kind, value in pieces if kind == "image"]
        pictures = iter(self.image_ids_to_images(image_ids, **(decode_kwargs or {})) if image_ids else [])
        out = []
        for kind, value in pieces:
            if kind == "text":
                decoded = self.tokenizer.decode(value, skip_special_tokens=skip_special_tokens)
                if decoded.strip():
                    out.append(decoded)
            elif kind == "image":
                out.append(next(pictures))
            elif kind == "repaired":
                out.append(f"[repaired image: {'; '.join(value)}]")
            else:
                out.append(f"[malformed image: {value}]")
        return out

    def batch_decode(self, sequences, lenient: bool = False, skip_special_tokens: bool = True,
                     repair: bool = False, decode_kwargs: Optional[dict] = None) -> list[list]:
        """:meth:`decode` for each sequence of a batch (a ``(B, L)`` tensor or array, or a list of sequences)."""
        if isinstance(sequences, (torch.Tensor, np.ndarray)) and sequences.ndim != 2:
            raise ValueError(f"batch_decode takes a batch (B, L), got shape {tuple(sequences.shape)}: use decode "
                             "for one sequence")
        if not isinstance(sequences, (torch.Tensor, np.ndarray, list, tuple)):
            raise ValueError(f"batch_decode takes a batch of sequences, got {type(sequences).__name__}")
        return [self.decode(seq, lenient=lenient, skip_special_tokens=skip_special_tokens, repair=repair,
                            decode_kwargs=decode_kwargs) for seq in sequences]

    def decode_image_ids(self, input_ids, lenient: bool = False, repair: bool = False) -> list[torch.LongTensor]:
        """The image ids (``(h, w)``/``(N,)``, with a trailing level axis for residual vocabularies) of every image
        span in one sequence, without decoding pixels (``lenient``/``repair`` as in :meth:`decode`)."""
        pieces = split_input_ids(self.image_vocab, self._one_sequence(input_ids), lenient, repair)
        return [value for kind, value in pieces if kind == "image"]

    def _one_sequence(self, input_ids) -> list[int]:
        return one_sequence(input_ids, len(self.tokenizer))

    def image_ids_to_images(self, image_ids: Sequence[torch.Tensor], **decode_kwargs) -> list:
        """Image ids -> PIL images through the visual tokenizer's decoder and the image processor.

        Images of one size are decoded together; variable-size grids and budgeted sequences are decoded one size
        (budget) group at a time. ``decode_kwargs`` go to the visual tokenizer's ``decode``.
        """
        if self.visual_tokenizer is None:
            raise ValueError(
                "decoding image spans to pixels needs a visual tokenizer; load the processor with one or use "
                "decode_image_ids() to get the image ids"
            )
        vt, images = self.visual_tokenizer, [None] * len(image_ids)
        groups: dict[tuple, list[int]] = {}
        for i, ids in enumerate(image_ids):
            groups.setdefault(tuple(ids.shape), []).append(i)
        with torch.no_grad():
            for members in groups.values():
                stacked = torch.stack([torch.as_tensor(image_ids[i]) for i in members]).to(vt.device)
                pixel_values = self._decode_ids(stacked, **decode_kwargs)  # (n, 3, H, W)
                for i, image in zip(members, self.image_processor.postprocess(pixel_values.float().cpu())):
                    images[i] = image
        return images

    def _decode_ids(self, image_ids: torch.Tensor, **decode_kwargs) -> torch.Tensor:
        """``vt.decode``; a grid its decoder cannot take (a 1x1 map: GroupNorm needs more than one value per group)
        is decoded with every id repeated as a 2x2 block, then average-pooled back to the size of its own pixels,
        so that every size generation allows decodes. Other failures name the shape."""
        try:
            return self.visual_tokenizer.decode(image_ids, **decode_kwargs)
        except (ValueError, RuntimeError) as error:
            if self.image_vocab.layout != "grid" or max(image_ids.shape[1:3]) > 1:
                raise ValueError(f"the visual tokenizer cannot decode image ids of shape "
                                 f"{tuple(image_ids.shape[1:])}: {error}") from error
        doubled = image_ids.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (n, 2h, 2w[, L])
        return torch.nn.functional.avg_pool2d(self.visual_tokenizer.decode(doubled, **decode_kwargs).float(), 2)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        # ProcessorMixin.to_dict deep-copies every attribute named in __init__ (the visual tokenizer's weights
        # included) and cannot serialise ImageVocab; both are saved in their own files instead.
        return {
            "processor_class": type(self).__name__,
            "image_processor": self.image_processor.to_dict(),
            "padding_side": self.padding_side,
        }

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> list[str]:
        """Write tokenizer files, processor_config.json, preprocessor_config.json, image_vocab.json and
        ``visual_tokenizer/`` (config.json + model.safetensors) into ``save_directory``."""
        files = super().save_pretrained(save_directory, **kwargs)
        files += self.image_processor.save_pretrained(save_directory)
        files.append(self.image_vocab.save_pretrained(save_directory))
        if self.visual_tokenizer is not None:
            self.visual_tokenizer.save_pretrained(os.path.join(save_directory, VISUAL_TOKENIZER_SUBFOLDER))
        return files

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        visual_tokenizer: Optional[VisualTokenizer] = None,
        load_visual_tokenizer: bool = True,
        allow_missing_fingerprint: bool = False,
        **kwargs,
    ) -> "UnifiedProcessor":
        """Load a processor saved by :meth:`save_pretrained` from a local directory and validate it.

        The visual tokenizer comes from ``visual_tokenizer/`` unless one is passed (or ``load_visual_tokenizer``
        is False). Refuses a tokenizer whose image tokens are not where image_vocab.json says, and a visual
        tokenizer whose fingerprint is not the one image_vocab.json was made for, or none is recorded (unless
        ``allow_missing_fingerprint``).
        """
        directory = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(directory):
            raise OSError(f"UnifiedProcessor.from_pretrained expects a local directory, got {directory!r}")
        tokenizer_kwargs = {k: kwargs[k] for k in _TOKENIZER_LOAD_KWARGS if kwargs.get(k) is not None}
        tokenizer = AutoTokenizer.from_pretrained(directory, **tokenizer_kwargs)
        image_processor = VisualTokenizerImageProcessor.from_pretrained(directory)
        vocab = ImageVocab.from_pretrained(directory)
        config = _read_json(os.path.join(directory, PROCESSOR_CONFIG_NAME))
        subfolder = os.path.join(directory, VISUAL_TOKENIZER_SUBFOLDER)
        if visual_tokenizer is None and load_visual_tokenizer and os.path.isdir(subfolder):
            visual_tokenizer = open_visual_tokenizer(subfolder)
        try:
            return cls(
                image_processor,
                tokenizer,
                vocab,
                visual_tokenizer=visual_tokenizer,
                padding_side=config.get("padding_side", "right"),
                allow_missing_fingerprint=allow_missing_fingerprint,
            )
        except ValueError as error:
            raise ValueError(f"refusing to load the processor in {directory}: {error}") from None


def _count(part: Optional[str], placeholder: str) -> int:
    return part.count(placeholder) if part else 0


def _convert(data: dict[str, list], return_tensors: Optional[str]) -> dict[str, Any]:
    if return_tensors is None:
        return data
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    lengths = {len(row) for rows in data.values() for row in rows}
    if len(lengths) > 1:
        raise ValueError("samples have different lengths: use padding=True or return_tensors=None")
    out = {}
    for name, rows in data.items():
        dtype = torch.bool if name.endswith("_mask") and name != "attention_mask" else torch.long
        tensor = torch.tensor(rows, dtype=dtype)
        out[name] = tensor if return_tensors == "pt" else tensor.numpy()
    return out


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
