"""Run the evaluation suites from a checkout: the same as ``vtok eval ...``.

    python eval/run.py tokenizer --model DIR --out OUT [--suites ...] [--features PATH] [--install-ocr]
    python eval/run.py bundle --bundle DIR --out OUT [--base-model PATH] [--texts FILE]

See eval/README.md for what each suite measures.
"""

import sys

from mllm.cli import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]])
