"""One folder (or Hub repo) holding a bridged LLM and its :class:`~tokenizer_bridge.UnifiedProcessor`.

Layout (every piece loadable on its own; the LLM is a vanilla Hugging Face causal LM with a bigger vocabulary)::

    bundle/
      config.json, model.safetensors, generation_config.json    AutoModelForCausalLM
      tokenizer.json, tokenizer_config.json, ...                 AutoTokenizer (holds the image tokens)
      processor_config.json, preprocessor_config.json            AutoProcessor -> UnifiedProcessor
      image_vocab.json                                           ImageVocab
      visual_tokenizer/config.json, model.safetensors            AutoModel -> VisualTokenizer / PretrainedVQTokenizer
      training_recipe.yaml                                       the recipe that trained it (when given)
      README.md                                                  generated model card
      remote_code/, visual_tokenizer/remote_code/               remote code (``trust_remote_code=True``), one package

:func:`save_bundle` writes into a temporary sibling folder and swaps it in only once everything is written, so a
failure never leaves a half-overwritten bundle. A model loaded from a GGUF file
(``from_pretrained(..., gguf_file=...)``) is saved de-quantized, as a vanilla safetensors checkpoint
(:func:`~.plain_model.as_plain_model`). :class:`Bundle` adds ``from_pretrained`` from a Hub repo and ``push_to_hub``
(``huggingface_hub``'s ``create_repo`` + ``upload_folder``).

**Remote code.** With the code files in the bundle, ``AutoProcessor.from_pretrained(bundle, trust_remote_code=True)``
and ``AutoModel.from_pretrained(bundle, subfolder="visual_tokenizer", trust_remote_code=True)`` work where
tokenizer-bridge is not installed. ``register_for_auto_class`` cannot produce them: transformers copies a module and
its relative imports as flat ``<name>.py`` files next to each other, so ``from .quantizers import ...`` (a
subpackage) fails at save time (``quantizers.py`` does not exist) and again in its dynamic-module loader. The export
(:mod:`.remote_code`) writes the package's modules flat into one package folder instead, ``remote_code/``
(``quantizers/base.py`` becomes ``remote_code/quantizers_base.py``), rewrites their relative imports (found with
``ast``, so only real import statements change) to match, then checks every copy with transformers' own import
scanner. The ``auto_map`` entries (``"remote_code/processing_unified.UnifiedProcessor"``) go into
``processor_config.json``, ``preprocessor_config.json`` and ``visual_tokenizer/config.json``; the LLM's
``config.json`` stays vanilla. ``AutoModel.from_pretrained(bundle, subfolder="visual_tokenizer")`` reads the code from
the bundle root and a path to ``visual_tokenizer/`` from that folder, so both hold the visual tokenizer's modules.
Bundles of the earlier layout (the same modules flat in the root, ``auto_map`` without the folder) load as before:
transformers reads whatever their ``auto_map`` names.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml
from transformers import AutoModelForCausalLM

from tokenizer_bridge.interface import load_visual_tokenizer
from tokenizer_bridge.processing_unified import (
    VISUAL_TOKENIZER_SUBFOLDER,
    UnifiedProcessor,
)

from .model_card import README_NAME, RECIPE_NAME, model_card
from .plain_model import as_plain_model
from .remote_code import PathLike, write_bundle_remote_code


# ---------------------------------------------------------------------------------------------------- Bundle
class Bundle:
    """A bridged causal LM, its processor and (optionally) the recipe that trained it.

    Args:
        model: the bridged causal LM.
        processor: its :class:`UnifiedProcessor` (tokenizer, image processor, image vocabulary, visual tokenizer).
        recipe: the training recipe (a :class:`~mllm.training.recipe.Recipe` or its dict), saved as ``training_recipe.yaml``
            and summarised in the model card.
        base_model: name of the LLM that was bridged, for the model card (defaults to ``model.name_or_path``).
    """

    def __init__(self, model, processor: UnifiedProcessor, recipe: Any = None, base_model: Optional[str] = None):
        self.model, self.processor, self.recipe, self.base_model = model, processor, recipe, base_model

    def save_pretrained(self, directory: PathLike, remote_code: bool = True) -> Path:
        """Write the bundle (see :func:`save_bundle`)."""
        return save_bundle(directory, self.model, self.processor, self.base_model, self.recipe, remote_code)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: PathLike,
        device: Optional[Union[str, torch.device]] = None,
        revision: Optional[str] = None,
        token: Optional[Union[str, bool]] = None,
        **model_kwargs,
    ) -> "Bundle":
        """Load a bundle from a local folder or a Hub repo id (downloaded with ``snapshot_download``)."""
        directory = Path(path_or_repo)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(os.fspath(path_or_repo), revision=revision, token=token))
        model, processor = load_bundle(directory, device=device, **model_kwargs)
        return cls(model, processor, recipe=read_recipe(directory))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: Optional[bool] = None,
        token: Optional[Union[str, bool]] = None,
        commit_message: str = "Upload tokenizer-bridge bundle",
        revision: Optional[str] = None,
        create_pr: bool = False,
        endpoint: Optional[str] = None,
        remote_code: bool = True,
    ):
        """Save the bundle to a temporary folder and upload it with :func:`push_bundle_to_hub`."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "bundle", remote_code=remote_code)
            return push_bundle_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message,
                                      revision=revision, create_pr=create_pr, endpoint=endpoint)


