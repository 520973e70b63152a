"""Model classes by HF ``architectures`` name.

Every module of ``cubeserve.models`` that defines ``EntryClass`` (a class or a list of classes)
contributes its classes under their class names. Discovery runs on first use; a module that
fails to import is reported (log warning, and in the "unsupported" error) rather than hidden.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

from torch import nn

import cubeserve.models

logger = logging.getLogger(__name__)


class _ModelRegistry:
    def __init__(self) -> None:
        self._discovered: dict[str, type[nn.Module]] | None = None
        self._registered: dict[str, type[nn.Module]] = {}
        self._import_errors: dict[str, str] = {}

    def register(self, name: str, cls: type[nn.Module]) -> None:
        """Add (or override) an architecture from outside ``cubeserve.models``."""
        self._registered[name] = cls

    def resolve(self, architectures: list[str]) -> type[nn.Module]:
        """The class of the first supported name in a config's ``architectures``."""
        models = self.models()
        for arch in architectures:
            if arch in models:
                return models[arch]
        message = (
            f"model architectures {architectures} are not supported; supported: {sorted(models)}"
        )
        if self._import_errors:
            message += f"; modules that failed to import: {self._import_errors}"
        raise ValueError(message)

    def supported_architectures(self) -> list[str]:
        return sorted(self.models())

    def models(self) -> dict[str, type[nn.Module]]:
        if self._discovered is None:
            self._discovered = self._discover()
        return {**self._discovered, **self._registered}

    def _discover(self) -> dict[str, type[nn.Module]]:
        found: dict[str, type[nn.Module]] = {}
        for module_info in pkgutil.iter_modules(cubeserve.models.__path__):
            module_name = f"cubeserve.models.{module_info.name}"
            try:
                module = importlib.import_module(module_name)
            except Exception as err:  # one broken model must not take the others down
                logger.warning("cannot import %s, its models are unavailable: %r", module_name, err)
                self._import_errors[module_name] = repr(err)
                continue
            entries = getattr(module, "EntryClass", [])
            for cls in entries if isinstance(entries, list) else [entries]:
                first = found.setdefault(cls.__name__, cls)
                if first is not cls:
                    raise ValueError(
                        f"architecture {cls.__name__} is defined by {first.__module__} "
                        f"and by {module_name}"
                    )
        return found


ModelRegistry = _ModelRegistry()
