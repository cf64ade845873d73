"""Remote code for a bundle: the processor's and visual tokenizer's modules, flattened into one package folder
(``remote_code/``) with ``auto_map`` entries, so ``trust_remote_code=True`` loads them without tokenizer-bridge
installed.

How transformers resolves it (``transformers/dynamic_module_utils.py``): ``get_class_from_dynamic_module`` unpacks
an ``auto_map`` value split on ``.`` into exactly a module file and a class, so
``"remote_code/processing_unified.UnifiedProcessor"`` names the file ``remote_code/processing_unified.py`` (a dotted
``remote_code.processing_unified.UnifiedProcessor`` would not unpack); the file is looked up
relative to the folder or repo given to ``from_pretrained``, never its ``subfolder=``. ``get_relative_imports`` finds
``from .name import`` lines with a regular expression and takes ``name.py`` beside the importing file, so the modules
of one folder must be flat (``from .quantizers.base import`` would ask for ``quantizers.base.py``) and a relative
import may not leave the folder. Local folders are copied, module and relative imports, into the modules cache under
``<folder name>/<hash of the sources>/remote_code/``; Hub repos under ``<repo>/<commit>/remote_code/``, fetching each
relative import beside the importing file. The copy is imported as a subpackage of ``transformers_modules``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Union

from tokenizer_bridge.processing_unified import (
    VISUAL_TOKENIZER_SUBFOLDER,
    UnifiedProcessor,
)

PathLike = Union[str, os.PathLike]
REMOTE_CODE_FOLDER = "remote_code"  # the package folder in the bundle root and in visual_tokenizer/
_PACKAGE_DOC = (
    '"""The code that ``trust_remote_code=True`` loads, exported by tokenizer-bridge: the ``auto_map`` entries of the\n'
    "configs beside this folder name its modules as ``remote_code/<module>.<Class>``. The modules are flat copies of\n"
    'the package, their relative imports rewritten to match."""\n'
)


# ---------------------------------------------------------------------------------------------------- remote code
def write_bundle_remote_code(folder: PathLike, processor: UnifiedProcessor,
                             package: Optional[str] = REMOTE_CODE_FOLDER) -> None:
    """Write the code files and ``auto_map`` entries that let ``trust_remote_code=True`` load the processor and the
    visual tokenizer of the bundle in ``folder`` without tokenizer-bridge installed: into the package folder
    ``package/`` of the bundle root and of ``visual_tokenizer/``; ``package=None`` writes the earlier layout (the
    modules flat beside the configs), which bundles saved before still have."""
    folder = Path(folder)
    image_processor = processor.image_processor
    root = {"AutoProcessor": type(processor), "AutoImageProcessor": type(image_processor)}
    vt = processor.visual_tokenizer
    vt_classes = {"AutoConfig": type(vt.config), "AutoModel": type(vt)} if vt is not None else {}
    # AutoModel.from_pretrained(bundle, subfolder=...) reads the code from the bundle root, a path to the subfolder
    # from the subfolder: both get the visual tokenizer's modules.
    root_map = write_code_package(folder, {**root, **vt_classes}, package)
    image_map = {"AutoImageProcessor": root_map["AutoImageProcessor"]}
    _add_auto_map(folder / "processor_config.json", {"AutoProcessor": root_map["AutoProcessor"]})
    # AutoImageProcessor reads the copy nested in processor_config.json before preprocessor_config.json
    _add_auto_map(folder / "processor_config.json", image_map, section="image_processor")
    _add_auto_map(folder / "preprocessor_config.json", image_map)
    if vt_classes:
        sub = folder / VISUAL_TOKENIZER_SUBFOLDER
        _add_auto_map(sub / "config.json", write_code_package(sub, vt_classes, package))



def write_code_package(folder: PathLike, classes: dict[str, type],
                       package: Optional[str] = REMOTE_CODE_FOLDER) -> dict[str, str]:
    """:func:`write_remote_code` into the package folder ``folder/package/`` (with an ``__init__.py`` saying what it
    is); return the ``auto_map`` with ``package/`` before each module, as ``get_class_from_dynamic_module`` reads it.
    ``package=None``: into ``folder`` itself."""
    if package is None:
        return write_remote_code(folder, classes)
    if not package.isidentifier():
        raise ValueError(f"the remote-code folder {package!r} must be a Python identifier: it is imported as a package")
    target = Path(folder) / package
    target.mkdir(exist_ok=True)
    auto_map = write_remote_code(target, classes)
    (target / "__init__.py").write_text(_PACKAGE_DOC)
    return {auto: f"{package}/{reference}" for auto, reference in auto_map.items()}



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
