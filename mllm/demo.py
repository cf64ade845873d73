"""The end-to-end demo on embedded data: train a tokenizer, bridge a small LLM, train it, evaluate, draw samples.

    vtok demo --out DIR

1. trains the ViT + FSQ visual tokenizer of ``recipes/demo_tokenizer.yaml`` on shapes renders and photo crops,
   then (``recipes/demo_decoder.yaml``) retrains its decoder with overlapping footprints instead of tiles, the
   encoder and quantizer frozen, so the image ids stay the same and the block grid goes;
2. bridges a Llama built from ``recipes/demo_llm.yaml`` (or a pretrained LLM given with ``--llm PATH``) to it and
   trains captioning + text-to-image on the shapes train split;
3. evaluates on data never seen in training: reconstruction PSNR on held-out photographs, caption accuracy and
   text-to-image accuracy on held-out (colour, shape, position) combinations, each attribute judged on the text or
   on the generated pixels;
4. writes ``DIR/metrics.json`` and ``DIR/samples.png`` (originals | reconstructions | generations).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values
from tokenizer_bridge.metrics import psnr, seam_ratio

from .bundle.bundle import load_bundle
from .data import photos
from .eval.llm import evaluate_llm, heldout_examples
from .eval.reports import samples_grid
from .training.loop import run
from .training.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PHOTO_EVAL_SIZE = 128
PHOTO_EVAL_SIZE_LARGE = 256  # a second size the demo tokenizer never trains at
# Classifier-free guidance scale of the demo's text-to-image evaluation (the LLM recipe trains with prompt dropout,
# which makes the unconditional branch); the unguided accuracy is reported next to it.


def recipe_path(name: str) -> Path:
    path = RECIPES / name
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} not found (run the demo from a checkout of tokenizer-bridge)")
    return path


@torch.no_grad()
def reconstruction_psnr(visual_tokenizer, names: list[str], size: int = PHOTO_EVAL_SIZE) -> tuple[float, list]:
    """Mean PSNR (dB) of encode -> decode on photos (center crop resized to ``size``); also the reconstructions."""
    originals = [photos.center_resize(name, size) for name in names]
    pixels = to_pixel_values(originals)
    recon = visual_tokenizer.decode(visual_tokenizer.encode(pixels)).clamp(-1, 1)
    return float(psnr(recon, pixels).mean()), originals, recon


@torch.no_grad()
def bits_per_pixel(visual_tokenizer, size: int = PHOTO_EVAL_SIZE) -> float:
    """Bits of the image ids of one ``size`` x ``size`` image per pixel (ids x log2 of the codes per id)."""
    ids = visual_tokenizer.encode(torch.zeros(1, 3, size, size))
    return ids[0].numel() * math.log2(visual_tokenizer.codebook_size) / (size * size)


def write_samples(path: Path, photo_originals, photo_recon, shape_images, shape_recon, pictures, specs, processor) -> None:
    recon_images = processor.image_processor.postprocess(photo_recon)
    shape_recon_images = processor.image_processor.postprocess(shape_recon)
    short = [s.caption.replace("a ", "", 1).replace(" at the", "") for s in specs]
    rows = [
        ("originals", list(photo_originals) + list(shape_images), []),
        ("reconstructions", recon_images + shape_recon_images, []),
        ("generations", pictures[:8], short[:8]),
        ("generations", pictures[8:16], short[8:16]),
    ]
    samples_grid(rows, tile=PHOTO_EVAL_SIZE).save(path)  # the photos pixel for pixel: a block grid would show


def run_demo(out: str, llm: Optional[str] = None, gguf_file: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
    """Run the whole demo into ``out``; returns the metrics written to ``out/metrics.json``."""
    start = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    tok = load_recipe(recipe_path("demo_tokenizer.yaml"), [f"output_dir={out_dir / 'tokenizer'}", *overrides.get("tokenizer", [])])
    tokenizer_path, tok_history = run(tok)
    tokenizer_seconds = time.time() - start
    dec = load_recipe(recipe_path("demo_decoder.yaml"), [f"output_dir={out_dir / 'decoder'}", f"init_from={tokenizer_path}",
                                                        *overrides.get("decoder", [])])
    tokenizer_path, _ = run(dec)  # the same image ids, an overlapping decoder instead of the tiles
    decoder_seconds = time.time() - start - tokenizer_seconds
    llm_overrides = [f"output_dir={out_dir / 'llm'}", f"visual_tokenizer={tokenizer_path}", *overrides.get("llm", [])]
    if llm:
        llm_overrides += [f"model.base={llm}"] + ([f"model.gguf_file={gguf_file}"] if gguf_file else [])
    llm_recipe = load_recipe(recipe_path("demo_llm.yaml"), llm_overrides)
    bundle_path, llm_history = run(llm_recipe)
    llm_seconds = time.time() - start - tokenizer_seconds - decoder_seconds
    model, processor = load_bundle(bundle_path)
    model.eval()
    vt = processor.visual_tokenizer.eval()

    _, heldout_photos = photos.photo_splits()
    photo_psnr, originals, recon = reconstruction_psnr(vt, heldout_photos)
    photo_psnr_large, originals_large, recon_large = reconstruction_psnr(vt, heldout_photos, PHOTO_EVAL_SIZE_LARGE)
    period = int(vt.config.downsample)  # pixels per id along a side, as the evaluation suites read it
    results = evaluate_llm(model, processor, llm_recipe.data.seed, llm_recipe.data.image_size)
    specs, pictures = results.pop("_specs"), results.pop("_pictures")
    shape_imgs = heldout_examples(llm_recipe.data.seed, llm_recipe.data.image_size)[1][:4]
    shape_recon = vt.decode(vt.encode(to_pixel_values(shape_imgs))).clamp(-1, 1)
    write_samples(out_dir / "samples.png", originals, recon, shape_imgs, shape_recon, pictures, specs, processor)

    metrics = {
        "reconstruction_psnr": photo_psnr,
        "reconstruction_psnr_photos": heldout_photos,
        "reconstruction_size": PHOTO_EVAL_SIZE,
        "reconstruction_psnr_256": photo_psnr_large,
        "bits_per_pixel": bits_per_pixel(vt),
        # the tile grid: steps across the id cells' boundaries over steps elsewhere (~1 without a grid)
        "reconstruction_seam_ratio": seam_ratio(recon, period),
        "reconstruction_seam_ratio_256": seam_ratio(recon_large, period),
        "photo_seam_ratio": seam_ratio(to_pixel_values(originals), period),
        "photo_seam_ratio_256": seam_ratio(to_pixel_values(originals_large), period),
        "tokenizer_image_size": tok.data.image_size,
        **results,
        "caption_chance": results["chance"]["all"],
        "t2i_chance": results["chance"]["all"],
        "tokenizer_final_loss": float(np.mean([h["loss"] for h in tok_history[-20:]])) if tok_history else None,
        "llm_final_loss": float(np.mean([h["loss"] for h in llm_history[-20:]])) if llm_history else None,
        "bundle": str(bundle_path),
        "tokenizer_seconds": tokenizer_seconds,
        "decoder_seconds": decoder_seconds,
        "llm_seconds": llm_seconds,
        "wall_seconds": time.time() - start,
    }
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
