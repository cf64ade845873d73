"""``vtok``: the command line of tokenizer-bridge.

    vtok demo --out DIR                       train + bridge + evaluate on embedded data (the README's main job)
    vtok train RECIPE.yaml [key=value ...]    one training stage (also: accelerate launch -m mllm.train ...)
    vtok generate --bundle DIR --prompt TEXT --out IMAGE.png [--num N --sample --seed S]
    vtok caption --bundle DIR IMAGE [IMAGE ...]
    vtok eval tokenizer --model DIR --out OUT [--suites ...] [--features PATH]   evaluation suites + report
    vtok eval bundle --bundle DIR --out OUT [--base-model PATH --texts FILE]     LLM-level checks + report
    vtok pretokenize --source FILE|DIR --visual-tokenizer DIR --out DIR [--num-processes N --kind K --shard-size N ...]
    vtok convert {ibq,open-magvit2,llamagen} --checkpoint FILE [--config ORIGINAL.yaml] --out DIR [--no-ema]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from .data.pretokenize_args import DESCRIPTION as PRETOKENIZE_DESCRIPTION
from .data.pretokenize_args import add_arguments as add_pretokenize_arguments


def _demo(args) -> None:
    from .demo import run_demo

    seed = [f"train.seed={args.seed}"] if args.seed is not None else []
    overrides = {"tokenizer": seed, "decoder": seed, "llm": seed}
    metrics = run_demo(args.out, llm=args.llm, gguf_file=args.gguf_file, overrides=overrides)
    keys = ("reconstruction_psnr", "reconstruction_psnr_256", "reconstruction_seam_ratio", "caption_accuracy",
            "t2i_accuracy", "t2i_accuracy_unguided", "t2i_tokenizer_ceiling", "tokenizer_ceiling_10_renders",
            "caption_chance", "wall_seconds")
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'samples.png'}")


def _train(args) -> None:
    from .training.loop import main

    main([args.recipe, *args.overrides])


def _generate(args) -> None:
    import torch

    from .bundle.bundle import load_bundle
    from .eval.reports import samples_grid
    from .generation.inference import text_to_image

    torch.manual_seed(args.seed)
    model, processor = load_bundle(args.bundle)
    model.eval()
    images = text_to_image(model, processor, [args.prompt] * args.num, do_sample=args.sample)
    out = Path(args.out)
    if args.num == 1:
        images[0].save(out)
    else:
        samples_grid([(args.prompt[:18], images, [])]).save(out)
    print(f"wrote {out}")


def _caption(args) -> None:
    from .bundle.bundle import load_bundle
    from .generation.inference import caption_images

    model, processor = load_bundle(args.bundle)
    model.eval()
    for path, caption in zip(args.images, caption_images(model, processor, list(args.images))):
        print(f"{path}\t{caption}")


def _pretokenize(args) -> None:
    from .data.pretokenize_args import run

    run(args)


def _eval_tokenizer(args) -> None:
    from tokenizer_bridge.evaluation.suites import DEFAULT_SUITES

    from .data.photos import load_photos
    from .eval.reports import run_tokenizer_eval

    if args.images:
        images = _user_images(args.images, args.image_column, args.max_images)
    else:
        which = args.photos[0] if len(args.photos) == 1 and args.photos[0] in ("heldout", "all") else args.photos
        images = load_photos(which)
    results = run_tokenizer_eval(args.model, args.out, images, suites=args.suites or DEFAULT_SUITES,
                                 features=args.features, install_ocr=args.install_ocr, max_side=args.max_side or None,
                                 detail_size=args.detail_size)
    headline = {name: {k: v for k, v in results[name].items() if isinstance(v, float)} for name in results["suites"]}
    print(json.dumps({"timings": results["timings"], **headline}, indent=2))
    print(f"wrote {Path(args.out) / 'results.json'}, results.md and figures")


def _user_images(path: str, image_column: str, limit: int) -> dict:
    """``{name: image}`` of the first ``limit`` readable images of an image source (bad ones are reported, skipped)."""
    from .data.sources import open_image, read_images

    source = read_images(path, image_column=image_column)
    images, bad = {}, 0
    for i in range(len(source)):
        if limit and len(images) >= limit:
            break
        value = source[i]["image"]
        image, reason, detail = open_image(value)
        if image is None:
            bad += 1
            print(f"skipping an image ({reason}): {detail}", file=sys.stderr)
            continue
        name = value.get("path") if isinstance(value, dict) else value
        images[f"{i:05d}_{os.path.basename(str(name))}" if name else f"image_{i}"] = image
    if not images:
        raise SystemExit(f"no readable images in {path} ({bad} unreadable)")
    return images


def _eval_bundle(args) -> None:
    from .eval.reports import run_bundle_eval

    texts = [line for line in Path(args.texts).read_text().splitlines() if line.strip()] if args.texts else None
    results = run_bundle_eval(args.bundle, args.out, seed=args.seed, texts=texts, base_model=args.base_model)
    print(json.dumps({k: results[k] for k in ("image_tokens", "text", "timings")}, indent=2))
    llm = results["llm"]
    print(f"caption accuracy {llm['caption_accuracy']:.3f}, t2i accuracy {llm['t2i_accuracy']:.3f}")
    print(f"wrote {Path(args.out) / 'results.json'}, results.md")


def _convert(args) -> None:
    from tokenizer_bridge.published_checkpoints import CheckpointKeyError, UnsafeCheckpointError, convert_checkpoint

    try:
        convert_checkpoint(args.family, args.checkpoint, args.out, config=args.config, use_ema=not args.no_ema,
                           trust_pickle=args.trust_pickle)
    except (UnsafeCheckpointError, CheckpointKeyError) as error:
        raise SystemExit(f"vtok convert: {error}") from None


def _add_convert_parser(sub) -> None:
    conv = sub.add_parser("convert", help="a published IBQ / Open-MAGVIT2 / LlamaGen checkpoint -> a visual "
                          "tokenizer folder (safetensors) that load_visual_tokenizer and bridge_llm take")
    conv.add_argument("family", choices=["ibq", "open-magvit2", "llamagen"])
    conv.add_argument("--checkpoint", required=True, help="the original .ckpt / .pt file")
    conv.add_argument("--config", help="the original YAML config (default: infer the architecture from the weights)")
    conv.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    conv.add_argument("--no-ema", dest="no_ema", action="store_true", help="take the trained, not the EMA, weights")
    conv.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                      help="unpickle fully (can run code): only for files you trust that the safe loader refuses")
    conv.set_defaults(func=_convert)


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a visual tokenizer or a bundle (results.json, results.md, figures)")
    kinds = ev.add_subparsers(dest="eval_command", required=True)
    tok = kinds.add_parser("tokenizer", help="reconstruction, detail, text (OCR), codebook/rate and alignment suites")
    tok.add_argument("--model", required=True, help="visual tokenizer folder (or a bundle)")
    tok.add_argument("--out", required=True, help="report folder")
    tok.add_argument("--suites", nargs="+", help="default: reconstruction detail text codebook; also: alignment "
                     "(needs --features); an unknown name is an error listing the choices")
    tok.add_argument("--features", help="local HF vision backbone folder for FD / LPIPS-like / CKNNA metrics")
    tok.add_argument("--images", help="your images: a folder, a JSONL/CSV list, a glob of .tar shards or a "
                     "save_to_disk folder (evaluated at native resolution up to --max-side); default: --photos")
    tok.add_argument("--image-column", dest="image_column", default="image", help="image column of a list or dataset")
    tok.add_argument("--max-images", dest="max_images", type=int, default=64, help="evaluate at most this many (0: all)")
    tok.add_argument("--photos", nargs="+", default=["heldout"], help="'heldout', 'all' or photo names (bundled)")
    tok.add_argument("--max-side", dest="max_side", type=int, default=512, help="cap on a photo's long side (0: none)")
    tok.add_argument("--detail-size", dest="detail_size", type=int, default=256, help="side of the detail patterns")
    tok.add_argument("--install-ocr", dest="install_ocr", action="store_true",
                     help="run eval/setup_ocr.sh when Tesseract is missing (needs root)")
    tok.set_defaults(func=_eval_tokenizer)
    bun = kinds.add_parser("bundle", help="image-token perplexity, caption/t2i accuracy, text perplexity")
    bun.add_argument("--bundle", required=True)
    bun.add_argument("--out", required=True)
    bun.add_argument("--seed", type=int, default=0, help="seed of the held-out shapes split (the recipe's data.seed)")
    bun.add_argument("--base-model", dest="base_model", help="the LLM before bridging, for its text perplexity")
    bun.add_argument("--texts", help="text file, one sample per line (default: held-out captions)")
    bun.set_defaults(func=_eval_bundle)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtok", description="tokenizer-bridge: unified text+image tokens for HF LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tokenizer, bridge an LLM, train, evaluate (embedded data)")
    demo.add_argument("--out", required=True, help="output folder (metrics.json, samples.png, runs)")
    demo.add_argument("--llm", help="path of a pretrained causal LM to bridge instead of a tiny Llama")
    demo.add_argument("--gguf-file", dest="gguf_file", help="GGUF file name inside --llm")
    demo.add_argument("--seed", type=int, default=None,
                      help="train.seed of every stage (default: the recipes' 0); the held-out split stays the same, "
                           "so runs with different seeds measure the run-to-run spread")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="run one training stage from a recipe")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train.set_defaults(func=_train)
    gen = sub.add_parser("generate", help="text -> image with a bundle")
    gen.add_argument("--bundle", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True)
    gen.add_argument("--num", type=int, default=1)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)
    cap = sub.add_parser("caption", help="image -> text with a bundle")
    cap.add_argument("--bundle", required=True)
    cap.add_argument("images", nargs="+")
    cap.set_defaults(func=_caption)
    pre = sub.add_parser("pretokenize", help="encode captions, interleaved documents or conversations into image ids "
                         "once (resumable, many processes)", description=PRETOKENIZE_DESCRIPTION)
    add_pretokenize_arguments(pre)
    pre.set_defaults(func=_pretokenize)
    _add_eval_parser(sub)
    _add_convert_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.func(args)


if __name__ == "__main__":
    main()
