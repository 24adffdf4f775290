"""Registries of methods that are imported only when used (a scan must not import the training code)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from sealdiff.errors import SealdiffError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    config_path: str  # "module.ConfigClass"
    runner_path: str  # "module.RunnerClass"

    @staticmethod
    def _load(path: str) -> Any:
        module, _, attr = path.rpartition(".")
        return getattr(importlib.import_module(module), attr)

    @property
    def config_cls(self) -> type:
        return self._load(self.config_path)

    @property
    def runner(self) -> type:
        return self._load(self.runner_path)


Spec = TypeVar("Spec", bound=MethodSpec)


def lookup(registry: Mapping[str, Spec], name: str, what: str) -> Spec:
    try:
        return registry[name]
    except KeyError:
        raise SealdiffError(f"unknown {what} {name!r}; valid: {', '.join(registry)}") from None
