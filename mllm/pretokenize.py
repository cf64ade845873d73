"""Pre-tokenization as a launchable module, with the arguments of ``vtok pretokenize``:

    torchrun --nproc_per_node 4 -m mllm.pretokenize --source records.jsonl --visual-tokenizer TOK --out OUT
    accelerate launch --multi_gpu --num_processes 4 -m mllm.pretokenize --source ... --visual-tokenizer ... --out ...
    python -m mllm.pretokenize --num-processes 4 --source ...                        (spawns the ranks itself)

Each rank encodes its share of the shards on its own device and rank 0 merges (:mod:`mllm.data.pretokenize`). On CPUs
``accelerate launch --cpu`` starts one process whatever ``--num_processes`` says; CPU ranks come from a ``MULTI_GPU``
config such as ``recipes/accelerate/ddp_cpu.yaml`` (``--config_file``), from torchrun, or from ``--num-processes``.
"""

from __future__ import annotations

from typing import Optional

from .data.pretokenize_args import main as _main


def main(argv: Optional[list[str]] = None):
    """Parse ``argv`` (default: ``sys.argv[1:]``) as ``vtok pretokenize`` does and pre-tokenize."""
    return _main(argv)


if __name__ == "__main__":
    main()
