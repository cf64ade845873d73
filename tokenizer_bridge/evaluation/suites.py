"""Evaluation suites for visual tokenizers: VTBench-style measurements (VTBench, 2025) with its flaws fixed.

:func:`evaluate_tokenizer` runs any of these suites on a :class:`~tokenizer_bridge.VisualTokenizer` and returns one
JSON-ready dict (per suite: metric name -> value; codec baselines under ``baselines``; settings, model config and
package versions):

- ``reconstruction``: the bundled photographs at native resolution (long side capped at ``max_side``, then
  centre-cropped to a multiple of ``downsample``), PSNR, SSIM, residual energy per radial frequency band, and, with a
  feature extractor, Fréchet distance and LPIPS-like distance over paired tiles at the extractor's input size;
- ``detail``: sinusoidal gratings, checkerboards, one-pixel lines and small glyphs -> PSNR/SSIM per frequency, cell,
  spacing and glyph size, plus the contrast each grating keeps (a modulation transfer function);
- ``text``: known strings rendered in several fonts, sizes and scripts, read back with Tesseract; CER/WER against
  the ground-truth strings, with the OCR of the originals as the ceiling;
- ``codebook``: code usage, perplexity (per level for multi-level ids), bits per pixel of the token stream, and
  JPEG/WebP at the same bits per pixel on the same photos plus their rate-distortion sweeps (``baselines``);
- ``alignment`` (needs a feature extractor): CKNNA and SE-CKNNA between the tokenizer's pooled features and the
  extractor's on random photo crops.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..image_processing_visual_tokenizer import (
    random_crops,
    to_pil_images,
    to_pixel_values,
)
from ..metrics import (
    OCTAVE_EDGES,
    FeatureExtractor,
    band_energies,
    bits_per_pixel,
    cer,
    cknna,
    codebook_metrics,
    frechet_distance,
    lpips_like,
    psnr,
    se_cknna,
    ssim,
    wer,
)
from . import codecs, ocr
from .patterns import (
    TEXT_SAMPLES,
    detail_patterns,
    format_parameter,
    render_text,
)
from .run import EvalSettings, Images, Sample, TokenizerRun, round_trip

SUITES = ("reconstruction", "detail", "text", "codebook", "alignment")
DEFAULT_SUITES = ("reconstruction", "detail", "text", "codebook")
NO_FEATURES = "no feature extractor weights given (pass feature_extractor=, or --features PATH on the command line)"


# ----------------------------------------------------------------------------------------------- reconstruction
def band_labels(edges: Sequence[float] = OCTAVE_EDGES) -> list[str]:
    """``"0-1/64"``, ``"1/64-1/32"``, ..., ``"1/4+"`` (cycles per pixel)."""
    names = [str(Fraction(e).limit_denominator(1024)) for e in edges]
    return [f"{lo}-{hi}" if e < 0.5 else f"{lo}+" for lo, hi, e in zip(names[:-1], names[1:], edges[1:])]


def reconstruction_suite(run: TokenizerRun) -> dict:
    scores = run.photo_scores
    residual = reference = 0
    for p in run.photos:
        r, s = band_energies(p.reconstruction, p.pixel_values)
        residual, reference = residual + r, reference + s
    out = {
        "psnr": float(np.mean([s["psnr"] for s in scores])),
        "ssim": float(np.mean([s["ssim"] for s in scores])),
        "psnr_min": float(np.min([s["psnr"] for s in scores])),
        "num_images": len(scores),
        "band_error_ratio": dict(zip(band_labels(), (residual / reference.clamp_min(1e-12)).tolist())),
        **feature_metrics(run),
        "per_image": scores,
    }
    run.keep("reconstruction", [
        Sample(p.name, to_pil_images(p.pixel_values)[0], to_pil_images(p.reconstruction)[0], s["psnr"],
               f"{s['psnr']:.1f} dB")
        for p, s in sorted(zip(run.photos, scores), key=lambda ps: ps[1]["psnr"])
    ])
    return out


def tiles(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping ``size`` x ``size`` tiles of ``(1, 3, H, W)`` (grid centred, remainder dropped)."""
    h, w = pixel_values.shape[-2:]
    rows, cols = h // size, w // size
    top, left = (h - rows * size) // 2, (w - cols * size) // 2
    grid = pixel_values[0, :, top : top + rows * size, left : left + cols * size]  # (3, rows*size, cols*size)
    return grid.unfold(1, size, size).unfold(2, size, size).permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)


