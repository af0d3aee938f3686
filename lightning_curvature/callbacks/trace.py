"""``HessianTrace``: tr H of the training loss on the measurement set, each measured epoch."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_curvature import curvature
from lightning_curvature.checks import check_bool, check_choice, check_int
from lightning_curvature.curvature import BlockTrace

from .base import CurvatureCallback, Measurement, MeasurementContext
from .progress import CountingOperator
from .shared import MeasurementStore, SetKey

__all__ = ["HessianTrace", "layer_tag"]

_METHODS = ("krylov", "hutchpp")
#: Prefix of the per-tensor trace scalars; the bar chart is logged under the prefix itself.
LAYER_PREFIX = "curvature/trace_layer"


def layer_tag(name: str) -> str:
    """``curvature/trace_layer/<name>`` with the dotted parameter name's ``.`` mapped to ``/``.

    ``net.0.weight`` becomes ``curvature/trace_layer/net/0/weight``: the tag mirrors the module
    tree (TensorBoard groups and filters by ``/``), and the mapping is reversible because
    parameter names contain no ``/``.
    """
    return f"{LAYER_PREFIX}/{name.replace('.', '/')}"


class HessianTrace(CurvatureCallback):
    """Log ``curvature/trace`` and ``curvature/trace_stderr`` from Hessian-vector products.

    ``method="krylov"`` (default) deflates the trace with the epoch's shared Lanczos run (the
    one that gives ``curvature/lambda_max``/``lambda_min``, :mod:`.shared`):
    ``tr H = Σ_j α_j + (1/m) Σ_i gᵢᵀ(I−QQᵀ)H(I−QQᵀ)gᵢ`` with ``Q`` the Lanczos basis, ``α`` the
    diagonal of its tridiagonal matrix (exact) and ``m = num_probes`` Rademacher probes for the
    rest. It is Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with the sketch replaced by a Krylov
    space that the eigenvalues need anyway, so it costs only ``num_probes`` products when
    :class:`~.eigenvalues.HessianEigenvalues` measures in the same epoch (``krylov_iters``
    + 2 + ``num_probes`` alone).
    ``method="hutchpp"`` is the stand-alone Hutch++ with ``num_matvecs`` products.
    Also logged: ``bands/curvature/trace_lower`` / ``bands/curvature/trace_upper`` (value ∓
    stderr, for the dashboard's margin chart).

    Per layer (``per_layer=True``; off by default: it costs about 0.2 s per measurement on the
    2x256 MLP, docs/per_layer.md): ``curvature/trace_layer/<name>`` for every
    parameter tensor (:func:`layer_tag`: ``net.0.weight`` → ``curvature/trace_layer/net/0/weight``),
    the trace of its diagonal block ``tr H_bb`` from the same probes (for Rademacher ``z``,
    ``E[z_bᵀ(Hz)_b] = tr H_bb``; see :func:`~lightning_curvature.curvature.krylov_deflated_trace`),
    and a bar chart ``curvature/trace_layer`` with ±stderr error bars. The blocks sum to
    ``curvature/trace``. The cost is one product more per measurement with ``"krylov"``
    (``H q_k``, which makes the Krylov cross terms of each block exact, in the same block of
    products as the probes) and none with ``"hutchpp"``.

    Parameters
    ----------
    method : {"krylov", "hutchpp"}, optional
        Default "krylov", or "hutchpp" when ``num_matvecs`` is given.
    num_probes : int
        Hutchinson probes on the deflated remainder (``"krylov"``; >= 2). Default 6: on an MLP
        784-256-256-10 (Fashion-MNIST, 256 samples) 10 probes gave a standard error of 3.7% of
        tr H, so 6 give about 5%, below the 6% of the former default (Hutch++ with 30
        products); the logged stderr says what the budget buys.
    krylov_iters : int
        Lanczos steps this callback asks of the shared run (the run uses the largest any
        consumer asks for). Default 20.
    num_matvecs : int, optional
        Products of ``"hutchpp"`` (>= 4). Default 30.
    per_layer : bool
        Log the per-tensor traces and their bar chart. Default True.
    every_n_epochs : int
        Default 2, aligned with :class:`~.eigenvalues.HessianEigenvalues` so that both read one
        Lanczos run.
    num_samples, batch_size, seed, loss_fn, eval_mode, measure_on_train_start, name
        See :class:`~lightning_curvature.callbacks.base.CurvatureCallback`.
    """

    def __init__(
        self,
        *,
        method: str | None = None,
        num_probes: int = 6,
        krylov_iters: int = 20,
        num_matvecs: int | None = None,
        per_layer: bool = False,
        every_n_epochs: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, **kwargs)
        if method is None:
            # An explicit Hutch++ budget (the pre-Krylov API) keeps its meaning.
            method = "krylov" if num_matvecs is None else "hutchpp"
        self.method = check_choice("method", method, _METHODS)
        self.num_probes: int = check_int("num_probes", num_probes, minimum=2)  # type: ignore[assignment]
        self.krylov_iters: int = check_int("krylov_iters", krylov_iters, minimum=2)  # type: ignore[assignment]
        self.num_matvecs: int = check_int(  # type: ignore[assignment]
            "num_matvecs", 30 if num_matvecs is None else num_matvecs, minimum=4
        )
        self.per_layer: bool = check_bool("per_layer", per_layer)  # type: ignore[assignment]

    @override
    def register_shared(self, store: MeasurementStore, key: SetKey) -> None:
        if self.method == "krylov":
            store.register(key, self, krylov_iters=self.krylov_iters, tol=1e-3)

    @override
    def memory_bytes(self, dim: int, num_samples: int) -> int:
        # The float64 sketch/probe blocks and their images: a few dim x columns matrices.
        columns = (
            self.num_matvecs
            if self.method == "hutchpp"
            else self.krylov_iters + 2 * self.num_probes + 1
        )
        return 3 * 8 * dim * columns

    @override
    def measure(self, ctx: MeasurementContext) -> Measurement:
        op = ctx.shared.hessian()
        blocks = None if self.per_layer else ()  # None: one block per parameter tensor
        if self.method == "krylov":
            products = self.num_probes + int(self.per_layer)
            with ctx.progress("Krylov-deflated trace", products) as bar:
                run = ctx.shared.krylov(lambda o: CountingOperator(o, bar))
                est = curvature.krylov_deflated_trace(
                    CountingOperator(op, bar),
                    run.lanczos,
                    self.num_probes,
                    ctx.generator,
                    blocks=blocks,
                )
        else:
            with ctx.progress("Hutch++ trace", self.num_matvecs) as bar:
                est = curvature.hutchpp_trace(
                    CountingOperator(op, bar),
                    num_matvecs=self.num_matvecs,
                    generator=ctx.generator,
                    blocks=blocks,
                )
        value, stderr = est.value, est.stderr
        result = Measurement(
            scalars={
                "curvature/trace": value,
                "curvature/trace_stderr": stderr,
                "bands/curvature/trace_lower": value - stderr,
                "bands/curvature/trace_upper": value + stderr,
            }
        )
        if est.blocks:
            result.scalars.update({layer_tag(b.name): b.value for b in est.blocks})
            per_block, step = est.blocks, ctx.step
            result.figures[LAYER_PREFIX] = lambda: layer_trace_figure(
                per_block, value, stderr, step
            )
        return result


def layer_trace_figure(
    blocks: tuple[BlockTrace, ...], total: float, total_stderr: float, epoch: int
) -> Any:
    """Horizontal bars ``tr H_bb`` per parameter tensor with ±stderr error bars."""
    import numpy as np
    from matplotlib.figure import Figure

    names = [b.name for b in blocks]
    values = np.array([b.value for b in blocks])
    errors = np.array([b.stderr if np.isfinite(b.stderr) else 0.0 for b in blocks])
    height = min(2.0 + 0.32 * len(blocks), 14.0)
    fig = Figure(figsize=(6.4, height), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    rows = np.arange(len(blocks))
    colors = ["C0" if v >= 0 else "C3" for v in values]
    ax.barh(rows, values, xerr=errors, color=colors, ecolor="0.2", capsize=3)
    ax.set_yticks(rows, names, fontsize=8 if len(blocks) <= 30 else 6)
    ax.invert_yaxis()  # first parameter on top, as in named_parameters()
    ax.axvline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("tr H_bb (± stderr)")
    ax.set_title(
        f"Hessian trace per parameter tensor, epoch {epoch}\n"
        f"sum = tr H = {total:.4g} ± {total_stderr:.2g}",
        fontsize=10,
    )
    return fig
