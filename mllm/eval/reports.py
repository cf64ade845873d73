"""Evaluation reports: run the suites, then write ``results.json``, ``results.md`` and PNG figures into a folder.

    vtok eval tokenizer --model DIR --out OUT [--suites ...] [--features PATH]
    vtok eval bundle --bundle DIR --out OUT

Tokenizer figures: ``rate_distortion.png`` (the tokenizer's point against JPEG/WebP curves), ``detail.png``
(error per grating frequency, cell size, line spacing, glyph size and per radial band on photos) and
``worst_<suite>.png`` (original | reconstruction for the worst cases). Bundle figure: ``generations.png``.
Figures are kept under 300 KB so reports can be committed.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from tokenizer_bridge.evaluation.ocr import tesseract_path
from tokenizer_bridge.evaluation.run import EvalSettings, Sample
from tokenizer_bridge.evaluation.suites import DEFAULT_SUITES, evaluate_tokenizer
from tokenizer_bridge.interface import load_visual_tokenizer as open_visual_tokenizer
from tokenizer_bridge.metrics import HFBackboneFeatures

MAX_FIGURE_BYTES = 300_000
SETUP_OCR = Path(__file__).resolve().parent.parent / "eval" / "setup_ocr.sh"


# ------------------------------------------------------------------------------------------------------- loading
def load_visual_tokenizer(path):
    """Any saved visual tokenizer folder (ours, wrapped or converted from a published checkpoint; see
    :func:`tokenizer_bridge.interface.load_visual_tokenizer`), or a bundle (its ``visual_tokenizer/`` subfolder)."""
    path = Path(path)
    if (path / "visual_tokenizer" / "config.json").is_file():
        path = path / "visual_tokenizer"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no visual tokenizer at {str(path)!r}: expected a folder with config.json + model.safetensors written "
            "by save_pretrained (or a bundle, which keeps it in visual_tokenizer/)"
        )
    return open_visual_tokenizer(str(path)).eval()


def ensure_tesseract(install: bool) -> None:
    """Run ``eval/setup_ocr.sh`` when Tesseract is missing and ``install``; otherwise say how to get it."""
    if tesseract_path() is not None:
        return
    if install and SETUP_OCR.is_file():
        subprocess.run(["bash", str(SETUP_OCR)], check=True)
    elif not install:
        print(f"Tesseract is not installed, so the text suite will be skipped: run `bash {SETUP_OCR}` "
              "(or pass --install-ocr)")


# ------------------------------------------------------------------------------------------------------ running
def run_tokenizer_eval(model_dir, out, images, suites: Sequence[str] = DEFAULT_SUITES, features: Optional[str] = None,
                       install_ocr: bool = False, **settings) -> dict:
    """Evaluate the tokenizer in ``model_dir`` on ``images`` (``{name: PIL image}``) and write the report into
    ``out``; returns the results."""
    model = load_visual_tokenizer(model_dir)
    extractor = HFBackboneFeatures(features) if features else None
    if "text" in suites:
        ensure_tesseract(install_ocr)
    results = evaluate_tokenizer(model, suites, extractor, EvalSettings(keep_samples=True, **settings), images=images)
    results["model"] = str(model_dir)
    write_tokenizer_report(results, out)
    return results


def run_bundle_eval(bundle_dir, out, **kwargs) -> dict:
    from .llm import evaluate_bundle

    results = evaluate_bundle(bundle_dir, keep_samples=True, **kwargs)
    write_bundle_report(results, out)
    return results


def write_json(results: dict, path: Path) -> None:
    clean = {k: v for k, v in results.items() if not k.startswith("_")}
    path.write_text(json.dumps(clean, indent=2, ensure_ascii=False, default=str))


# ------------------------------------------------------------------------------------------------------ markdown
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def md_suite(name: str, metrics: dict) -> str:
    """Scalars as one metric/value table, dicts of scalars (per frequency, per band, ...) as one table each."""
    if metrics.get("skipped"):
        return f"## {name}\n\nskipped: {metrics['reason']}\n"
    scalars = [(k, v) for k, v in metrics.items() if not isinstance(v, (dict, list)) or _flat_list(v)]
    parts = [f"## {name}", "", md_table(("metric", "value"), scalars)]
    for key, value in metrics.items():
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
            parts += ["", f"**{key}**", "", md_table(list(value), [list(value.values())])]
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            columns = list(next(iter(value.values())))
            parts += ["", f"**{key}**", "", md_table([key.removeprefix("by_"), *columns],
                                                     [[k, *v.values()] for k, v in value.items()])]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            columns = [c for c in value[0] if c != "text"]
            parts += ["", f"**{key}**", "", md_table(columns, [[r[c] for c in columns] for r in value[:24]])]
    return "\n".join(parts) + "\n"


def _flat_list(value) -> bool:
    return isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value)


def md_baselines(baselines: dict) -> str:
    rows = [("tokenizer", baselines["tokenizer"]["bpp"], baselines["tokenizer"]["psnr"],
             baselines["tokenizer"]["ssim"], None, None)]
    curves = []
    for codec, data in baselines.items():
        if isinstance(data, dict) and "matched" in data:
            m = data["matched"]
            rows.append((codec, m["bpp"], m["psnr"], m["ssim"], m["quality_mean"], m["fraction_matched"]))
            curves += [(codec, p["quality"], p["bpp"], p["psnr"], p["ssim"]) for p in data["sweep"]]
    return "\n".join([
        "## codec baselines at the tokenizer's rate", "",
        f"Same photos ({', '.join(baselines['photos'])}); each codec at the highest quality whose file fits the "
        f"tokenizer's {baselines['target_bpp']:.4g} bits per pixel (fraction matched < 1: even the lowest quality "
        "is larger, so the codec got more bits than the tokenizer).", "",
        md_table(("coder", "bpp", "PSNR (dB)", "SSIM", "quality (mean)", "fraction matched"), rows), "",
        "**rate-distortion sweeps**", "",
        md_table(("codec", "quality", "bpp", "PSNR (dB)", "SSIM"), curves), "",
    ])


def tokenizer_markdown(results: dict, figures: Sequence[str]) -> str:
    config = results["config"]
    quantizer = config.get("quantizer")  # a section {"type": ..., ...}, or the name in results of earlier versions
    quantizer = quantizer.get("type") if isinstance(quantizer, dict) else quantizer
    codebook_size = results.get("codebook_size", config.get("codebook_size"))
    lines = [
        "# Visual tokenizer evaluation", "",
        f"Model: `{results.get('model', '?')}` — {config.get('encoder')} encoder, {quantizer} "
        f"quantizer, K = {codebook_size}, downsample x{config.get('downsample')}, latent dim "
        f"{config.get('latent_dim')}. Feature extractor: {results.get('feature_extractor') or 'none'}.", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v), "",
        md_table(("suite", "seconds"), list(results["timings"].items())), "",
    ]
    lines += ["## summary", "", md_table(("suite", "metric", "value"), summary_rows(results)), ""]
    for name in results["suites"]:
        lines.append(md_suite(name, results[name]))
        if name == "codebook" and "baselines" in results:
            lines.append(md_baselines(results["baselines"]))
    lines += [f"![{f}]({f})\n" for f in figures]
    return "\n".join(lines)


SUMMARY = {
    "reconstruction": ("psnr", "ssim", "frechet_distance", "lpips_like"),
    "detail": ("psnr", "ssim"),
    "text": ("cer", "wer", "cer_original"),
    "codebook": ("codebook_usage", "perplexity", "bpp"),
    "alignment": ("cknna_quantized", "se_cknna"),
}


def summary_rows(results: dict) -> list[tuple]:
    """The headline numbers of each suite that ran, then each codec at the tokenizer's rate."""
    rows = [(name, key, results[name].get(key)) for name in results["suites"] if not results[name].get("skipped")
            for key in SUMMARY[name] if key in results[name]]
    for codec, data in results.get("baselines", {}).items():
        if isinstance(data, dict) and "matched" in data:
            m = data["matched"]
            rows.append((f"{codec} at {m['bpp']:.3g} bpp", "psnr / ssim", f"{m['psnr']:.4g} / {m['ssim']:.4g}"))
    return rows


