"""README examples are executed: what a newcomer copies must run."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_runs():
    blocks = python_blocks()
    assert blocks, "README has no python example"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["image_ids"].shape == (2, 4, 4)
    assert namespace["reconstruction"].shape == (2, 3, 32, 32)
    assert namespace["ids"].shape == (1, 4, 4)
    assert len(namespace["captions"]) == 2 and all(isinstance(c, str) for c in namespace["captions"])
    assert torch.isfinite(namespace["loss"])
    parts = namespace["parts"]
    assert any(hasattr(p, "size") and p.size == (32, 32) for p in parts), parts
    assert "a red circle at the top left" in parts[-1]


def test_readme_names_the_two_commands_and_ci_calls_the_test_one():
    text = README.read_text()
    assert "./run demo" in text and "./run test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "./run test" in ci


def test_readme_example_uses_only_the_top_level_api_and_links_stay_inside_the_repository():
    import ast

    tree = ast.parse(python_blocks()[0])
    first_party = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and node.module.split(".")[0] in ("tokenizer_bridge", "mllm")]
    assert first_party and set(first_party) <= {"tokenizer_bridge", "mllm"}, first_party
    text = README.read_text()
    assert "../" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):  # markdown links to files of the repository
        assert (README.parent / target).exists(), target
    assert "docs/ARCHITECTURE.md" in text and text.index("## Use it") < text.index("## Measured")
