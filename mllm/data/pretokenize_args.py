"""The arguments of ``vtok pretokenize`` and ``python -m mllm.pretokenize`` (one declaration for both), and the run.

Importing this module is cheap (argparse only), so ``vtok --help`` stays fast; :func:`run` imports the work.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

DESCRIPTION = """Encode images into image ids once (resumable), for the llm stage (data.dataset: pretokenized).
Three record kinds, detected from the first record (or --kind): captions {"image", "caption"} (a JSONL/CSV list, an
image folder, .tar shards, a save_to_disk folder); documents {"content": [{"type": "text", "text": ...},
{"type": "image", "image": "a.jpg"}, ...]} and conversations {"messages": [{"role", "content"}, ...]} (HF chat parts,
or "images": [...] with <image> placeholders) from a JSONL file or a save_to_disk folder. Bad records are skipped and
counted by reason. Several processes: --num-processes N, or torchrun / accelerate launch -m mllm.pretokenize."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The pre-tokenization arguments, added to ``parser``."""
    add = parser.add_argument
    add("--source", required=True, help="a .jsonl/.csv list, a save_to_disk folder, an image folder or a glob of "
        ".tar shards (documents and conversations: .jsonl or save_to_disk)")
    add("--visual-tokenizer", dest="visual_tokenizer", required=True, help="visual tokenizer folder")
    add("--out", required=True, help="output folder (re-run the same command to resume)")
    add("--kind", choices=("captions", "documents", "conversations"), help="record kind (default: detected)")
    add("--image-size", dest="image_size", type=int, help="default: the tokenizer's image_size")
    add("--resize-mode", dest="resize_mode", default="crop", choices=("crop", "stretch", "pad"))
    add("--batch-size", dest="batch_size", type=int, default=64, help="records (documents, conversations: images) "
        "encoded at a time")
    add("--encode-batch-size", dest="encode_batch_size", type=int, help="images per encoder call (default: the "
        "whole batch on a GPU, 1 on the CPU, where batching is slower per image)")
    add("--num-proc", dest="num_proc", type=int, default=1, help="datasets worker processes per rank (CPU)")
    add("--num-processes", dest="num_processes", type=int, default=1, help="ranks on this machine, each on its own "
        "device (cuda:LOCAL_RANK with GPUs); under torchrun / accelerate launch the launcher sets them")
    add("--device", help="device to encode on (default: cuda:LOCAL_RANK when there is a GPU, else cpu)")
    add("--shard-size", dest="shard_size", type=int, default=5000, help="records per resumable shard")
    add("--image-column", dest="image_column", default="image", help="captions: the image column")
    add("--caption-column", dest="caption_column", default="caption", help="captions: the caption column")
    add("--no-caption", dest="no_caption", action="store_true", help="images without captions")
    add("--image-root", dest="image_root", help="folder of relative image paths (default: the file's)")
    add("--split", default="train", help="split of a DatasetDict or image folder")
    add("--compressed", action="store_true", help="captions: also store compressed_ids (decompression task)")
    add("--budget", type=int, help="slot tokenizers: slots per image (default: the full budget)")
    add("--overwrite", action="store_true", help="delete a previous pre-tokenization in --out first")
    add("--keep-shards", dest="keep_shards", action="store_true", help="keep shards after merging")
    return parser


def build_parser(prog: str = "python -m mllm.pretokenize") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def run(args: argparse.Namespace):
    """Pre-tokenize as ``args`` say; the report is printed once (by rank 0 under a launcher) and returned."""
    from .pretokenize import PretokenizeSettings, pretokenize

    if args.num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("--num-processes spawns ranks for a plain run; under torchrun or accelerate launch the "
                         "launcher's --nproc_per_node / --num_processes sets them")
    settings = PretokenizeSettings(
        visual_tokenizer=args.visual_tokenizer, image_size=args.image_size, resize_mode=args.resize_mode,
        shard_size=args.shard_size, image_column=args.image_column,
        caption_column=None if args.no_caption else args.caption_column, require_caption=not args.no_caption,
        compressed=args.compressed, image_root=args.image_root, split=args.split, budget=args.budget,
        kind=args.kind,
    )
    report = pretokenize(args.source, args.out, settings, batch_size=args.batch_size, num_proc=args.num_proc,
                         overwrite=args.overwrite, keep_shards=args.keep_shards, num_processes=args.num_processes,
                         device=args.device, encode_batch_size=args.encode_batch_size)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report)
    return report


def main(argv: Optional[list[str]] = None):
    return run(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