# ------------------------------------------------------------------------------------------------------- figures
def save_small_png(image: Image.Image, path: Path, max_bytes: int = MAX_FIGURE_BYTES) -> None:
    """Save as PNG under ``max_bytes``: full colour if it fits, else a 256-colour palette, else shrunk in 15% steps."""
    while True:
        for candidate in (image, image.quantize(256, dither=Image.Dither.FLOYDSTEINBERG)):
            buffer = io.BytesIO()
            candidate.save(buffer, format="PNG", optimize=True)
            if buffer.tell() <= max_bytes or min(image.size) < 64:
                path.write_bytes(buffer.getvalue())
                return
        image = image.resize((int(image.width * 0.85), int(image.height * 0.85)), Image.Resampling.LANCZOS)


def _figure_to_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    save_small_png(Image.open(buffer).convert("RGB"), path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rate_distortion_figure(baselines: dict, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, unit in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        for codec, marker in (("jpeg", "o"), ("webp", "s")):
            if codec not in baselines:
                continue
            sweep = baselines[codec]["sweep"]
            ax.plot([p["bpp"] for p in sweep], [p[metric] for p in sweep], marker=marker, ms=4,
                    label=f"{codec.upper()} sweep")
            m = baselines[codec]["matched"]
            ax.scatter([m["bpp"]], [m[metric]], s=60, facecolors="none", edgecolors="black", zorder=3)
        t = baselines["tokenizer"]
        ax.scatter([t["bpp"]], [t[metric]], marker="*", s=220, color="crimson", zorder=4, label="tokenizer")
        ax.axvline(baselines["target_bpp"], color="crimson", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per pixel (log scale)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Rate-distortion on the evaluation photos (open circles: codecs at the tokenizer's bpp)", fontsize=10)
    _figure_to_png(fig, path)


def detail_figure(results: dict, path: Path) -> None:
    plt = _pyplot()
    detail, recon = results.get("detail"), results.get("reconstruction")
    panels = [p for p in ("grating", "patterns", "bands") if (p != "bands" or recon) and (p == "bands" or detail)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "grating":
            freqs = list(detail["grating_psnr"])
            x = [eval_fraction(f) for f in freqs]
            ax.plot(x, list(detail["grating_psnr"].values()), "o-", color="tab:blue")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("grating frequency (cycles/px)")
            ax.set_ylabel("PSNR (dB)", color="tab:blue")
            twin = ax.twinx()
            twin.plot(x, list(detail["grating_mtf"].values()), "s--", color="darkorange")
            twin.set_ylabel("contrast kept (MTF)", color="darkorange")
            twin.set_ylim(0, max(1.05, max(detail["grating_mtf"].values()) * 1.05))
            ax.set_title("gratings", fontsize=10)
        elif panel == "patterns":
            for family, label in (("checkerboard", "checkerboard cell"), ("lines", "line spacing"),
                                  ("glyphs", "glyph size")):
                values = detail[f"{family}_psnr"]
                ax.plot([float(k) for k in values], list(values.values()), "o-", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("pattern size (px)")
            ax.set_ylabel("PSNR (dB)")
            ax.legend(fontsize=8)
            ax.set_title("checkerboards, lines, glyphs", fontsize=10)
        else:
            bands = recon["band_error_ratio"]
            ax.bar(range(len(bands)), list(bands.values()), color="slategray")
            ax.set_xticks(range(len(bands)), list(bands), rotation=30, fontsize=8)
            ax.axhline(1.0, color="crimson", lw=0.8, ls=":")
            ax.set_xlabel("radial frequency band (cycles/px)")
            ax.set_ylabel("residual / signal energy")
            ax.set_title("photos: error per frequency band", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _figure_to_png(fig, path)


def eval_fraction(text: str) -> float:
    numerator, _, denominator = text.partition("/")
    return float(numerator) / float(denominator or 1)


def _font(size: int = 14):
    """DejaVu Sans from matplotlib's bundle (covers Greek and Cyrillic captions), else PIL's default font."""
    try:
        from tokenizer_bridge.evaluation.patterns import font_path

        return ImageFont.truetype(str(font_path("DejaVuSans.ttf")), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def comparison_grid(samples: Sequence[Sample], title: str, tile: int = 256, crop: Optional[int] = None,
                    zoom: int = 1, columns: int = 1, stacked: bool = False) -> Image.Image:
    """Cells of ``original | reconstruction`` (or one above the other when ``stacked``), each under its caption,
    laid out in ``columns``. ``crop``/``zoom`` show a centre crop enlarged with nearest-neighbour resampling (to see
    aliasing in detail patterns)."""
    cells = [_cell(s, tile, crop, zoom, stacked) for s in samples]
    cell_w, cell_h = max(c.width for c in cells), max(c.height for c in cells)
    rows = -(-len(cells) // columns)
    title_font = _font(15)
    width = max(columns * (cell_w + 10) + 10, int(title_font.getlength(title)) + 20)
    canvas = Image.new("RGB", (width, rows * (cell_h + 10) + 34), "white")
    ImageDraw.Draw(canvas).text((10, 8), title, fill="black", font=title_font)
    for i, cell in enumerate(cells):
        canvas.paste(cell, (10 + (i % columns) * (cell_w + 10), 34 + (i // columns) * (cell_h + 10)))
    return canvas


def _cell(sample: Sample, tile: int, crop: Optional[int], zoom: int, stacked: bool) -> Image.Image:
    a, b = _prepare(sample.original, tile, crop, zoom), _prepare(sample.reconstruction, tile, crop, zoom)
    if stacked:
        size = (max(a.width, b.width), a.height + b.height + 4)
    else:
        size = (a.width + b.width + 4, max(a.height, b.height))
    font = _font(12)
    caption = f"{sample.label}: {sample.caption}"
    while font.getlength(caption) > max(size[0], 120) and len(caption) > 10:
        caption = caption[:-2]
    cell = Image.new("RGB", (size[0], size[1] + 18), "white")
    ImageDraw.Draw(cell).text((0, 0), caption, fill="black", font=font)
    cell.paste(a, (0, 18))
    cell.paste(b, (0, 22 + a.height) if stacked else (a.width + 4, 18))
    return cell


def _prepare(image: Image.Image, tile: int, crop: Optional[int], zoom: int) -> Image.Image:
    if crop:
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        return image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)
    scale = min(1.0, tile / max(image.size))
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


def worst_case_figures(samples: dict, out: Path) -> list[str]:
    names = []
    if samples.get("reconstruction"):
        save_small_png(comparison_grid(samples["reconstruction"][:3], "Worst photos by PSNR (original | "
                                       "reconstruction)", tile=320), out / "worst_reconstruction.png")
        names.append("worst_reconstruction.png")
    if samples.get("detail"):
        save_small_png(comparison_grid(samples["detail"][:6], "Worst detail patterns by PSNR: 64 px centre crops, "
                                       "x3 (original | reconstruction)", crop=64, zoom=3, columns=3),
                       out / "worst_detail.png")
        names.append("worst_detail.png")
    if samples.get("text"):
        save_small_png(comparison_grid(samples["text"][:4], "Worst text samples by CER (original above "
                                       "reconstruction; caption: OCR of the reconstruction)", tile=512, columns=2,
                                       stacked=True), out / "worst_text.png")
        names.append("worst_text.png")
    return names


def write_tokenizer_report(results: dict, out) -> list[str]:
    """``results.json``, figures and ``results.md`` (linking the figures) into ``out``; returns the file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if "baselines" in results:
        rate_distortion_figure(results["baselines"], out / "rate_distortion.png")
        figures.append("rate_distortion.png")
    if "detail" in results or "reconstruction" in results:
        detail_figure(results, out / "detail.png")
        figures.append("detail.png")
    figures += worst_case_figures(results.get("_samples", {}), out)
    write_json(results, out / "results.json")
    (out / "results.md").write_text(tokenizer_markdown(results, figures))
    return ["results.json", "results.md", *figures]


def write_bundle_report(results: dict, out) -> list[str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    samples = results.get("_samples")
    if samples and samples["pictures"]:
        short = [c.replace("a ", "", 1).replace(" at the", "") for c in samples["captions"]]
        pictures = samples["pictures"]
        rows = [("generations", pictures[i : i + 8], short[i : i + 8]) for i in range(0, min(16, len(pictures)), 8)]
        save_small_png(samples_grid(rows), out / "generations.png")
        figures.append("generations.png")
    write_json(results, out / "results.json")
    lines = [
        "# Bundle evaluation", "", f"Bundle: `{results['bundle']}` (images {results['image_size']} px, held-out "
        f"shapes split of seed {results['seed']}).", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v), "",
        md_table(("part", "seconds"), list(results["timings"].items())), "",
        md_suite("image-token perplexity (teacher forced, held-out images)", results["image_tokens"]),
        md_suite("captioning and text-to-image (held-out combinations)", results["llm"]),
        md_suite("text-only perplexity", results["text"]),
        *[f"![{f}]({f})\n" for f in figures],
    ]
    (out / "results.md").write_text("\n".join(lines))
    return ["results.json", "results.md", *figures]


def _tile(image: Image.Image, size: int) -> Image.Image:
    resample = Image.Resampling.NEAREST if image.width < size else Image.Resampling.BICUBIC
    return image.convert("RGB").resize((size, size), resample)



def samples_grid(rows: list[tuple[str, list[Image.Image], list[str]]], tile: int = 96) -> Image.Image:
    """A labelled grid: one row per (title, images, captions)."""
    cols = max(len(images) for _, images, _ in rows)
    label_h, title_w = 14, 120
    canvas = Image.new("RGB", (title_w + cols * (tile + 4), len(rows) * (tile + label_h + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, images, labels) in enumerate(rows):
        y = r * (tile + label_h + 6)
        draw.text((4, y + tile // 2), title, fill="black")
        for c, image in enumerate(images):
            x = title_w + c * (tile + 4)
            canvas.paste(_tile(image, tile), (x, y))
            if c < len(labels):
                draw.text((x, y + tile + 1), labels[c][:18], fill="black")
    return canvas
