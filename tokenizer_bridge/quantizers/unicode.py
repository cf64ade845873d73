"""Unified codebooks: image ids that are LLM token ids (UniCode, Zheng et al. 2024).

UniCode tokenizes images with a codebook tied to the language model's own vocabulary, so visual tokens reuse existing
text tokens and the LLM's vocabulary does not grow. Two quantizers follow it:

- :class:`UnifiedCodebookQuantizer`: the codebook *is* the LLM's input embeddings of ``K`` chosen vocabulary rows,
  ``codes = proj(E[token_ids])`` with a learned ``H -> D`` projection (identity when ``D == H``). Only the projection
  trains; the embedding rows are a frozen copy.
- :class:`LanguageDrivenQuantizer`: UniCode's language-driven iterative training. A learned visual codebook ``(K, D)``
  (a :class:`~tokenizer_bridge.quantizers.vq.VectorQuantizer`) is pulled toward the projected embeddings by an EMA,
  ``codebook <- decay * codebook + (1 - decay) * proj(E[token_ids])``, once per training step.

Both return ``image_ids`` in ``[0, K)`` like every quantizer; row ``i`` of the codebook belongs to LLM token
``token_ids[i]``, and ``to_token_ids`` / ``from_token_ids`` map between the two; :func:`select_token_ids` picks
the rows.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import DEFAULT_TILE_ELEMENTS, Quantizer, nearest_codes, usage_metrics
from .vq import VectorQuantizer

TokenIds = Union[torch.Tensor, Sequence[int]]


def check_token_ids(token_ids: TokenIds, vocab_size: int) -> torch.LongTensor:
    """Validate a codebook's vocabulary rows: 1-D integers, non-empty, distinct, in ``[0, vocab_size)``."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D list of vocabulary ids, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be integers, got {ids.dtype}")
    ids = ids.long()
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token_ids must lie in [0, {vocab_size}) (the vocabulary), got range [{low}, {high}]")
    values, counts = ids.unique(return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"token_ids contain duplicates: {values[counts > 1][:10].tolist()}")
    return ids


def select_token_ids(
    vocab: Union[int, object],
    k: Optional[int] = None,
    strategy: Union[str, TokenIds] = "first",
    exclude: Iterable[int] = (),
) -> torch.LongTensor:
    """Vocabulary rows that form a unified codebook ``(K,)``.

    Args:
        vocab: a vocabulary size, or a tokenizer (its ``len`` and ``all_special_ids`` are used).
        k: number of rows K (required for ``"first"``; checked against an explicit list when given).
        strategy: ``"first"`` — the first ``k`` non-special ids — or an explicit list/tensor of ids.
        exclude: further ids never to use (e.g. the model's bos/eos/pad ids).
    """
    vocab_size = vocab if isinstance(vocab, int) else len(vocab)
    excluded = set(exclude) | set(() if isinstance(vocab, int) else getattr(vocab, "all_special_ids", ()))
    if not isinstance(strategy, str):
        ids = check_token_ids(strategy, vocab_size)
        if k is not None and k != ids.numel():
            raise ValueError(f"k={k} but {ids.numel()} explicit token ids were given")
        return ids
    if strategy != "first":
        raise ValueError(f"strategy must be 'first' or an explicit list of token ids, got {strategy!r}")
    if k is None or k < 1:
        raise ValueError(f"k must be a positive number of codebook rows, got {k}")
    usable = torch.ones(vocab_size, dtype=torch.bool)
    usable[[i for i in excluded if 0 <= i < vocab_size]] = False
    ids = usable.nonzero().squeeze(1)
    if k > ids.numel():
        raise ValueError(
            f"codebook size K={k} is larger than the vocabulary: {vocab_size} ids, {ids.numel()} usable after "
            f"excluding {vocab_size - ids.numel()} special ids"
        )
    return ids[:k]


def llm_special_ids(config) -> list[int]:
    """bos/eos/pad ids of a HF model config (any of them may be missing, None or a list)."""
    found = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        found += [value] if isinstance(value, int) else list(value or [])
    return found


