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
      *.py, visual_tokenizer/*.py                                remote code (``trust_remote_code=True``)

:func:`save_bundle` writes into a temporary sibling folder and swaps it in only once everything is written, so a
failure never leaves a half-overwritten bundle. :class:`Bundle` adds ``from_pretrained`` from a Hub repo and
``push_to_hub`` (``huggingface_hub``'s ``create_repo`` + ``upload_folder``).

**Remote code.** With the code files in the bundle, ``AutoProcessor.from_pretrained(bundle, trust_remote_code=True)``
and ``AutoModel.from_pretrained(bundle, subfolder="visual_tokenizer", trust_remote_code=True)`` work where
tokenizer-bridge is not installed. ``register_for_auto_class`` cannot produce them: transformers copies a module and
its relative imports as flat ``<name>.py`` files next to each other, so ``from .quantizers import ...`` (a
subpackage) fails at save time (``quantizers.py`` does not exist) and again in its dynamic-module loader. The export
below writes the package's modules flat instead (``quantizers/base.py`` becomes ``quantizers_base.py``) and rewrites
their relative imports (found with ``ast``, so only real import statements change) to match, then checks every copy
with transformers' own import scanner. The ``auto_map`` entries go into ``processor_config.json``,
``preprocessor_config.json`` and ``visual_tokenizer/config.json``; the LLM's ``config.json`` stays vanilla.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml
from transformers import AutoModelForCausalLM

from tokenizer_bridge.pretrained import load_visual_tokenizer
from tokenizer_bridge.processing_unified import VISUAL_TOKENIZER_SUBFOLDER, UnifiedProcessor

PathLike = Union[str, os.PathLike]
RECIPE_NAME = "training_recipe.yaml"
README_NAME = "README.md"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---------------------------------------------------------------------------------------------------- Bundle
class Bundle:
    """A bridged causal LM, its processor and (optionally) the recipe that trained it.

    Args:
        model: the bridged causal LM.
        processor: its :class:`UnifiedProcessor` (tokenizer, image processor, image vocabulary, visual tokenizer).
        recipe: the training recipe (a :class:`~mllm.recipe.Recipe` or its dict), saved as ``training_recipe.yaml``
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
        model: the bridged causal LM.
        processor: its processor (tokenizer, image processor, image vocabulary, visual tokenizer).
        base_model: name of the LLM that was bridged, for the model card (defaults to ``model.name_or_path``).
        recipe: the training recipe (``Recipe`` or dict), saved as ``training_recipe.yaml`` and in the model card.
        remote_code: also write the code files and ``auto_map`` entries that ``trust_remote_code=True`` loads.
    """
    target = Path(directory).absolute()
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
    """The ``training_recipe.yaml`` of a bundle as a dict (``mllm.recipe.recipe_from_dict`` makes it a Recipe)."""
    path = Path(directory) / RECIPE_NAME
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _recipe_dict(recipe: Any) -> Optional[dict]:
    if recipe is None or isinstance(recipe, dict):
        return recipe
    if dataclasses.is_dataclass(recipe):
        return dataclasses.asdict(recipe)
    raise TypeError(f"recipe must be a Recipe dataclass or a dict, got {type(recipe).__name__}")


# ---------------------------------------------------------------------------------------------------- model card
def model_card(model, processor: UnifiedProcessor, base_model: Optional[str] = None,
               recipe: Optional[dict] = None) -> str:
    """README.md: Hub metadata, base model, visual tokenizer, span layout, vocabulary growth, training recipe."""
    vocab = processor.image_vocab
    base = base_model or getattr(model, "name_or_path", "") or "unknown (built in code)"
    span = f"{vocab.span_length} tokens per image including <boi>/<eoi>"
    if vocab.variable_size:
        span = f"up to {span} (at {vocab.grid_size[0]}x{vocab.grid_size[1]})"
    elif getattr(vocab, "budgets", None):
        span = f"up to {span} (at {vocab.num_tokens} ids)"
    lines = _card_metadata(base) + [
        "# tokenizer-bridge bundle",
        "",
        "A Hugging Face causal LM whose vocabulary was extended with discrete image tokens by tokenizer-bridge.",
        "",
        f"- Base model: `{base}`",
        f"- LLM: `{type(model).__name__}`, {model.get_input_embeddings().weight.shape[0]} embedding rows",
        f"- Image span layout: {layout_summary(vocab)}; {span}",
        f"- Vocabulary growth: {growth_summary(vocab)}; text vocabulary {vocab.text_vocab_size}",
        f"- Visual tokenizer: {_visual_tokenizer_summary(processor)}",
        "",
        *_recipe_section(recipe),
        "## Usage",
        "",
        "```python",
        "from mllm.bundle import Bundle",
        'bundle = Bundle.from_pretrained("path/or/repo")',
        "model, processor = bundle.model, bundle.processor",
        "```",
        "",
        "Without tokenizer-bridge installed, each piece loads with transformers alone:",
        "",
        "```python",
        "from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/or/repo")',
        'tokenizer = AutoTokenizer.from_pretrained("path/or/repo")',
        'processor = AutoProcessor.from_pretrained("path/or/repo", trust_remote_code=True)',
        'visual_tokenizer = AutoModel.from_pretrained("path/or/repo", subfolder="visual_tokenizer", '
        "trust_remote_code=True)",
        "```",
        "",
    ]
    return "\n".join(lines)


def _card_metadata(base: str) -> list[str]:
    lines = ["---", "library_name: transformers", "tags:", "- tokenizer-bridge", "- multimodal", "- image-tokens"]
    if _HUB_ID.match(base) and not os.path.exists(base):
        lines.append(f"base_model: {base}")
    return lines + ["---", ""]


def _special_names(vocab) -> list[str]:
    names = [vocab.boi_token, vocab.eoi_token]
    return names + ([vocab.eol_token] if vocab.eol_token_id is not None else [])


def layout_summary(vocab) -> str:
    """One line saying how an image is spelled: layout and size, residual levels and their order, sub-tokens, ids."""
    budgets = getattr(vocab, "budgets", None)
    if vocab.layout == "sequence" and budgets:
        text = (f"sequence of up to {vocab.num_tokens} ids (token budgets {', '.join(map(str, budgets))}, stated by "
                "a budget token after <boi>)")
    elif vocab.layout == "sequence":
        text = f"sequence of {vocab.num_tokens} ids"
    elif vocab.variable_size:
        text = (f"variable-size grid up to {vocab.grid_size[0]}x{vocab.grid_size[1]} (each span starts with its size "
                "as <h_k> <w_k> after <boi>; one <eol> per row)")
    else:
        text = f"grid {vocab.grid_size[0]}x{vocab.grid_size[1]} (one <eol> per row)"
    if vocab.num_levels > 1:
        order = ("position-major: all levels of a position, then the next" if vocab.level_order == "position"
                 else "level-major: one full pass per level")
        ranges = "" if vocab.is_unified else (", a separate id range per level" if vocab.separate_level_ranges
                                              else ", one id range shared by every level")
        text += f", {vocab.num_levels} residual levels per position ({order}{ranges})"
    if vocab.factors is not None:
        radices = " x ".join(str(f) for f in vocab.factors)
        text += f", each image id split into {len(vocab.factors)} sub-tokens (radices {radices})"
    if vocab.is_unified:
        text += f", unified codebook: the {vocab.codebook_size} image ids are existing text tokens"
    return text


def growth_summary(vocab) -> str:
    """How many tokens the bridge added to the text vocabulary, and what they are."""
    text_size = vocab.text_vocab_size
    new_specials = [name for name, i in zip(_special_names(vocab), vocab.special_token_ids)
                    if text_size is None or i >= text_size]
    parts = []
    if not vocab.is_unified:
        tokens = vocab.num_image_tokens
        if tokens == vocab.codebook_size:
            parts.append(f"{tokens} image ids")
        else:
            ranges = (vocab.num_levels if vocab.separate_level_ranges else 1) * vocab.tokens_per_id
            per = " x ".join(name for name, on in (("level", vocab.separate_level_ranges),
                                                   ("sub-token", vocab.factors is not None)) if on)
            ids = f"{vocab.codebook_size} image ids" + (" per level" if vocab.num_levels > 1 else "")
            parts.append(f"{tokens} image tokens ({ranges} {per} ranges for {ids})")
    if vocab.size_token_ids:
        parts.append(f"{len(vocab.size_token_ids)} size tokens")
    if getattr(vocab, "budget_token_ids", None):
        parts.append(f"{len(vocab.budget_token_ids)} budget tokens")
    if new_specials:
        parts.append(f"{len(new_specials)} specials ({', '.join(new_specials)})")
    added = sum(int(p.split()[0]) for p in parts)
    reused = ""
    if vocab.is_unified:
        reused = f"; the {vocab.codebook_size} image ids reuse existing text tokens (unified codebook)"
        if len(new_specials) < len(vocab.special_token_ids):
            reused += ", and so do the span markers"
    if not added:
        return f"none: the vocabulary did not grow{reused}"
    return f"{added} tokens = {' + '.join(parts)}{reused}"


def _visual_tokenizer_summary(processor: UnifiedProcessor) -> str:
    vt = processor.visual_tokenizer
    fingerprint = processor.image_vocab.tokenizer_fingerprint or "none"
    if vt is None:
        return f"not included (fingerprint `{fingerprint}`)"
    c = vt.config
    if hasattr(c, "family"):  # a wrapped pretrained VQ (tokenizer_bridge.pretrained)
        decoder = "" if vt.family.has_decoder else "; encoder only: its image ids cannot be decoded to pixels"
        return (f"`{type(vt).__name__}` wrapping the pretrained {c.family} VQ (`{type(vt.vq).__name__}`) with "
                f"{c.codebook_size} codes, downsample x{c.downsample}{decoder}; fingerprint `{fingerprint}`")
    if hasattr(c, "num_slots"):  # a slot tokenizer (tokenizer_bridge.modeling_slot_tokenizer)
        return (f"`{type(vt).__name__}` ({c.backbone} backbone, Q-Former + slot attention into up to {c.num_slots} "
                f"slots (token budgets {', '.join(map(str, c.slot_budgets))}), {c.quantizer} quantizer with "
                f"{c.codebook_size} codes x {c.residual_levels} residual levels, {c.decoder} decoder, trained at "
                f"{c.image_size} px; fingerprint `{fingerprint}`)")
    return (
        f"`{type(vt).__name__}` ({c.encoder} encoder, {c.quantizer} quantizer with {c.codebook_size} codes of "
        f"dimension {c.latent_dim}, {c.decoder} decoder, downsample x{c.downsample}, trained at {c.image_size} px; "
        f"fingerprint `{fingerprint}`)"
    )


def _recipe_section(recipe: Optional[dict]) -> list[str]:
    if not recipe:
        return []
    data, train, lora = recipe.get("data") or {}, recipe.get("train") or {}, recipe.get("lora") or {}
    lines = ["## Training recipe", "", f"Saved in `{RECIPE_NAME}`.", ""]
    lines.append(f"- Stage: `{recipe.get('stage', '?')}`; model section: `{json.dumps(recipe.get('model') or {})}`")
    if data:
        lines.append(f"- Data: `{data.get('dataset', '?')}` at {data.get('image_size', '?')} px, "
                     f"tasks {json.dumps(data.get('tasks') or {})}, packing {bool(data.get('packing'))}")
    if train:
        lines.append(f"- Optimisation: {train.get('steps', '?')} steps, batch {train.get('batch_size', '?')}, "
                     f"lr {train.get('lr', '?')}, warmup {train.get('warmup_steps', '?')}, "
                     f"seed {train.get('seed', '?')}")
    if lora.get("enabled"):
        lines.append(f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, targets {lora.get('target_modules')}")
    return lines + [""]


# ---------------------------------------------------------------------------------------------------- remote code
def write_bundle_remote_code(folder: PathLike, processor: UnifiedProcessor) -> None:
    """Write the code files and ``auto_map`` entries that let ``trust_remote_code=True`` load the processor and the
    visual tokenizer of the bundle in ``folder`` without tokenizer-bridge installed."""
    folder = Path(folder)
    image_processor = processor.image_processor
    root = {"AutoProcessor": type(processor), "AutoImageProcessor": type(image_processor)}
    vt = processor.visual_tokenizer
    vt_classes = {"AutoConfig": type(vt.config), "AutoModel": type(vt)} if vt is not None else {}
    # AutoModel.from_pretrained(bundle, subfolder=...) reads the code from the bundle root, a path to the subfolder
    # from the subfolder: both get the visual tokenizer's modules.
    root_map = write_remote_code(folder, {**root, **vt_classes})
    image_map = {"AutoImageProcessor": root_map["AutoImageProcessor"]}
    _add_auto_map(folder / "processor_config.json", {"AutoProcessor": root_map["AutoProcessor"]})
    # AutoImageProcessor reads the copy nested in processor_config.json before preprocessor_config.json
    _add_auto_map(folder / "processor_config.json", image_map, section="image_processor")
    _add_auto_map(folder / "preprocessor_config.json", image_map)
    if vt_classes:
        sub = folder / VISUAL_TOKENIZER_SUBFOLDER
        _add_auto_map(sub / "config.json", write_remote_code(sub, vt_classes))


def write_remote_code(folder: PathLike, classes: dict[str, type]) -> dict[str, str]:
    """Write the modules defining ``classes`` (``{auto class name: class}``) and every first-party module they
    import, flattened into ``folder``; return the ``auto_map`` (``{auto class name: "module.Class"}``)."""
    modules = {cls.__module__ for cls in classes.values()}
    root = _common_package(modules)
    for name, path in _module_closure(modules, root).items():
        target = Path(folder) / f"{_flat_name(name, root)}.py"
        target.write_text(_flattened_source(Path(path).read_text(), name, path, root))
    _check_loadable(folder, modules, root)
    return {auto: f"{_flat_name(cls.__module__, root)}.{cls.__name__}" for auto, cls in classes.items()}


def _common_package(modules: set[str]) -> str:
    """The package the code is exported from: the parent package of the entry modules (all must share it)."""
    packages = {m.rpartition(".")[0] for m in modules}
    if len(packages) != 1 or not next(iter(packages)):
        raise ValueError(f"remote code is exported from one package; the classes live in {sorted(modules)}")
    return packages.pop()


def _flat_name(module: str, root: str) -> str:
    """``tokenizer_bridge.quantizers.base`` -> ``quantizers_base``; a subpackage's ``__init__`` keeps its name."""
    if module == root or not module.startswith(root + "."):
        raise ValueError(f"module {module} is not inside {root}: it cannot be exported as remote code")
    return module[len(root) + 1 :].replace(".", "_")


def _module_closure(modules: set[str], root: str) -> dict[str, str]:
    """``{module name: source file}`` of ``modules`` and every module of ``root`` they import, transitively."""
    todo, found = sorted(modules), {}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = importlib.import_module(name).__file__
        found[name] = path
        tree = ast.parse(Path(path).read_text())
        todo.extend(target for _, target in _first_party_imports(tree, name, path, root))
    return found


def _first_party_imports(tree: ast.AST, module: str, path: str, root: str) -> list[tuple[ast.ImportFrom, str]]:
    """``(node, imported module)`` for every import of a module inside ``root`` (relative or absolute)."""
    package = module if Path(path).name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name == root or a.name.startswith(root + ".") for a in node.names):
                raise ValueError(f"{path}:{node.lineno}: `import {root}...` cannot be exported; use `from . import`")
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and not (node.module == root or (node.module or "").startswith(root + ".")):
            continue  # a third-party import
        if node.module is None:
            raise ValueError(f"{path}:{node.lineno}: `from . import name` cannot be exported as remote code; write "
                             "`from .module import name`")
        target = importlib.util.resolve_name("." * node.level + node.module, package) if node.level else node.module
        out.append((node, target))
    return out


def _flattened_source(source: str, module: str, path: str, root: str) -> str:
    """``source`` with each first-party import rewritten to the flat module names (one line per statement)."""
    lines = source.encode().splitlines(keepends=True)
    nodes = _first_party_imports(ast.parse(source), module, path, root)
    for node, target in sorted(nodes, key=lambda nt: (nt[0].lineno, nt[0].col_offset), reverse=True):
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        statement = f"from .{_flat_name(target, root)} import {names}".encode()
        first, last = node.lineno - 1, node.end_lineno - 1  # ast offsets are UTF-8 byte offsets
        head, tail = lines[first][: node.col_offset], lines[last][node.end_col_offset :]
        lines[first : last + 1] = [head + statement + tail]
    return b"".join(lines).decode()


def _check_loadable(folder: PathLike, modules: set[str], root: str) -> None:
    """Run transformers' own relative-import scanner on the written entry modules: every file it will copy exists."""
    from transformers.dynamic_module_utils import get_relative_import_files

    for module in modules:
        entry = Path(folder) / f"{_flat_name(module, root)}.py"
        missing = [f for f in get_relative_import_files(str(entry)) if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"remote code of {module} would need missing files {missing} (an import-like line in a "
                             "string or comment?)")


def _add_auto_map(config_file: Path, auto_map: dict[str, str], section: Optional[str] = None) -> None:
    """Merge ``auto_map`` into the JSON file's ``auto_map`` (or into that of its nested ``section``, if present)."""
    values = json.loads(config_file.read_text())
    node = values.get(section) if section else values
    if not isinstance(node, dict):
        return
    node["auto_map"] = {**node.get("auto_map", {}), **auto_map}
    config_file.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
