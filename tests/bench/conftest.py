"""Helpers of the benchmark smoke tests: the scripts in bench/ are loaded as modules, not imported as a package."""

import importlib.util
import pathlib

BENCH_DIR = pathlib.Path(__file__).parents[2] / "bench"


def load_bench(name: str):
    """``bench/<name>.py`` as a module (bench/ is no package: each script runs on its own)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
