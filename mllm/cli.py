"""``vtok``: the command line of tokenizer-bridge.

    vtok demo --out DIR                       train + bridge + evaluate on embedded data (the README's main job)
    vtok train RECIPE.yaml [key=value ...]    one training stage (also: accelerate launch -m mllm.train ...)
    vtok generate --bundle DIR --prompt TEXT --out IMAGE.png [--num N --sample --seed S]
    vtok caption --bundle DIR IMAGE [IMAGE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def _demo(args) -> None:
    from .demo import run_demo

    metrics = run_demo(args.out, llm=args.llm, gguf_file=args.gguf_file)
    keys = ("reconstruction_psnr", "caption_accuracy", "t2i_accuracy", "caption_chance", "wall_seconds")
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'samples.png'}")


def _train(args) -> None:
    from .train import main

    main([args.recipe, *args.overrides])


def _generate(args) -> None:
    import torch

    from .bundle import load_bundle
    from .demo import samples_grid
    from .inference import text_to_image

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
    from .bundle import load_bundle
    from .inference import caption_images

    model, processor = load_bundle(args.bundle)
    model.eval()
    for path, caption in zip(args.images, caption_images(model, processor, list(args.images))):
        print(f"{path}\t{caption}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtok", description="tokenizer-bridge: unified text+image tokens for HF LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tokenizer, bridge an LLM, train, evaluate (embedded data)")
    demo.add_argument("--out", required=True, help="output folder (metrics.json, samples.png, runs)")
    demo.add_argument("--llm", help="path of a pretrained causal LM to bridge instead of a tiny Llama")
    demo.add_argument("--gguf-file", dest="gguf_file", help="GGUF file name inside --llm")
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
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.func(args)


if __name__ == "__main__":
    main()
