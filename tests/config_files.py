"""The project's config files as the tests load them: ``configs/<name>.py``'s ``get_config(arg)``, exactly what
``train.py --config configs/<name>.py:arg`` starts from. Not a test module."""

import importlib.util
import pathlib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg: str | None = None):
    """``configs/<name>.py``'s ``get_config(arg)`` (a fresh ConfigDict on every call)."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
