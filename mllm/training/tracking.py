"""Experiment tracking for the loop (``train.report_to``): accelerate's trackers, and the recipe as their
hyperparameters."""

from __future__ import annotations

import os

from accelerate import Accelerator

from .recipe import Recipe, recipe_to_dict

TRACKERS = ("none", "tensorboard", "wandb")


def tracker_options(recipe: Recipe) -> dict:
    """``Accelerator`` keyword arguments for ``train.report_to``."""
    report_to = recipe.train.report_to
    if report_to not in TRACKERS:
        raise ValueError(f"train.report_to must be one of {TRACKERS}, got {report_to!r}")
    if report_to == "none":
        return {}
    return {"log_with": report_to, "project_dir": os.path.join(recipe.output_dir, "tracking")}


def check_tracking(accelerator: Accelerator, report_to: str) -> bool:
    """Whether the loop logs to a tracker; refuses an accelerator made without the tracker the recipe asks for."""
    if report_to == "none":
        return False
    names = [getattr(t, "name", str(t)).lower() for t in (accelerator.log_with or [])]
    if not any(report_to in name for name in names):
        raise ValueError(f"train.report_to={report_to!r} but the accelerator was made without that tracker (log_with="
                         f"{names}): create it with Accelerator(log_with={report_to!r}), or let the loop create it")
    return True


def tracker_config(recipe: Recipe) -> dict:
    """The recipe flattened to the scalar values trackers record as hyperparameters (``train.lr``, ...)."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value

    walk("", recipe_to_dict(recipe))
    return flat
