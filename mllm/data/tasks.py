"""Task builders: each turns a record into a ``(prompt, target)`` pair of strings with ``<image>`` placeholders.

The processor expands the placeholders into image spans and puts the loss on the target only, so every task is a
small pure function here, tested on its own. Templates are deliberately plain words so that a tiny word-level
tokenizer covers them.

- captioning (image -> text): ``"<image> caption:"`` -> ``"a red circle at the top left"``
- text-to-image: ``"draw: a red circle ..."`` -> ``"<image>"``; with probability ``prompt_dropout`` the caption is
  dropped (``"draw:"``), which trains the unconditional branch used by classifier-free guidance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

PLACEHOLDER = "<image>"
CAPTION_PROMPT = f"{PLACEHOLDER} caption:"
DRAW_PREFIX = "draw:"
TASK_WORDS = ("caption", ":", "draw")


@dataclass(frozen=True)
class Example:
    """One training sample: the prompt (no loss), the target (loss) and how many images the pair holds."""

    prompt: str
    target: str
    task: str

    @property
    def num_images(self) -> int:
        return self.prompt.count(PLACEHOLDER) + self.target.count(PLACEHOLDER)


def captioning(caption: str) -> Example:
    if not caption.strip():
        raise ValueError("captioning needs a non-empty caption")
    return Example(CAPTION_PROMPT, caption.strip(), "captioning")


def text_to_image(caption: str, prompt_dropout: float = 0.0, rng: Optional[random.Random] = None) -> Example:
    dropped = prompt_dropout > 0 and (rng or random).random() < prompt_dropout
    prompt = DRAW_PREFIX if dropped or not caption.strip() else f"{DRAW_PREFIX} {caption.strip()}"
    return Example(prompt, PLACEHOLDER, "text_to_image")


def t2i_prompt(caption: Optional[str]) -> str:
    """The generation prompt matching :func:`text_to_image` (``None`` gives the unconditional prompt)."""
    return f"{DRAW_PREFIX} {caption}" if caption else DRAW_PREFIX


TASKS = {"captioning": captioning, "text_to_image": text_to_image}


def choose_task(weights: dict, rng: random.Random) -> str:
    """Draw a task name from a mixture ``{name: weight}``; unknown names are an error."""
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in the mixture; known tasks: {sorted(TASKS)}")
    names = [n for n, w in weights.items() if w > 0]
    if not names:
        raise ValueError(f"the task mixture {weights} has no positive weight")
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def make_example(task: str, caption: str, prompt_dropout: float, rng: random.Random) -> Example:
    if task == "text_to_image":
        return text_to_image(caption, prompt_dropout, rng)
    return TASKS[task](caption)