def feature_metrics(run: TokenizerRun) -> dict:
    """Fréchet and LPIPS-like distances between paired tiles of originals and reconstructions, or nulls."""
    extractor = run.feature_extractor
    if extractor is None:
        return {"frechet_distance": None, "lpips_like": None, "feature_metrics_note": NO_FEATURES}
    size = extractor.input_size or 224
    real = torch.cat([tiles(p.pixel_values, size) for p in run.photos if min(p.pixel_values.shape[-2:]) >= size])
    fake = torch.cat([tiles(p.reconstruction, size) for p in run.photos if min(p.pixel_values.shape[-2:]) >= size])
    if len(real) > run.settings.max_feature_tiles:
        keep = torch.randperm(len(real), generator=torch.Generator().manual_seed(run.settings.seed))
        keep = keep[: run.settings.max_feature_tiles]
        real, fake = real[keep], fake[keep]
    return {**paired_feature_metrics(extractor, real, fake), "tile_size": size}


@torch.no_grad()
def paired_feature_metrics(extractor: FeatureExtractor, real: torch.Tensor, fake: torch.Tensor,
                           batch_size: int = 32) -> dict:
    """Fréchet distance of pooled features and mean LPIPS-like distance over paired images ``(n, 3, H, W)``,
    computed batch by batch so per-layer features are never all held at once."""
    if len(real) < 2:
        raise ValueError(f"feature metrics need at least 2 paired tiles, got {len(real)}")
    pooled_real, pooled_fake, distances = [], [], []
    for start in range(0, len(real), batch_size):
        a, b = extractor(real[start : start + batch_size]), extractor(fake[start : start + batch_size])
        pooled_real.append(a.pooled)
        pooled_fake.append(b.pooled)
        if a.layers and b.layers:
            distances.append(lpips_like(a.layers, b.layers))
    pooled_real, pooled_fake = torch.cat(pooled_real), torch.cat(pooled_fake)
    return {
        "frechet_distance": frechet_distance(pooled_real.double().numpy(), pooled_fake.double().numpy()),
        "lpips_like": float(torch.cat(distances).mean()) if distances else None,
        "num_samples": len(real),
        "feature_dim": int(pooled_real.shape[1]),
    }


# ------------------------------------------------------------------------------------------------------- detail
def grating_contrast(reconstruction: torch.Tensor, original: torch.Tensor, frequency: float, degrees: float) -> float:
    """Amplitude of the grating's own sinusoid in the reconstruction over that in the original (1 = kept, 0 =
    flattened): a matched filter, so it works for any orientation, on or off the FFT grid."""
    h, w = original.shape[-2:]
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    theta = np.deg2rad(degrees)
    carrier = torch.exp(-2j * np.pi * frequency * (x * np.cos(theta) + y * np.sin(theta)))

    def amplitude(pixel_values: torch.Tensor) -> float:
        gray = pixel_values.reshape(3, h, w).to(torch.float64).mean(0)
        return float(((gray - gray.mean()) * carrier).sum().abs())

    return amplitude(reconstruction) / max(amplitude(original), 1e-12)


def detail_suite(run: TokenizerRun) -> dict:
    patterns = detail_patterns(run.settings.detail_size)
    pixel_values = to_pixel_values([p.image for p in patterns])
    _, recon = round_trip(run.model, pixel_values, run.settings.batch_size)
    rows = [{"pattern": p, "psnr": float(q), "ssim": float(s)}
            for p, q, s in zip(patterns, psnr(recon, pixel_values), ssim(recon, pixel_values))]
    out = {"psnr": float(np.mean([r["psnr"] for r in rows])), "ssim": float(np.mean([r["ssim"] for r in rows]))}
    for family in ("grating", "checkerboard", "lines", "glyphs"):
        for metric in ("psnr", "ssim"):
            out[f"{family}_{metric}"] = _mean_by_parameter(rows, family, metric)
    for i, r in enumerate(rows):
        p = r["pattern"]
        if p.family == "grating":
            r["mtf"] = grating_contrast(recon[i], pixel_values[i], p.parameter, float(p.variant.removesuffix("deg")))
    out["grating_mtf"] = _mean_by_parameter(rows, "grating", "mtf")
    out["size"] = run.settings.detail_size
    run.keep("detail", sorted(
        (Sample(r["pattern"].label, r["pattern"].image, to_pil_images(recon[i])[0], r["psnr"], f"{r['psnr']:.1f} dB")
         for i, r in enumerate(rows)), key=lambda s: s.score))
    return out


