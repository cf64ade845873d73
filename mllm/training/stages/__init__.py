"""The training stages: each turns a :class:`~mllm.training.recipe.Recipe` into a
:class:`~mllm.training.stage.Stage` (model, per-step batches, loss, saver) for the one loop in
:mod:`mllm.training.loop`."""

from ..recipe import STAGES
from .llm import llm_stage
from .tokenizer import tokenizer_stage

STAGE_BUILDERS = {"tokenizer": tokenizer_stage, "llm": llm_stage}
assert set(STAGE_BUILDERS) == set(STAGES), "every stage a recipe may name has a builder"
