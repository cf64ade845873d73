"""`ImageVocab`: where a visual tokenizer's image ids live inside an LLM vocabulary.

A small JSON-serialisable record (``image_vocab.json``) owned by the bridge. It maps image ids (indices into a
visual tokenizer's codebook, ``[0, K)``) to LLM token ids (``input_ids``) and back with vectorised tensor arithmetic,
and knows how an image is written as a span of tokens:

``grid`` layout (h x w ids, raster order)::

    <boi> id id ... id <eol> id id ... id <eol> ... <eoi>        # h rows of w ids, each row closed by <eol>

``sequence`` layout (N slots from a 1-D tokenizer)::

    <boi> id id ... id <eoi>

The fingerprint of the visual tokenizer the vocabulary was made for is recorded so that a bundle whose ids were
produced by a different tokenizer is refused instead of silently decoding garbage.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import torch

IMAGE_VOCAB_NAME = "image_vocab.json"
LAYOUTS = ("grid", "sequence")


class MalformedImageSpanError(ValueError):
    """Raised when a token span does not have the shape an image span must have."""


@dataclass
class ImageVocab:
    """Image-id <-> token-id mapping and span grammar.

    Args:
        offset: token id of image id 0; image id ``k`` is token ``offset + k``.
        codebook_size: number of image ids K (the ids occupy ``[offset, offset + K)``).
        layout: ``"grid"`` (rows of ``grid_size[1]`` ids closed by ``<eol>``) or ``"sequence"`` (``num_tokens`` ids).
        grid_size: ``(h, w)`` of the id map for the grid layout.
        num_tokens: number of ids per image for the sequence layout.
        boi_token_id / eoi_token_id / eol_token_id: special token ids (``eol`` only for the grid layout).
        text_vocab_size: size of the LLM's vocabulary before bridging (ids below it are text).
        tokenizer_fingerprint: fingerprint of the visual tokenizer that produced the ids.
    """

    offset: int
    codebook_size: int
    boi_token_id: int
    eoi_token_id: int
    layout: str = "grid"
    grid_size: Optional[Sequence[int]] = None
    num_tokens: Optional[int] = None
    eol_token_id: Optional[int] = None
    num_levels: int = 1
    text_vocab_size: Optional[int] = None
    tokenizer_fingerprint: Optional[str] = None
    boi_token: str = "<boi>"
    eoi_token: str = "<eoi>"
    eol_token: str = "<eol>"
    image_token_format: str = "<img_{}>"
    image_placeholder: str = "<image>"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"ImageVocab layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.codebook_size <= 0:
            raise ValueError(f"codebook_size must be positive, got {self.codebook_size}")
        if self.offset < 0:
            raise ValueError(f"offset must be non-negative, got {self.offset}")
        if self.layout == "grid":
            if self.grid_size is None or len(self.grid_size) != 2 or min(self.grid_size) <= 0:
                raise ValueError(f"grid layout needs grid_size=(h, w) with positive sides, got {self.grid_size}")
            if self.eol_token_id is None:
                raise ValueError("grid layout needs an eol_token_id (one <eol> closes each row)")
            self.grid_size = [int(s) for s in self.grid_size]
        else:
            if not self.num_tokens or self.num_tokens <= 0:
                raise ValueError(f"sequence layout needs a positive num_tokens, got {self.num_tokens}")
        specials = [self.boi_token_id, self.eoi_token_id] + ([self.eol_token_id] if self.eol_token_id is not None else [])
        if len(set(specials)) != len(specials):
            raise ValueError(f"special token ids must be distinct, got {specials}")
        for sid in specials:
            if self.offset <= sid < self.offset + self.codebook_size:
                raise ValueError(f"special token id {sid} overlaps the image id range {self.id_range}")
        if self.text_vocab_size is not None and self.offset < self.text_vocab_size:
            raise ValueError(
                f"image ids start at {self.offset} but the text vocabulary has {self.text_vocab_size} tokens: "
                "the image range would overlap existing text tokens"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def id_range(self) -> tuple[int, int]:
        """Half-open range ``[start, end)`` of the token ids that encode image ids."""
        return (self.offset, self.offset + self.codebook_size)

    @property
    def num_image_ids(self) -> int:
        """Image ids per image (h*w for grid, N for sequence)."""
        if self.layout == "grid":
            return self.grid_size[0] * self.grid_size[1]
        return int(self.num_tokens)

    @property
    def span_length(self) -> int:
        """Tokens in one image span including <boi>, <eol>s and <eoi>."""
        if self.layout == "grid":
            h, w = self.grid_size
            return h * (w + 1) + 2
        return int(self.num_tokens) + 2

    @property
    def special_token_ids(self) -> list[int]:
        ids = [self.boi_token_id, self.eoi_token_id]
        return ids + ([self.eol_token_id] if self.eol_token_id is not None else [])

    def image_token_strings(self) -> list[str]:
        return [self.image_token_format.format(i) for i in range(self.codebook_size)]

    # ------------------------------------------------------------------ id mapping
    def image_ids_to_input_ids(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Map image ids in ``[0, K)`` to LLM token ids (any shape)."""
        image_ids = torch.as_tensor(image_ids)
        if image_ids.numel() and (image_ids.min() < 0 or image_ids.max() >= self.codebook_size):
            raise ValueError(
                f"image ids must lie in [0, {self.codebook_size}), got range "
                f"[{int(image_ids.min())}, {int(image_ids.max())}]"
            )
        return image_ids.long() + self.offset

    def input_ids_to_image_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Map LLM token ids of image tokens back to image ids (any shape)."""
        input_ids = torch.as_tensor(input_ids).long()
        bad = ~self.is_image_token(input_ids)
        if bad.any():
            raise MalformedImageSpanError(
                f"token id {int(input_ids[bad][0])} is not an image token (image tokens are {self.id_range})"
            )
        return input_ids - self.offset

    def is_image_token(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = torch.as_tensor(input_ids)
        return (input_ids >= self.offset) & (input_ids < self.offset + self.codebook_size)

    # ------------------------------------------------------------------ spans
    def build_span(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Wrap one image's ids as a token span: ``(h, w)``/``(h*w,)`` (grid) or ``(N,)`` -> ``(span_length,)``."""
        image_ids = torch.as_tensor(image_ids).long()
        if image_ids.numel() != self.num_image_ids:
            raise ValueError(f"expected {self.num_image_ids} image ids per image, got {image_ids.numel()}")
        tokens = self.image_ids_to_input_ids(image_ids.reshape(-1))
        if self.layout == "grid":
            h, w = self.grid_size
            eol = torch.full((h, 1), self.eol_token_id, dtype=torch.long)
            tokens = torch.cat([tokens.view(h, w), eol], dim=1).reshape(-1)  # (h*(w+1),)
        boi = torch.tensor([self.boi_token_id])
        eoi = torch.tensor([self.eoi_token_id])
        return torch.cat([boi, tokens, eoi])

    def build_spans(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Batched :meth:`build_span`: ``(B, h*w)``/``(B, h, w)``/``(B, N)`` -> ``(B, span_length)``."""
        image_ids = torch.as_tensor(image_ids).long()
        batch = image_ids.shape[0]
        tokens = self.image_ids_to_input_ids(image_ids.reshape(batch, -1))
        if tokens.shape[1] != self.num_image_ids:
            raise ValueError(f"expected {self.num_image_ids} image ids per image, got {tokens.shape[1]}")
        if self.layout == "grid":
            h, w = self.grid_size
            eol = torch.full((batch, h, 1), self.eol_token_id, dtype=torch.long)
            tokens = torch.cat([tokens.view(batch, h, w), eol], dim=2).reshape(batch, -1)
        boi = torch.full((batch, 1), self.boi_token_id, dtype=torch.long)
        eoi = torch.full((batch, 1), self.eoi_token_id, dtype=torch.long)
        return torch.cat([boi, tokens, eoi], dim=1)

    def parse_span(self, span: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`build_span`; raises :class:`MalformedImageSpanError` naming what is wrong.

        Returns image ids shaped ``(h, w)`` for grid or ``(N,)`` for sequence.
        """
        span = torch.as_tensor(span).long().reshape(-1)
        if span.numel() == 0 or int(span[0]) != self.boi_token_id:
            raise MalformedImageSpanError("image span does not start with <boi>")
        if int(span[-1]) != self.eoi_token_id:
            raise MalformedImageSpanError("image span is not closed by <eoi> (truncated generation?)")
        if span.numel() != self.span_length:
            raise MalformedImageSpanError(
                f"image span has {span.numel()} tokens, expected {self.span_length} for layout {self.layout!r} "
                f"({self._shape_text()})"
            )
        body = span[1:-1]
        if self.layout == "grid":
            h, w = self.grid_size
            rows = body.view(h, w + 1)
            if (rows[:, -1] != self.eol_token_id).any():
                row = int((rows[:, -1] != self.eol_token_id).nonzero()[0])
                raise MalformedImageSpanError(f"row {row} of the image span does not end with <eol>")
            body = rows[:, :-1]
        if not self.is_image_token(body).all():
            pos = int((~self.is_image_token(body)).reshape(-1).nonzero()[0])
            raise MalformedImageSpanError(
                f"image span holds token id {int(body.reshape(-1)[pos])} at image position {pos}, "
                f"which is not an image token (image tokens are {self.id_range})"
            )
        return body - self.offset

    def _shape_text(self) -> str:
        if self.layout == "grid":
            return f"{self.grid_size[0]} rows of {self.grid_size[1]} ids + <eol>"
        return f"{self.num_tokens} ids"

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImageVocab":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"image_vocab.json has unknown fields {sorted(unknown)}")
        return cls(**data)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, IMAGE_VOCAB_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "ImageVocab":
        path = os.path.join(directory, IMAGE_VOCAB_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {IMAGE_VOCAB_NAME} in {directory}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def check_fingerprint(self, fingerprint: Optional[str], what: str = "visual tokenizer") -> None:
        """Raise if ``fingerprint`` is not the one this vocabulary was made for."""
        if self.tokenizer_fingerprint is None or fingerprint is None:
            return
        if fingerprint != self.tokenizer_fingerprint:
            raise ValueError(
                f"image_vocab.json was made for a visual tokenizer with fingerprint {self.tokenizer_fingerprint[:16]}..., "
                f"but the {what} has fingerprint {fingerprint[:16]}...: its image ids would be decoded by the wrong "
                "codebook. Re-bridge the LLM with this tokenizer or load the matching one."
            )

    def check_fits(self, vocab_size: int) -> None:
        """Raise if an LLM with ``vocab_size`` embedding rows cannot hold every id of this vocabulary."""
        top = max(self.offset + self.codebook_size - 1, *self.special_token_ids)
        if top >= vocab_size:
            raise ValueError(
                f"ImageVocab uses token ids up to {top} but the LLM vocabulary has only {vocab_size} rows"
            )