class LanguageCodebook(nn.Module):
    """The chosen LLM embedding rows (a frozen copy, ``(K, H)``) and their projection into latent space.

    ``projection``: None -> a learned ``nn.Linear(H, D)`` when ``D != H``, identity otherwise; True forces a learned
    projection (initialised to the identity when ``D == H``); False requires ``D == H``.
    """

    def __init__(self, embeddings: torch.Tensor, token_ids: TokenIds, dim: Optional[int] = None, projection=None):
        super().__init__()
        if not torch.is_tensor(embeddings) or embeddings.dim() != 2:
            raise ValueError(f"embeddings must be the (V, H) input-embedding matrix, got {type(embeddings).__name__}")
        vocab_size, hidden = embeddings.shape
        token_ids = check_token_ids(token_ids, vocab_size)
        dim = hidden if dim is None else dim
        if projection is False and dim != hidden:
            raise ValueError(f"projection=False needs dim == embedding size ({hidden}), got dim={dim}")
        self.vocab_size, self.dim = vocab_size, dim
        self.register_buffer("token_ids", token_ids.to(embeddings.device).clone())  # (K,)
        self.register_buffer("rows", embeddings.detach()[self.token_ids].float().clone())  # (K, H)
        self.projection = nn.Linear(hidden, dim) if projection or dim != hidden else nn.Identity()
        if isinstance(self.projection, nn.Linear) and dim == hidden:
            nn.init.eye_(self.projection.weight)
            nn.init.zeros_(self.projection.bias)

    @property
    def trainable(self) -> bool:
        return isinstance(self.projection, nn.Linear)

    def forward(self) -> torch.Tensor:
        """Projected embedding rows ``(K, D)``."""
        return self.projection(self.rows)

    def to_token_ids(self, image_ids: torch.Tensor) -> torch.LongTensor:
        image_ids = torch.as_tensor(image_ids, device=self.token_ids.device).long()
        k = self.token_ids.numel()
        if image_ids.numel() and (int(image_ids.min()) < 0 or int(image_ids.max()) >= k):
            raise ValueError(f"image ids must lie in [0, {k}), got [{int(image_ids.min())}, {int(image_ids.max())}]")
        return self.token_ids[image_ids]

    def from_token_ids(self, token_ids: torch.Tensor) -> torch.LongTensor:
        token_ids = torch.as_tensor(token_ids, device=self.token_ids.device).long()
        sorted_ids, order = self.token_ids.sort()
        pos = torch.searchsorted(sorted_ids, token_ids).clamp_max(sorted_ids.numel() - 1)
        found = sorted_ids[pos] == token_ids
        if not found.all():
            raise ValueError(f"token ids {token_ids[~found].unique()[:10].tolist()} are not in the unified codebook")
        return order[pos]


class _LanguageTied:
    """Shared by the quantizers that own a :class:`LanguageCodebook` as ``self.language``."""

    language: LanguageCodebook

    @classmethod
    def from_llm(cls, model, token_ids: Union[int, TokenIds], dim: Optional[int] = None, **kwargs):
        """Build from a HF causal LM's input embeddings; ``token_ids`` may be a count K (first K ids that are not
        the model's bos/eos/pad) or an explicit list."""
        embeddings = model.get_input_embeddings().weight
        if isinstance(token_ids, int):
            token_ids = select_token_ids(embeddings.shape[0], token_ids, exclude=llm_special_ids(model.config))
        return cls(embeddings, token_ids, dim, **kwargs)

    @property
    def token_ids(self) -> torch.LongTensor:
        """LLM vocabulary id of each codebook row ``(K,)``."""
        return self.language.token_ids

    def to_token_ids(self, image_ids: torch.Tensor) -> torch.LongTensor:
        """Image ids (any shape, values in ``[0, K)``) -> the LLM token ids they stand for."""
        return self.language.to_token_ids(image_ids)

    def from_token_ids(self, token_ids: torch.Tensor) -> torch.LongTensor:
        """LLM token ids (each must be one of ``token_ids``) -> image ids in ``[0, K)``."""
        return self.language.from_token_ids(token_ids)