def _mean_by_parameter(rows: list[dict], family: str, metric: str) -> dict:
    groups: dict[float, list[float]] = {}
    for r in rows:
        if r["pattern"].family == family and metric in r:
            groups.setdefault(r["pattern"].parameter, []).append(r[metric])
    return {format_parameter(family, k): float(np.mean(v)) for k, v in sorted(groups.items())}


# --------------------------------------------------------------------------------------------------------- text
@dataclass
class TextCase:
    language: str
    font: str
    size: int
    text: str
    image: Image.Image = field(repr=False)


def text_cases(settings: EvalSettings, divisor: int) -> list[TextCase]:
    unknown = sorted(set(settings.text_languages) - set(TEXT_SAMPLES))
    if unknown:
        raise ValueError(f"unknown text language(s) {unknown}; known: {sorted(TEXT_SAMPLES)}")
    return [
        TextCase(lang, font, size, TEXT_SAMPLES[lang][1],
                 render_text(TEXT_SAMPLES[lang][1], font, size, settings.text_width, divisor))
        for lang in settings.text_languages for font in settings.text_fonts for size in settings.text_sizes
    ]


def text_suite(run: TokenizerRun) -> dict:
    command = run.settings.tesseract
    if ocr.tesseract_path(command) is None:
        return {"skipped": True, "reason": f"Tesseract ({command!r}) not found: {ocr.SETUP_HINT}"}
    installed = ocr.tesseract_languages(command)
    wanted = [lang for lang in run.settings.text_languages if TEXT_SAMPLES[lang][0] in installed]
    missing = sorted(set(run.settings.text_languages) - set(wanted))
    if not wanted:
        return {"skipped": True, "reason": f"no Tesseract language pack for {missing}: {ocr.SETUP_HINT}"}
    cases = text_cases(replace(run.settings, text_languages=wanted), run.downsample)
    recons = [round_trip(run.model, to_pixel_values(c.image))[1] for c in cases]
    jobs = [(c.image, c) for c in cases] + [(to_pil_images(r)[0], c) for r, c in zip(recons, cases)]
    with ThreadPoolExecutor(max(1, run.settings.ocr_workers)) as pool:
        texts = list(pool.map(lambda job: ocr.ocr(job[0], TEXT_SAMPLES[job[1].language][0], job[1].size, command),
                              jobs))
    rows = [_score_text(c, texts[i], texts[len(cases) + i], r) for i, (c, r) in enumerate(zip(cases, recons))]
    out = {key: float(np.mean([r[key] for r in rows])) for key in ("cer", "wer", "cer_original", "wer_original")}
    out["psnr"] = float(np.mean([r["psnr"] for r in rows]))
    out["num_samples"] = len(rows)
    for group in ("language", "size", "font"):
        out[f"by_{group}"] = _group_text(rows, group)
    out["languages_missing_ocr"] = missing
    out["samples"] = rows
    run.keep("text", sorted((Sample(f"{c.language} {c.font.removesuffix('.ttf')} {c.size}px", c.image,
                                    to_pil_images(recons[i])[0], -rows[i]["cer"], rows[i]["ocr_reconstruction"][:60])
                             for i, c in enumerate(cases)), key=lambda s: s.score))
    return out


