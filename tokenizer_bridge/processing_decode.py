"""The decoding half of :class:`~tokenizer_bridge.UnifiedProcessor`: generated ids -> ``[str | PIL.Image]``.

:class:`SpanDecodingMixin` needs ``tokenizer``, ``image_vocab``, ``visual_tokenizer`` and ``image_processor`` on the
processor. Image spans are parsed by :mod:`tokenizer_bridge.vocab.pieces` (strict, lenient or repairing), decoded by
the visual tokenizer in groups of one size, and turned into PIL images by the image processor.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .vocab.pieces import one_sequence, split_input_ids


class SpanDecodingMixin:
    """``decode`` / ``batch_decode`` / ``decode_image_ids`` / ``image_ids_to_images`` of a unified processor."""

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

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True,
                                        lenient: bool = True, **kwargs) -> list[list]:
        """Generated sequences -> per sequence ``[str | PIL.Image]`` (text and decoded images, in order): what
        :meth:`batch_decode` gives, leniently by default (an unfinished span becomes a marked string)."""
        return self.batch_decode(generated_outputs, lenient=lenient, skip_special_tokens=skip_special_tokens,
                                 **kwargs)
