"""Label supervision of a tokenizer's codes: image-level labels predicted from the quantized code map.

A reconstruction loss values every pixel alike, so a tokenizer short of bits spends them where most pixels change
(a colour, an edge's exact position) and may give the same code to two things a reader must tell apart when they
differ in only a few pixels (a circle's and a square's corner). :class:`LabelHead` reads the *quantized* code map
(what the decoder and an LLM see), so its classification loss reaches the encoder through the quantizer's
straight-through gradient and makes the codes carry what the labels name. It is the class-label form of the
semantic supervision that tokenizers for multimodal LLMs add to reconstruction (contrastive text alignment in
VILA-U / UniTok, foundation-feature alignment in VA-VAE; :mod:`tokenizer_bridge.nn.foundation`), for datasets whose
images come with labels (ImageNet classes, attribute columns) and no teacher model.

The head works at any code-map size: a per-token MLP, the mean over tokens, then one linear classifier per label
set. Labels are ``(B, K)`` integers for ``K`` label sets; ``-1`` marks an image without that label (e.g. unlabelled
photos mixed into the batch), which then adds nothing to the loss.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -1  # a label value that adds nothing to the loss (an image without that label)


def check_label_classes(classes) -> list[int]:
    """``classes`` as a list of positive ints (one per label set); a clear error otherwise."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes:
        raise ValueError(f"label_classes must be a non-empty list of class counts (one per label set), got {classes!r}")
    out = []
    for value in classes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"label_classes entries must be integers >= 2 (classes of one label set), got {classes!r}")
        out.append(int(value))
    return out


class LabelHead(nn.Module):
    """Image-level classifiers over a ``(B, dim, h, w)`` code map: per-token MLP -> mean over tokens -> linear."""

    def __init__(self, dim: int, classes: Sequence[int], hidden: int = 128):
        super().__init__()
        self.classes = check_label_classes(list(classes))
        self.token_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.classifier = nn.Linear(hidden, sum(self.classes))

    def forward(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Logits ``(B, classes[k])`` for each label set ``k``."""
        if codes.ndim != 4:
            raise ValueError(f"LabelHead expects a code map (B, D, h, w), got shape {tuple(codes.shape)}")
        tokens = codes.flatten(2).transpose(1, 2)  # (B, h*w, D)
        pooled = self.token_mlp(tokens).mean(dim=1)
        return list(self.classifier(pooled).split(self.classes, dim=-1))

    def check_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor (B, {len(self.classes)}), got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.ndim == 1 and len(self.classes) == 1:
            labels = labels[:, None]
        if labels.shape != (batch, len(self.classes)):
            raise ValueError(f"labels must have shape (batch, label sets) = ({batch}, {len(self.classes)}), got "
                             f"{tuple(labels.shape)}")
        limits = torch.tensor(self.classes, device=labels.device)
        bad = (labels < IGNORE) | (labels >= limits)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"label {int(labels[row, col])} of image {row} is outside label set {col}'s classes "
                             f"0..{self.classes[col] - 1} (or {IGNORE} for no label)")
        return labels.long()

    def loss(self, codes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean cross-entropy over the label sets (each over its labelled images) and the accuracy of each set on
        its labelled images (``label_accuracy_<k>``; absent when no image of the batch has that label)."""
        labels = self.check_labels(labels, codes.shape[0])
        logits = self.forward(codes)
        total = logits[0].sum() * 0.0  # a graph even when nothing is labelled, so every rank calls backward alike
        metrics = {}
        for k, scores in enumerate(logits):
            target = labels[:, k]
            known = target != IGNORE
            if not known.any():
                continue
            total = total + F.cross_entropy(scores[known], target[known]) / len(logits)
            metrics[f"label_accuracy_{k}"] = float((scores[known].argmax(-1) == target[known]).float().mean())
        return total, metrics