class UnifiedCodebookQuantizer(_LanguageTied, Quantizer):
    """Nearest-code quantizer whose codebook is ``proj(E[token_ids])``.

    Args:
        embeddings: the LLM's input-embedding matrix ``(V, H)``; only the ``token_ids`` rows are kept (frozen).
        token_ids: vocabulary rows forming the codebook ``(K,)`` (see :func:`select_token_ids`).
        dim: latent dimension D (default H).
        projection: see :class:`LanguageCodebook`.
        commitment_weight: weight of ``||x - sg(q)||^2``; codebook_weight: weight of ``||sg(x) - q||^2``, which
            trains the projection (dropped when the projection is the identity).
        tile_elements: bound on distance-tile size for the nearest-code search.
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        token_ids: TokenIds,
        dim: Optional[int] = None,
        projection: Optional[bool] = None,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        tile_elements: int = DEFAULT_TILE_ELEMENTS,
    ):
        super().__init__()
        self.language = LanguageCodebook(embeddings, token_ids, dim, projection)
        self.dim, self.codebook_size = self.language.dim, self.language.token_ids.numel()
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.tile_elements = tile_elements

    def codes(self) -> torch.Tensor:
        """The codebook ``(K, D)``: projected embedding rows."""
        return self.language()

    def lookup_flat(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes()[ids]

    def quantize_flat(self, flat: torch.Tensor):
        codes = self.codes()  # (K, D)
        ids, _ = nearest_codes(flat.detach(), codes.detach().to(flat.dtype), self.tile_elements)
        q = codes[ids].to(flat.dtype)  # (M, D)
        loss = self.commitment_weight * F.mse_loss(flat, q.detach())
        if self.language.trainable:
            loss = loss + self.codebook_weight * F.mse_loss(q, flat.detach())
        quantized = flat + (q - flat).detach()  # straight-through estimator
        return quantized, ids, loss, usage_metrics(ids, self.codebook_size)


class LanguageDrivenQuantizer(_LanguageTied, Quantizer):
    """A learned VQ codebook ``(K, D)`` pulled toward ``proj(E[token_ids])`` (UniCode's language-driven training).

    ``language_update()`` applies ``codebook <- decay * codebook + (1 - decay) * proj(E[token_ids])``. With
    ``auto_update`` (default) each training-mode forward calls it *before* quantizing, i.e. once per training step
    after the previous optimizer step, and never inside an autograd graph. With gradient accumulation (several
    forwards per step) set ``auto_update=False`` and call ``language_update()`` after ``optimizer.step()``.

    Args:
        embeddings, token_ids, dim, projection: as for :class:`UnifiedCodebookQuantizer`.
        decay: EMA decay of the pull toward the language embeddings, in ``[0, 1)``.
        auto_update: pull in every training forward (see above).
        alignment_weight: weight of ``||proj(E) - sg(codebook)||^2``, which trains a learned projection to meet the
            visual codebook (ignored for the identity projection).
        init_from_language: start the codebook at ``proj(E[token_ids])`` (then k-means init is off by default).
        **vq_kwargs: passed to :class:`~tokenizer_bridge.quantizers.vq.VectorQuantizer` (learned codebook only).
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        token_ids: TokenIds,
        dim: Optional[int] = None,
        projection: Optional[bool] = None,
        decay: float = 0.99,
        auto_update: bool = True,
        alignment_weight: float = 1.0,
        init_from_language: bool = True,
        **vq_kwargs,
    ):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if vq_kwargs.get("codebook_update", "learned") != "learned":
            raise ValueError("the language-driven update needs a learned codebook (codebook_update='learned')")
        self.language = LanguageCodebook(embeddings, token_ids, dim, projection)
        self.dim, self.codebook_size = self.language.dim, self.language.token_ids.numel()
        self.decay, self.auto_update, self.alignment_weight = decay, auto_update, alignment_weight
        vq_kwargs.setdefault("kmeans_init", not init_from_language)
        self.vq = VectorQuantizer(self.dim, self.codebook_size, **vq_kwargs)
        if init_from_language:
            with torch.no_grad():
                self.vq.codebook.copy_(self.language())

    @property
    def codebook(self) -> torch.Tensor:
        """The visual codebook ``(K, D)`` (a parameter of the inner VQ)."""
        return self.vq.codebook

    @torch.no_grad()
    def language_update(self, decay: Optional[float] = None) -> None:
        """One EMA step of the visual codebook toward the projected language embeddings."""
        decay = self.decay if decay is None else decay
        self.vq.codebook.data.mul_(decay).add_(self.language().to(self.vq.codebook.dtype), alpha=1 - decay)

    def lookup_flat(self, ids: torch.Tensor) -> torch.Tensor:
        return self.vq.lookup_flat(ids)

    def quantize_flat(self, flat: torch.Tensor):
        if self.training and self.auto_update:
            self.language_update()
        quantized, ids, loss, metrics = self.vq.quantize_flat(flat)
        target = self.language()  # (K, D)
        if self.language.trainable and self.alignment_weight > 0:
            loss = loss + self.alignment_weight * F.mse_loss(target, self.vq.codebook.detach())
        metrics = {**metrics, "language_distance": float((self.vq.codebook.detach() - target.detach()).pow(2).mean())}
        return quantized, ids, loss, metrics