def _score_text(case: TextCase, read_original: str, read_reconstruction: str, recon: torch.Tensor) -> dict:
    truth = ocr.normalize_text(case.text)
    original, reconstructed = ocr.normalize_text(read_original), ocr.normalize_text(read_reconstruction)
    return {
        "language": case.language, "font": case.font, "size": case.size, "text": truth,
        "ocr_original": original, "ocr_reconstruction": reconstructed,
        "cer": cer(truth, reconstructed), "wer": wer(truth, reconstructed),
        "cer_original": cer(truth, original), "wer_original": wer(truth, original),
        "psnr": float(psnr(recon, to_pixel_values(case.image))[0]),
    }


def _group_text(rows: list[dict], key: str) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return {str(k): {m: float(np.mean([r[m] for r in v])) for m in ("cer", "wer", "cer_original")}
            for k, v in sorted(groups.items())}


# ------------------------------------------------------------------------------------------------------ codebook
def level_sizes(model) -> list[int]:
    """Codes per level (residual quantizers may size their levels differently)."""
    sizes = getattr(getattr(model, "quantizer", None), "level_codebook_sizes", None)
    return list(sizes) if sizes else [model.codebook_size] * model.num_levels


def codebook_suite(run: TokenizerRun) -> dict:
    sizes = level_sizes(run.model)
    per_image = [p.image_ids.reshape(-1, len(sizes)) for p in run.photos]  # (positions, L) each
    ids = torch.cat(per_image)
    num_pixels = sum(p.pixel_values.shape[2] * p.pixel_values.shape[3] for p in run.photos)
    levels = [{**codebook_metrics(ids[:, level], size), "codebook_size": size,
               "entropy_bits": _entropy_bits(ids[:, level], size)} for level, size in enumerate(sizes)]
    out = {
        "codebook_size": sizes[0] if len(sizes) == 1 else sizes,
        "codebook_usage": float(np.mean([lv["codebook_usage"] for lv in levels])),
        "perplexity": levels[0]["perplexity"] if len(sizes) == 1 else [lv["perplexity"] for lv in levels],
        "unused_codes": int(sum(round((1 - lv["codebook_usage"]) * lv["codebook_size"]) for lv in levels)),
        "num_tokens": len(ids),
        "tokens_per_image": float(np.mean([len(x) for x in per_image])),
        "bits_per_token": float(sum(np.log2(sizes))),
        "bpp": bits_per_pixel(len(ids), sizes, num_pixels, 1),
        "bpp_entropy": len(ids) * sum(lv["entropy_bits"] for lv in levels) / num_pixels,
        "per_level": levels if len(sizes) > 1 else None,
    }
    if len(sizes) == 1:
        out["normalized_perplexity"] = out["perplexity"] / sizes[0]
    run.baselines = codec_rate_baselines(run, out["bpp"])
    return out


def _entropy_bits(ids: torch.Tensor, size: int) -> float:
    counts = torch.bincount(ids.reshape(-1), minlength=size).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log2()).sum())


def codec_rate_baselines(run: TokenizerRun, target_bpp: float) -> dict:
    originals = [to_pil_images(p.pixel_values)[0] for p in run.photos]
    scores = run.photo_scores
    return {
        "target_bpp": target_bpp,
        "tokenizer": {"bpp": target_bpp, "psnr": float(np.mean([s["psnr"] for s in scores])),
                      "ssim": float(np.mean([s["ssim"] for s in scores]))},
        **codecs.codec_baselines(originals, target_bpp, run.settings.codecs),
        "photos": [p.name for p in run.photos],
    }


