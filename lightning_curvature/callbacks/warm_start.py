"""Checkpointing the warm start of the shared Lanczos run (one copy of the logic for every reader).

The warm start itself lives in the :class:`~.shared.MeasurementStore` (one per measurement set);
each callback that reads the shared Lanczos run saves it in its ``state_dict`` and, after a
resume, hands it back to the store at setup.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .shared import MeasurementStore, SetKey

__all__ = ["SharedLanczosReader", "WarmStartState"]


class WarmStartState:
    """The ``(v_max, v_min)`` pair one callback checkpoints for the store."""

    def __init__(self) -> None:
        self._pending: tuple[Tensor, Tensor] | None = None
        self._store: MeasurementStore | None = None
        self._key: SetKey | None = None

    def attach(self, store: MeasurementStore, key: SetKey) -> None:
        """Use ``store`` from now on; a restored warm start is handed over once."""
        self._store, self._key = store, key
        if self._pending is not None:
            store.set_warm_start(key, self._pending)
            self._pending = None

    def state(self) -> tuple[Tensor, Tensor] | None:
        if self._store is not None and self._key is not None:
            return self._store.warm_starts.get(self._key)
        return self._pending

    def load(self, value: Any) -> None:
        pair = tuple(value) if isinstance(value, (tuple, list)) and len(value) == 2 else None
        self._pending = pair  # type: ignore[assignment]
        if pair is not None and self._store is not None and self._key is not None:
            self._store.set_warm_start(self._key, pair)  # type: ignore[arg-type]
            self._pending = None


class SharedLanczosReader:
    """Mixin for callbacks that read the epoch's shared Lanczos run (``max_iters``, ``tol``).

    Registers the reader's Lanczos budget with the store and checkpoints the run's warm start
    under ``"warm_start"`` of the callback's extra state. Put it before ``CurvatureCallback`` in
    the bases; call :meth:`_init_lanczos_reader` after setting ``max_iters`` and ``tol``.
    """

    max_iters: int
    tol: float

    def _init_lanczos_reader(self) -> None:
        self._warm = WarmStartState()

    def register_shared(self, store: MeasurementStore, key: SetKey) -> None:
        store.register(key, self, krylov_iters=self.max_iters, tol=self.tol)
        self._warm.attach(store, key)

    def extra_state(self) -> dict[str, Any]:
        return {"warm_start": self._warm.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._warm.load(state.get("warm_start"))
