"""Hugging Face interop: MM-Rec as a transformers model, tokenizers as HF tokenizers, ``mmrec export hf``.

After ``import mmrec``, ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type="mmrec"``. transformers
takes seconds to import, so ``import mmrec`` does not import it: :func:`register_on_import` registers at
once when transformers is already imported, and otherwise as soon as it is (an import hook that waits for
the ``transformers`` package and does nothing else). Without transformers installed nothing happens and
nothing fails.

    import mmrec
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("export/")      # MMRecForCausalLM
    tok = AutoTokenizer.from_pretrained("export/")
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["MMRecCache", "MMRecForCausalLM", "MMRecHFConfig", "register", "register_on_import"]

_registered = False


def register() -> None:
    """Register MMRecHFConfig and MMRecForCausalLM with transformers' Auto classes (idempotent).

    Raises ImportError when transformers is not installed."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmrec.hf.modeling import MODEL_TYPE, MMRecForCausalLM, MMRecHFConfig

    AutoConfig.register(MODEL_TYPE, MMRecHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(MMRecHFConfig, MMRecForCausalLM, exist_ok=True)
    _registered = True


def _register_quietly() -> None:
    try:
        register()
    except Exception as e:  # an incompatible transformers must not break importing it or mmrec
        warnings.warn(f"mmrec could not register its model with transformers: {e}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers`` is about to be imported, it wraps the real loader's
    ``exec_module`` so that :func:`register` runs right after the package has been executed."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "transformers":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: types.ModuleType) -> None:
            exec_module(module)
            _register_quietly()

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def register_on_import() -> None:
    """Register with transformers now if it is imported, else when it is; nothing if it is not installed."""
    if sys.modules.get("transformers") is not None:
        _register_quietly()
        return
    try:
        installed = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # blocked (sys.modules entry None) or broken
        installed = False
    if installed and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name: str) -> Any:
    if name in ("MMRecCache", "MMRecForCausalLM", "MMRecHFConfig"):
        from mmrec.hf import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'mmrec.hf' has no attribute {name!r}")