# ----------------------------------------------------------------------------------------------------- alignment
def alignment_suite(run: TokenizerRun) -> dict:
    extractor, settings = run.feature_extractor, run.settings
    if extractor is None:
        raise ValueError(f"the alignment suite needs a feature extractor: {NO_FEATURES}")
    size = max(settings.alignment_crop_size // run.downsample, 1) * run.downsample
    crops = random_crops(list(run.images.values()), size, settings.alignment_crops, seed=settings.seed)
    pixel_values = to_pixel_values(crops)
    reference = lambda x: _batched(lambda b: extractor(b).pooled, x, settings.batch_size)  # noqa: E731
    quantized = lambda x: _batched(functools.partial(_pooled_codes, run.model), x, settings.batch_size)  # noqa: E731
    latents = lambda x: _batched(functools.partial(_pooled_latents, run.model), x, settings.batch_size)  # noqa: E731
    k = settings.alignment_k
    se = se_cknna(quantized, reference, pixel_values, k=k, seed=settings.seed)
    return {
        "cknna_quantized": se["clean"],
        "cknna_latents": cknna(latents(pixel_values), reference(pixel_values), k=k),
        "se_cknna": se["se_cknna"],
        **{f"se_cknna_{name}": value for name, value in se.items() if name not in ("clean", "se_cknna")},
        "num_samples": len(pixel_values), "k": k, "crop_size": size,
    }


@torch.no_grad()
def _pooled_codes(model, pixel_values: torch.Tensor) -> torch.Tensor:
    codes = model.quantizer.lookup(model.encode(pixel_values.to(model.device, model.dtype)))  # (B, D, h, w)
    return codes.float().mean((2, 3)).cpu()


@torch.no_grad()
def _pooled_latents(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return model.encode_latents(pixel_values.to(model.device, model.dtype)).float().mean((2, 3)).cpu()


def _batched(fn, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(pixel_values[i : i + batch_size]) for i in range(0, len(pixel_values), batch_size)])


# ----------------------------------------------------------------------------------------------------- the entry
SUITE_FUNCTIONS = {
    "reconstruction": reconstruction_suite,
    "detail": detail_suite,
    "text": text_suite,
    "codebook": codebook_suite,
    "alignment": alignment_suite,
}


def environment(tesseract: Optional[str] = None) -> dict:
    """Versions of the packages (and Tesseract) that produced a result."""
    versions = {"python": platform.python_version()}
    for package in ("tokenizer-bridge", "torch", "transformers", "numpy", "pillow", "scipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    if tesseract:
        versions["tesseract"] = ocr.tesseract_version(tesseract)
    return versions


def evaluate_tokenizer(model, suites: Sequence[str] = DEFAULT_SUITES,
                       feature_extractor: Optional[FeatureExtractor] = None,
                       settings: Optional[EvalSettings] = None, *, images: Images, **overrides) -> dict:
    """Run ``suites`` on a visual tokenizer; ``overrides`` replace fields of ``settings`` (:class:`EvalSettings`).

    ``images`` (``{name: PIL image}`` or a list of PIL images) are what the reconstruction, codebook and alignment
    suites measure, at native resolution up to ``max_side``; the detail and text suites draw their own patterns.

    Returns a JSON-ready dict: one entry per suite (metric name -> value), ``baselines`` (when ``codebook`` ran),
    ``timings`` (seconds per suite; the photo round trips count towards the first suite that needs them),
    ``settings``, ``config`` (the tokenizer's) and ``versions``; plus ``_samples`` (PIL images, not JSON) when
    ``keep_samples`` is set.
    """
    settings = replace(settings or EvalSettings(), **overrides)
    unknown = sorted(set(suites) - set(SUITES))
    if unknown or not suites:
        raise ValueError(f"unknown or no suite(s) {unknown or list(suites)}; choose from {SUITES}")
    if "alignment" in suites and feature_extractor is None:
        raise ValueError(f"the alignment suite needs a feature extractor: {NO_FEATURES}")
    run = TokenizerRun(model.eval(), images, settings, feature_extractor)
    result: dict = {"suites": list(suites)}
    timings = {}
    for name in suites:
        start = time.perf_counter()
        result[name] = SUITE_FUNCTIONS[name](run)
        timings[name] = time.perf_counter() - start
    if run.baselines is not None:
        result["baselines"] = run.baselines
    result["timings"] = timings
    result["settings"] = {**asdict(settings), "images": list(run.images)}
    result["config"] = json.loads(model.config.to_json_string(use_diff=False))
    result["codebook_size"], result["num_levels"] = model.codebook_size, model.num_levels
    result["versions"] = environment(settings.tesseract if "text" in suites else None)
    result["feature_extractor"] = getattr(feature_extractor, "path", None) or (
        type(feature_extractor).__name__ if feature_extractor is not None else None)
    if settings.keep_samples:
        result["_samples"] = run.samples
    return result