def push_bundle_to_hub(
    folder: PathLike,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    commit_message: str = "Upload tokenizer-bridge bundle",
    revision: Optional[str] = None,
    create_pr: bool = False,
    endpoint: Optional[str] = None,
):
    """Create ``repo_id`` if needed (``create_repo``) and upload a saved bundle folder in one commit
    (``upload_folder``); returns the ``CommitInfo``. ``endpoint`` overrides the Hub URL (default: ``HF_ENDPOINT``)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    for name in ("config.json", "processor_config.json", "image_vocab.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a saved bundle: {name} is missing")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
                             create_pr=create_pr)


# ---------------------------------------------------------------------------------------------------- save / load
def save_bundle(
    directory: PathLike,
    model,
    processor: UnifiedProcessor,
    base_model: Optional[str] = None,
    recipe: Any = None,
    remote_code: bool = True,
) -> Path:
    """Write ``model`` (safetensors) and ``processor`` into ``directory``, replacing it only after success.

    Args:
        directory: target folder; an existing one is replaced atomically (rename) once the new bundle is complete.
        model: the bridged causal LM. One loaded from a GGUF file is saved de-quantized: its GGUF quantizer (which
            refuses ``save_pretrained``) is detached in place, see :func:`~.plain_model.as_plain_model`.
        processor: its processor (tokenizer, image processor, image vocabulary, visual tokenizer).
        base_model: name of the LLM that was bridged, for the model card (defaults to ``model.name_or_path``).
        recipe: the training recipe (``Recipe`` or dict), saved as ``training_recipe.yaml`` and in the model card.
        remote_code: also write the code files and ``auto_map`` entries that ``trust_remote_code=True`` loads.
    """
    target = Path(directory).absolute()
    model = as_plain_model(model)
    check_model_fits(model, processor)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")  # same filesystem: rename is atomic
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would end up on the bundle
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        recipe_dict = _recipe_dict(recipe)
        if recipe_dict is not None:
            (staging / RECIPE_NAME).write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
        if remote_code:
            write_bundle_remote_code(staging, processor)
        (staging / README_NAME).write_text(model_card(model, processor, base_model, recipe_dict))
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and restored on failure."""
    if not target.exists():
        os.rename(staging, target)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def load_bundle(
    directory: PathLike, device: Optional[Union[str, torch.device]] = None, **model_kwargs
) -> tuple[torch.nn.Module, UnifiedProcessor]:
    """Load ``(model, processor)`` from a bundle written by :func:`save_bundle`, checking they fit together.

    ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype=torch.bfloat16``); ``device``
    moves both the LLM and the visual tokenizer. The visual tokenizer may be ours or a wrapped pretrained VQ.
    """
    directory = os.fspath(directory)
    subfolder = os.path.join(directory, VISUAL_TOKENIZER_SUBFOLDER)
    visual_tokenizer = load_visual_tokenizer(subfolder) if os.path.isdir(subfolder) else None
    processor = UnifiedProcessor.from_pretrained(directory, visual_tokenizer=visual_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(directory, **model_kwargs)
    check_model_fits(model, processor)
    if device is not None:
        model.to(device)
        if processor.visual_tokenizer is not None:
            processor.visual_tokenizer.to(device)
    return model, processor


def check_model_fits(model, processor: UnifiedProcessor) -> None:
    """Raise unless the LLM's input embedding and output head have a row for every id of the image vocabulary."""
    rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    if head is not None:
        rows = min(rows, head.weight.shape[0])
    processor.image_vocab.check_fits(rows)


def read_recipe(directory: PathLike) -> Optional[dict]:
    """The ``training_recipe.yaml`` of a bundle as a dict (``mllm.training.recipe.recipe_from_dict`` makes it a Recipe)."""
    path = Path(directory) / RECIPE_NAME
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _recipe_dict(recipe: Any) -> Optional[dict]:
    if recipe is None or isinstance(recipe, dict):
        return recipe
    if dataclasses.is_dataclass(recipe):
        return dataclasses.asdict(recipe)
    raise TypeError(f"recipe must be a Recipe dataclass or a dict, got {type(recipe).__name__}")


