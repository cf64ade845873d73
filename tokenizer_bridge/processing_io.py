"""Files of a saved :class:`~tokenizer_bridge.UnifiedProcessor`: where a ``from_pretrained`` name resolves to, which
load-time keyword goes to which component, and the chat templates beside the processor config.

A processor folder holds the tokenizer's files, ``processor_config.json``, ``preprocessor_config.json``,
``image_vocab.json``, ``visual_tokenizer/`` and, when the processor has one, its chat template(s) in transformers'
files: ``chat_template.jinja`` (+ ``additional_chat_templates/<name>.jinja``), or the legacy ``chat_template.json``.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Optional, Union

from transformers.processing_utils import ImagesKwargs
from transformers.utils import CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE

# from_pretrained keywords about where and how to fetch files: every component gets them
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")
# processor keywords of from_pretrained (the rest of UnifiedProcessor.__init__ comes from the folder's files)
PROCESSOR_INIT_KWARGS = ("padding_side", "chat_template")


def resolve_folder(name_or_path: Union[str, os.PathLike], **hub_kwargs) -> str:
    """A local folder as is; otherwise a Hub repository id, downloaded (``snapshot_download``) with ``hub_kwargs``."""
    folder = os.fspath(name_or_path)
    if os.path.isdir(folder):
        return folder
    if os.path.exists(folder) or folder.count("/") > 1 or folder.startswith((".", "/", "~")):
        raise OSError(f"{folder!r} is not a processor folder (a directory saved by UnifiedProcessor.save_pretrained) "
                      "nor a Hub repository id")
    from huggingface_hub import snapshot_download

    options = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    try:
        return snapshot_download(folder, **options)
    except Exception as error:  # offline, unknown repository, no access: say what was tried
        raise OSError(f"could not load a processor from {folder!r}: it is no local directory, and downloading it from "
                      f"the Hub failed ({type(error).__name__}: {error})") from error


def split_load_kwargs(kwargs: dict[str, Any], image_processor_class: type) -> tuple[dict, dict, dict]:
    """``from_pretrained`` keywords -> (processor, image processor, tokenizer) keywords. Image-processor keys are its
    ``__init__`` parameters and transformers' image keywords (``do_normalize=``, ``size=``...); the processor's are
    ``padding_side`` / ``chat_template``; everything else goes to ``AutoTokenizer.from_pretrained`` (``cls_token=``,
    ``trust_remote_code=``...). Hub keywords (``revision=``, ``token=``...) go to both loaders."""
    image_keys = set(inspect.signature(image_processor_class.__init__).parameters) - {"self", "kwargs"}
    image_keys |= set(ImagesKwargs.__annotations__) - {"return_tensors", "device"}
    hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
    processor = {k: kwargs[k] for k in PROCESSOR_INIT_KWARGS if k in kwargs}
    images = {k: v for k, v in kwargs.items() if k in image_keys}
    tokenizer = {k: v for k, v in kwargs.items()  # "_from_auto" & co are AutoProcessor's bookkeeping
                 if k not in image_keys and k not in PROCESSOR_INIT_KWARGS and not k.startswith("_")}
    return processor, {**images, **hub}, tokenizer


def read_chat_template(folder: str) -> Optional[Union[str, dict[str, str]]]:
    """The processor's chat template saved in ``folder`` (transformers' file names), a ``{name: template}`` dict when
    there are additional named ones, or None."""
    default = None
    jinja = os.path.join(folder, CHAT_TEMPLATE_FILE)
    legacy = os.path.join(folder, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            default = f.read()
    elif os.path.isfile(legacy):
        with open(legacy, encoding="utf-8") as f:
            default = json.load(f).get("chat_template")
    extra_dir = os.path.join(folder, CHAT_TEMPLATE_DIR)
    extra = {}
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                    extra[name[: -len(".jinja")]] = f.read()
    if not extra:
        return default
    return {**({"default": default} if default is not None else {}), **extra}


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
