"""Lazy exports for package ``__init__`` modules (PEP 562), so light imports stay light.

``lightning_curvature.data``, ``.models`` and ``.cli`` export names whose modules import
Lightning or matplotlib; those modules load on first attribute access only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, namespace: dict[str, Any], names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``names[name]`` on first use.

    Parameters
    ----------
    package : str
        The package's ``__name__`` (relative module names resolve against it).
    namespace : dict
        The package's ``globals()``; a loaded name is cached there.
    names : mapping
        Exported name -> module (e.g. ``{"ImageClassifier": ".classifier"}``).
    """

    def __getattr__(name: str) -> Any:  # noqa: N807
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
