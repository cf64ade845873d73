"""Image, text, rate, alignment and learned-feature metrics shared by training logs, the demo and the evaluation suites.

- pixels: :func:`psnr`, :func:`ssim` (Wang et al. 2004, the scikit-image settings), :func:`band_error_ratio`
  (residual energy per radial frequency band), :func:`seam_ratio` (how strongly a block grid shows);
- text: :func:`cer`, :func:`wer` from a Levenshtein distance;
- rate and codebooks: :func:`bits_per_pixel`, :func:`codebook_metrics`;
- alignment: :func:`cknna` (Huh et al. 2024, "The Platonic Representation Hypothesis") and :func:`se_cknna`
  (alignment under semantics-preserving perturbations, after VFM-VAE, Bi et al. 2025);
- learned features: the :class:`FeatureExtractor` protocol, :class:`HFBackboneFeatures` (any local HF vision
  backbone), :func:`frechet_distance` (the FID formula, Heusel et al. 2017) and :func:`lpips_like`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .quantizers.base import usage_metrics

# Radial frequency bands in cycles per pixel: octaves down from 1/4, the last band runs up to the corners (0.707).
OCTAVE_EDGES = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)  # ITU-R BT.601


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image for tensors ``(B, C, H, W)``.

    ``data_range`` is the span of valid values: 2.0 for ``pixel_values`` in [-1, 1], 255 for uint8 arrays.
    """
    if reconstruction.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(reconstruction.shape)} vs {tuple(target.shape)}")
    mse = (reconstruction.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def codebook_metrics(image_ids: torch.Tensor, codebook_size: int) -> dict:
    """Usage (fraction of codes used at least once) and perplexity of ``image_ids`` over a whole set."""
    return usage_metrics(torch.as_tensor(image_ids), codebook_size)


# ---------------------------------------------------------------------------------------------------- structure
SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


def _gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # 5 taps each side for sigma 1.5: an 11 x 11 window
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _blur_valid(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``(..., H, W)`` keeping only positions whose window lies inside the image.

    A sum of shifted slices: faster on CPU than ``conv2d``/``conv1d`` for an 11-tap kernel on one channel."""
    n = taps.numel()
    h, w = x.shape[-2] - n + 1, x.shape[-1] - n + 1
    rows = sum(taps[t] * x[..., :, t : t + w] for t in range(n))
    return sum(taps[t] * rows[..., t : t + h, :] for t in range(n))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image for ``(B, C, H, W)`` tensors, mean over channels.

    Gaussian window (sigma 1.5, 11 x 11), population covariances, K1 = 0.01, K2 = 0.03, and the SSIM map averaged
    over the positions whose whole window lies inside the image: the settings of
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    ``data_range`` is 2.0 for ``pixel_values`` in [-1, 1], 255 for uint8 values.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    taps = _gaussian_taps().to(x.device)
    if min(x.shape[-2:]) < taps.numel():
        raise ValueError(f"ssim needs images of at least {taps.numel()} px per side, got {tuple(x.shape[-2:])}")
    # SSIM is unchanged when x, y and the data range are scaled together: work at range 1, where float32 keeps
    # the variances (E[x^2] - E[x]^2) accurate to ~1e-7 at half the cost of float64.
    x, y = x.float() / data_range, y.float() / data_range
    mu_x, mu_y, xx, yy, xy = _blur_valid(torch.stack([x, y, x * x, y * y, x * y]), taps.float())  # (B, C, h', w')
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.double().mean(dim=(2, 3)).mean(1)


def band_energies(reconstruction: torch.Tensor, target: torch.Tensor,
                  edges: Sequence[float] = OCTAVE_EDGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral energy of the residual and of the target in radial frequency bands, summed over a batch.

    Both ``(B, 3, H, W)`` tensors are reduced to luma (BT.601), mean-subtracted and Hann-windowed (so image borders
    do not leak energy into every band), then Fourier transformed; band ``i`` holds radial frequencies in
    ``[edges[i], edges[i+1])`` cycles per pixel. Returns ``(residual, reference)``, each ``(len(edges) - 1,)``.
    """
    if reconstruction.shape != target.shape or target.dim() != 4 or target.shape[1] != 3:
        raise ValueError(f"band_energies needs two (B, 3, H, W) tensors of one shape, got {tuple(target.shape)}")
    h, w = target.shape[-2:]
    window = torch.outer(torch.hann_window(h, periodic=False, dtype=torch.float64),
                         torch.hann_window(w, periodic=False, dtype=torch.float64)).to(target.device)

    def spectrum(images: torch.Tensor) -> torch.Tensor:
        luma = (images.to(torch.float64) * _LUMA.to(images.device).view(1, 3, 1, 1)).sum(1)  # (B, H, W)
        return torch.fft.fft2((luma - luma.mean((1, 2), keepdim=True)) * window).abs().pow(2)

    radius = torch.sqrt(torch.fft.fftfreq(h, dtype=torch.float64).view(-1, 1) ** 2
                        + torch.fft.fftfreq(w, dtype=torch.float64).view(1, -1) ** 2).to(target.device)
    residual, reference = spectrum(reconstruction - target), spectrum(target)
    bands = [(radius >= low) & (radius < high) for low, high in zip(edges[:-1], edges[1:])]
    return torch.stack([residual[:, b].sum() for b in bands]), torch.stack([reference[:, b].sum() for b in bands])


def band_error_ratio(reconstruction: torch.Tensor, target: torch.Tensor,
                     edges: Sequence[float] = OCTAVE_EDGES) -> list[float]:
    """Residual energy over target energy per radial frequency band (see :func:`band_energies`): near 0 the band is
    reproduced, near 1 (or above) it is lost or replaced by artefacts."""
    residual, reference = band_energies(reconstruction, target, edges)
    return (residual / reference.clamp_min(1e-12)).tolist()


def seam_ratio(images: torch.Tensor, period: int) -> float:
    """How strongly a grid of ``period``-pixel blocks shows in ``(B, C, H, W)`` images: the mean absolute step
    between neighbouring pixels across block boundaries over the mean step everywhere else, horizontal and vertical
    averaged (a blockiness measure in the spirit of Wang, Sheikh and Bovik 2002 for JPEG).

    A natural image at any alignment gives ~1.0; tiles decoded independently give well above 1 (each seam is a step
    the image does not have); < 1 means the boundaries are smoother than the rest. Boundaries lie after pixel
    ``period - 1``, ``2 * period - 1``, ...: the grid of a tokenizer whose ids each cover ``period`` x ``period``
    pixels from the top left.
    """
    if images.dim() != 4 or min(images.shape[-2:]) < 2 * period or period < 2:
        raise ValueError(f"seam_ratio needs (B, C, H, W) images at least two {period}-pixel blocks wide and a period "
                         f">= 2, got shape {tuple(images.shape)} and period {period}")
    images = images.to(torch.float64)
    ratios = []
    for steps in (images.diff(dim=-1).abs().mean(dim=(0, 1, 2)), images.diff(dim=-2).abs().mean(dim=(0, 1, 3))):
        seam = (torch.arange(steps.numel(), device=steps.device) + 1) % period == 0
        ratios.append(steps[seam].mean() / steps[~seam].mean().clamp_min(1e-12))
    return float(sum(ratios) / 2)


# --------------------------------------------------------------------------------------------------------- text
def levenshtein(ref: Sequence, hyp: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions, each of cost 1) between two sequences."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1]


def _error_rate(ref: Sequence, hyp: Sequence) -> float:
    if not ref:
        return float(len(hyp) > 0)  # nothing to read: any output is wholly wrong, none is perfect
    return levenshtein(ref, hyp) / len(ref)


def cer(ref: str, hyp: str) -> float:
    """Character error rate: Levenshtein distance over characters / ``len(ref)`` (can exceed 1 for long output)."""
    return _error_rate(ref, hyp)


def wer(ref: str, hyp: str) -> float:
    """Word error rate: Levenshtein distance over whitespace-separated words / number of reference words."""
    return _error_rate(ref.split(), hyp.split())


# --------------------------------------------------------------------------------------------------------- rate
def bits_per_pixel(num_tokens: int, codebook_size: Union[int, Sequence[int]], height: int, width: int) -> float:
    """Rate of a token stream: ``num_tokens * log2(K) / (height * width)``.

    ``codebook_size`` may list one size per level of a multi-level quantizer; a token then carries
    ``sum(log2 K_l)`` bits, and ``num_tokens`` counts positions (not position-level pairs).
    """
    sizes = [codebook_size] if isinstance(codebook_size, int) else list(codebook_size)
    if min(sizes) < 1 or height <= 0 or width <= 0:
        raise ValueError(f"bits_per_pixel needs K >= 1 and a positive image size, got {sizes}, {height}x{width}")
    return num_tokens * sum(math.log2(k) for k in sizes) / (height * width)


# ---------------------------------------------------------------------------------------------------- alignment
def _knn_mask(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """``(n, n)`` bool: ``mask[i, j]`` iff ``j != i`` is among the ``k`` most similar samples to ``i``."""
    scores = kernel.clone()
    scores.fill_diagonal_(float("-inf"))
    neighbours = scores.topk(k, dim=1).indices  # (n, k)
    return torch.zeros_like(kernel, dtype=torch.bool).scatter_(1, neighbours, True)


def _prepare_features(feats, normalize: bool) -> torch.Tensor:
    feats = torch.as_tensor(feats).to(torch.float64)
    feats = feats.reshape(feats.shape[0], -1)  # (n, D)
    return F.normalize(feats, dim=1) if normalize else feats


def cknna(feats_a, feats_b, k: int = 10, normalize: bool = True) -> float:
    """Centered Kernel Nearest-Neighbor Alignment (Huh et al. 2024, "The Platonic Representation Hypothesis").

    Linear kernels ``K = A A^T`` and ``L = B B^T`` over the ``n`` samples (rows; L2-normalised first when
    ``normalize``, i.e. cosine kernels), centred row-wise as in the paper, ``Kc[i, j] = K[i, j] - mean_l K[i, l]``.
    Only pairs that are mutual neighbours enter: ``alpha(i, j) = 1[i != j, j in knn_K(i), j in knn_L(i)]`` and
    ``Align(K, L) = sum_ij alpha(i, j) Kc[i, j] Lc[i, j]``; the score is
    ``Align(K, L) / sqrt(Align(K, K) Align(L, L))``, in [-1, 1] by Cauchy-Schwarz (with k = n - 1 it is CKA with
    row centring and the diagonal left out). O(n^2) memory.
    """
    a, b = _prepare_features(feats_a, normalize), _prepare_features(feats_b, normalize)
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"cknna needs the same samples on both sides, got {n} and {b.shape[0]} rows")
    if not 1 <= k < n:
        raise ValueError(f"cknna needs 1 <= k < n (n = {n} samples), got k={k}")
    kernel_a, kernel_b = a @ a.T, b @ b.T
    centred_a = kernel_a - kernel_a.mean(1, keepdim=True)
    centred_b = kernel_b - kernel_b.mean(1, keepdim=True)
    knn_a, knn_b = _knn_mask(kernel_a, k), _knn_mask(kernel_b, k)
    cross = (centred_a * centred_b)[knn_a & knn_b].sum()
    self_a, self_b = centred_a[knn_a].pow(2).sum(), centred_b[knn_b].pow(2).sum()
    denominator = torch.sqrt(self_a * self_b)
    return float(cross / denominator) if denominator > 0 else float("nan")


def random_rotation(pixel_values: torch.Tensor, generator: torch.Generator, max_degrees: float = 30.0) -> torch.Tensor:
    """Rotate each image by a uniform angle in ``[-max_degrees, max_degrees]`` (bilinear, reflected borders)."""
    angles = (torch.rand(pixel_values.shape[0], generator=generator) * 2 - 1) * math.radians(max_degrees)
    cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    return _warp(pixel_values, theta)


def random_scaling(pixel_values: torch.Tensor, generator: torch.Generator, low: float = 0.8,
                   high: float = 1.25) -> torch.Tensor:
    """Zoom each image about its centre by a log-uniform factor in ``[low, high]`` (same size out, reflected)."""
    factors = torch.exp(torch.empty(pixel_values.shape[0]).uniform_(math.log(low), math.log(high), generator=generator))
    zero = torch.zeros_like(factors)
    theta = torch.stack([torch.stack([1 / factors, zero, zero], 1), torch.stack([zero, 1 / factors, zero], 1)], 1)
    return _warp(pixel_values, theta)


def gaussian_noise(pixel_values: torch.Tensor, generator: torch.Generator, std: float = 0.1) -> torch.Tensor:
    """Add i.i.d. Gaussian noise of ``std`` (in [-1, 1] pixel units: 0.1 is about 13/255) and clamp to [-1, 1]."""
    noise = torch.randn(pixel_values.shape, generator=generator).to(pixel_values.device, pixel_values.dtype)
    return (pixel_values + std * noise).clamp(-1, 1)


def _warp(pixel_values: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.to(pixel_values.device, pixel_values.dtype)
    grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# One explicit name -> perturbation dict: the semantics-preserving shifts of :func:`se_cknna`.
PERTURBATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "rotation": random_rotation,
    "scaling": random_scaling,
    "noise": gaussian_noise,
}


def se_cknna(extract_a: Callable, extract_b: Callable, pixel_values: torch.Tensor, perturbations: Optional[dict] = None,
             k: int = 10, seed: int = 0, normalize: bool = True) -> dict:
    """Semantic-equivariance CKNNA: does the alignment of ``extract_a`` with ``extract_b`` survive input shifts?

    Protocol (after the SE-CKNNA analysis of VFM-VAE, Bi et al. 2025): ``extract_b`` (the reference, e.g. a vision
    foundation model) sees the clean images ``x``; ``extract_a`` (e.g. a tokenizer's pooled latents) sees ``t(x)``
    for each semantics-preserving perturbation ``t`` — one random draw per image from ``perturbations`` (default
    :data:`PERTURBATIONS`: rotation within +-30 degrees, zoom in [0.8, 1.25], Gaussian noise of std 0.1), seeded
    by ``seed``. ``SE-CKNNA = mean_t CKNNA(A(t(x)), B(x))``. For pooled (global) features equivariance to these
    transforms means the neighbourhood structure is unchanged, so a representation whose semantics are robust keeps
    ``se_cknna`` close to ``clean = CKNNA(A(x), B(x))``.

    Extractors map ``(n, 3, H, W)`` in [-1, 1] to ``(n, D)``. Returns ``{"se_cknna", "clean", <one per t>}``.
    """
    perturbations = PERTURBATIONS if perturbations is None else perturbations
    if not perturbations:
        raise ValueError("se_cknna needs at least one perturbation")
    reference = extract_b(pixel_values)
    out = {"clean": cknna(extract_a(pixel_values), reference, k=k, normalize=normalize)}
    generator = torch.Generator().manual_seed(seed)
    for name, perturb in perturbations.items():
        out[name] = cknna(extract_a(perturb(pixel_values, generator)), reference, k=k, normalize=normalize)
    out["se_cknna"] = float(np.mean([out[name] for name in perturbations]))
    return out


# ------------------------------------------------------------------------------------------- learned features
@dataclass
class Features:
    """Output of a :class:`FeatureExtractor`.

    Args:
        pooled: one vector per image ``(B, D)`` (Fréchet distance, CKNNA).
        layers: per-layer token features, each ``(B, N_l, C_l)`` (the LPIPS-like distance); ``None`` if unavailable.
    """

    pooled: torch.Tensor
    layers: Optional[list] = None


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps ``pixel_values`` ``(B, 3, H, W)`` in [-1, 1] to :class:`Features`.

    The extractor owns the conversion to its own input range and normalisation (VTBench fed LPIPS [0, 1] images
    where it expects [-1, 1]; here the contract is always [-1, 1] in, and each extractor converts explicitly).
    ``input_size`` is the square side the network was built for (``None``: any size); evaluation cuts tiles of it.
    """

    input_size: Optional[int]

    def __call__(self, pixel_values: torch.Tensor) -> Features: ...


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class HFBackboneFeatures:
    """A Hugging Face vision backbone (ViT, DINOv2, SigLIP vision, ConvNeXt, ...) loaded from a local folder.

    ``AutoModel.from_pretrained(path)``; inputs go from [-1, 1] to [0, 1] and are normalised with the folder's
    ``preprocessor_config.json`` mean/std (ImageNet statistics when it has none), and are resized (bicubic) to
    ``config.image_size`` when the backbone has a fixed size. Pooled features are the mean of the last hidden state
    over tokens (or over positions for conv backbones); ``layers`` are the hidden states of every block.
    """

    def __init__(self, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", batch_size: int = 32):
        from transformers import AutoModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no feature-extractor weights at {str(path)!r}: give the folder of a Hugging Face vision backbone "
                "(config.json + model weights, as written by save_pretrained); no such weights ship with "
                "tokenizer-bridge and nothing is downloaded"
            )
        model = AutoModel.from_pretrained(path)
        config = getattr(model.config, "vision_config", model.config)
        # Two-tower checkpoints (CLIP, SigLIP) load as the full model: keep only the vision tower.
        self.model = getattr(model, "vision_model", model).to(device).eval()
        self.device, self.batch_size, self.path = torch.device(device), batch_size, str(path)
        size = getattr(config, "image_size", None)
        self.input_size = size if isinstance(size, int) else None
        mean, std = _normalisation(path)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> Features:
        pooled, layers = [], []
        for start in range(0, len(pixel_values), self.batch_size):
            p, l = self._batch(pixel_values[start : start + self.batch_size].to(self.device, torch.float32))
            pooled.append(p)
            layers.append(l)
        per_layer = [torch.cat(chunks) for chunks in zip(*layers)]
        return Features(torch.cat(pooled), per_layer or None)

    def _batch(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list]:
        x = ((pixel_values + 1) / 2 - self.mean) / self.std  # [-1, 1] -> [0, 1] -> the backbone's normalisation
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", antialias=True)
        out = self.model(pixel_values=x, output_hidden_states=True)
        hidden = getattr(out, "hidden_states", None) or ()
        tokens = [_as_tokens(h).float().cpu() for h in hidden[1:]]  # each (B, N, C); [0] is the patch embedding
        return _as_tokens(out.last_hidden_state).mean(1).float().cpu(), tokens


def _as_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)`` transformer states stay; ``(B, C, H, W)`` conv maps become ``(B, H*W, C)``."""
    return hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden


def _normalisation(path: Path) -> tuple:
    config = path / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if "image_mean" in data and "image_std" in data:
            return tuple(data["image_mean"]), tuple(data["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def frechet_distance(real, fake, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n, D)`` (the FID formula, Heusel et al. 2017).

    ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2})``. With an Inception network and 50k images this is FID;
    with another backbone or fewer samples it is only comparable with itself at the same n and backbone.
    """
    from scipy import linalg

    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) < 2:
        raise ValueError(f"frechet_distance needs two (n >= 2, D) feature sets, got {real.shape} and {fake.shape}")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    root = linalg.sqrtm(cov_r @ cov_f)
    if not np.isfinite(root).all():  # singular product (n < D): regularise both covariances slightly
        offset = eps * np.eye(len(cov_r))
        root = linalg.sqrtm((cov_r + offset) @ (cov_f + offset))
    root = root.real
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2 * np.trace(root))


def lpips_like(real_layers: Sequence[torch.Tensor], fake_layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample unweighted LPIPS (Zhang et al. 2018, eq. 1 with every channel weight 1), averaged over layers.

    Each layer's token features ``(B, N, C)`` are unit-normalised along channels; the distance is the squared L2
    difference averaged over tokens. Returns ``(B,)``.
    """
    if len(real_layers) != len(fake_layers) or not real_layers:
        raise ValueError("lpips_like needs the same, non-zero number of layers on both sides")
    per_layer = [
        (F.normalize(r.float(), dim=-1) - F.normalize(f.float(), dim=-1)).pow(2).sum(-1).mean(-1)
        for r, f in zip(real_layers, fake_layers)
    ]
    return torch.stack(per_layer).mean(0)


def feature_distance_metrics(real_feats, fake_feats, real_layers: Optional[Sequence] = None,
                             fake_layers: Optional[Sequence] = None) -> dict:
    """Fréchet distance of pooled features (with ``num_samples`` and ``feature_dim``, needed to read it) and,
    when per-layer features of paired samples are given, the mean LPIPS-like distance (else ``None``)."""
    real_feats, fake_feats = torch.as_tensor(real_feats), torch.as_tensor(fake_feats)
    out = {
        "frechet_distance": frechet_distance(real_feats.numpy(), fake_feats.numpy()),
        "num_samples": int(real_feats.shape[0]),
        "feature_dim": int(real_feats.shape[1]),
        "lpips_like": None,
    }
    if real_layers is not None and fake_layers is not None:
        out["lpips_like"] = float(lpips_like(real_layers, fake_layers).mean())
    return out
