"""Entry point of the one training loop: ``accelerate launch -m mllm.train RECIPE.yaml [key=value ...]``.

The loop itself is :mod:`mllm.training.loop`; this module only keeps the short launch command.
"""

from .training.loop import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()
