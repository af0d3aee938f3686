"""Natural-gradient descent with trace-scaled damping, solved exactly in the sample space.

Update (``DESIGN.md``, *NGD*)::

    θ ← (1 − lr·wd)·θ − lr·m,     m ← μ·m + Δ,     Δ = (F + κI)⁻¹ g,
    κ = α · max(tr F, ε) / d,

with ``g`` the minibatch gradient, ``d`` the number of optimized parameters and
``F = (1/B) Gᵀ G`` the minibatch Fisher, ``G`` the N×d matrix of (pseudo-)sample gradients.

Exact solve without a d×d matrix. With ``K = G Gᵀ`` (N×N) the push-through identity
``(GᵀG/B + κI)⁻¹ Gᵀ = Gᵀ(K/B + κI)⁻¹`` gives, for a gradient ``g = Gᵀv`` in the row span of G,

    Δ = B · Gᵀ (K + BκI)⁻¹ v,

and for any remainder ``r = g − Gᵀv`` the Woodbury identity gives

    (F + κI)⁻¹ r = (1/κ) (r − Gᵀ (K + BκI)⁻¹ G r).

Only the N×N system is factorized (Cholesky, in the parameters' precision; float64 if float32
breaks down). ``K``, ``Gᵀc`` and ``G r`` come from layer factors for ``nn.Linear``/``nn.Conv2d``
(:mod:`.factors`) and from ``torch.func`` per-sample gradients for every other parameter
(:mod:`.per_sample`). Costs per step: N² (in + out) per Linear layer for K, one extra
weight-gradient-sized product for ``Gᵀc``, and an N³/3 Cholesky factorization.

Fisher types
------------
``"empirical"``: ``G`` has the N = B per-sample gradients ``g_i = ∇ℓ(x_i, y_i)`` at the observed
labels, and ``g = Gᵀ(1/B)``.

``"true"`` (softmax cross-entropy): ``F = (1/B) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` (``J_i`` the
Jacobian of the logits), computed exactly through the output-space factorization
``diag p − p pᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ``: the pseudo-samples
``g_{i,c} = √p_{ic} J_iᵀ(e_c − p_i) = √p_{ic} ∇_θ CE(x_i, c)`` give ``F = (1/B) Σ_{i,c} g_{i,c}
g_{i,c}ᵀ``. Since ``Σ_c √p_{ic} g_{i,c} = 0`` one of them per input is redundant; the
implementation uses the equivalent exact rank-(C−1) factor ``diag p − p pᵀ = Mᵀ L Lᵀ M`` (``r`` the
most probable class, ``q`` = p without entry ``r``, ``L Lᵀ = diag q − q qᵀ``, ``M`` drops entry r
and subtracts it from the others), i.e. N = B·(C−1) pseudo-samples with cotangents the columns
of ``Mᵀ L``. The minibatch gradient ``g = (1/B) Σ_i J_iᵀ(p_i − y_i) = Σ_i J_iᵀ δ_i`` lies in their
span because each ``δ_i`` sums to zero (any soft label ``y_i``): ``δ_i = Mᵀ L (L⁻¹ Mδ_i)``, so
``v_i = L⁻¹ (δ_i without entry r)``. Hence no part of the step is multiplied by 1/κ.

A Monte-Carlo Fisher with one sampled label per input does not span ``g``; with ``B ≪ d`` and a
trace-scaled (tiny) κ, the out-of-span part of ``g`` is scaled by 1/κ and the weights blow up
within a few steps. It is deliberately not offered.

References
----------
Amari (1998), "Natural gradient works efficiently in learning", Neural Computation 10(2).
Martens (2020), "New insights and perspectives on the natural gradient method", JMLR 21.
Ren & Goldfarb (2019), "Efficient subsampled Gauss-Newton and natural gradient methods for
training neural networks", arXiv:1906.02353 (the sample-space Woodbury solve).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..curvature.params import ParameterLayout
from .factors import (
    LayerFactors,
    add_lower_block_gram,
    is_factorable,
    layer_inputs,
    layer_output_grads,
)
from .per_sample import per_sample_vjps

__all__ = ["NGD"]

FISHER_TYPES = ("empirical", "true")
BACKENDS = ("factors", "vmap")


@dataclass
class _LayerCall:
    x: Tensor  # detached layer input
    z: Tensor | None = None  # layer output with its graph (true Fisher only, dropped after use)
    d: Tensor | None = None  # gradient of the loss w.r.t. the layer output


@dataclass
class _Capture:
    """What the hooks saw during one forward/backward."""

    calls: dict[nn.Module, list[_LayerCall]] = field(default_factory=dict)
    root_calls: int = 0
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: Tensor | None = None
    output_grad: Tensor | None = None
    true_cotangents: Tensor | None = None  # (C − 1, B, C) factor of diag p − p pᵀ per sample
    fisher_chol: Tensor | None = None  # (B, C − 1, C − 1) Cholesky of diag q − q qᵀ, float64
    nonfinite_outputs: bool = False  # logits with inf/NaN: the step is skipped, never raised
    fisher_keep: Tensor | None = None  # (B, C) mask of the non-reference classes


class _Hook:
    """A module hook that calls the optimizer through a weak reference.

    A deep copy (or pickle) of the model gets an inert hook instead of a copy of the optimizer:
    the copy's parameters are not the ones this optimizer updates.
    """

    def __init__(self, optimizer: NGD | None, method: str) -> None:
        self._ref = weakref.ref(optimizer) if optimizer is not None else None
        self._method = method

    def __call__(self, *args: object) -> None:
        opt = self._ref() if self._ref is not None else None
        if opt is not None:
            getattr(opt, self._method)(*args)

    def __deepcopy__(self, memo: dict) -> _Hook:
        return _Hook(None, self._method)

    def __reduce__(self) -> tuple:
        return (_Hook, (None, self._method))


def _check_number(
    name: str,
    value: float,
    low: float,
    *,
    low_open: bool,
    high: float | None = None,
    high_open: bool = True,
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = f"{'(' if low_open else '['}{low}"
        hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ValueError(f"{name} must be a finite number in {lo}, {hi}; got {value!r}")
    return float(value)


def _is_distribution(q: Tensor, tol: float) -> bool:
    """Whether every row of ``q`` is a probability vector (up to ``tol``)."""
    return float(q.min()) >= -tol and float((q.sum(-1) - 1).abs().max()) <= tol


class NGD(torch.optim.Optimizer):
    r"""Natural-gradient descent with trace-scaled damping ``κ = α·max(tr F, ε)/d``.

    Takes the module, not only its parameters, because it needs per-sample information: forward
    hooks on the model and its ``Linear``/``Conv2d`` layers record inputs and output-gradients
    while :meth:`step`'s ``closure`` (zero_grad, forward, backward) runs. Use it like any
    closure-based optimizer (``LBFGS``), in a plain loop or under Lightning automatic
    optimization; or, without a closure, run forward/backward inside ``with opt.capture():``
    and call ``opt.step()`` afterwards.

    Parameters
    ----------
    model : nn.Module
        The network. Its forward must be called **exactly once** per step (inside the closure),
        on a batch whose leading dimension indexes samples; for ``fisher_type="true"`` (and for
        parameters outside ``Linear``/``Conv2d``) it must return the logits / output tensor that
        the loss consumes. All trainable parameters (``named_parameters()`` order) are optimized.
    lr : float
        Learning rate η > 0.
    alpha : float
        Damping scale α > 0 in ``κ = α·max(tr F, ε)/d``. Large α → SGD with lr/κ.
    eps : float
        Floor ε > 0 on tr F (keeps κ > 0 at a zero-gradient point).
    fisher_type : {"empirical", "true"}
        Per-sample gradients at the observed labels, or the exact true Fisher of a softmax
        output (B·(C−1) pseudo-samples, see the module docstring; needs a mean-reduced softmax
        cross-entropy loss on the model's output, which must be the logits).
    momentum : float
        Heavy-ball momentum μ ∈ [0, 1) on the natural-gradient direction (``m ← μ m + Δ``).
    weight_decay : float
        Decoupled weight decay ≥ 0: ``θ ← (1 − lr·wd)θ − lr·m``. Coupled L2 (adding ``wd·θ`` to
        the gradient) would put a vector outside the span of the Fisher into the solve, where it
        is multiplied by up to 1/κ.
    backend : {"factors", "vmap"}
        ``"factors"``: Linear/Conv2d layers through their factors, the rest with ``torch.func``.
        ``"vmap"``: every parameter with ``torch.func`` per-sample gradients (slower; a reference).

    Notes
    -----
    *Loss reduction.* The loss must be the **mean** over the B samples of the batch: per-sample
    gradients are recovered as ``B ×`` the captured output-gradients. A sum-reduced softmax
    cross-entropy is detected from the output gradients (``ValueError`` for the true Fisher, a
    warning for the empirical one); other losses cannot be checked.

    *Gradient consistency.* The update uses ``.grad`` as left by the closure. If it is not ``Gᵀv``
    (an explicit L2 term in the loss, gradient clipping, parameters used outside their modules),
    the remainder is solved exactly with the Woodbury formula and a warning is issued once;
    ``stats["grad_residual"]`` reports its relative size. The check compares ``‖g‖²`` with
    ``vᵀKv = ‖Gᵀv‖²`` (free) and forms the residual only when they differ by more than
    ``1000·ε_dtype`` relative, so a remainder much smaller than ``√(1000·ε)‖g‖`` and orthogonal to
    ``g`` can go unnoticed (it is then dropped, together with its 1/κ amplification).

    *Precision.* The Gram matrix is formed and factorized in the parameters' dtype; a float32
    factorization that breaks down (κ so small that cond·ε₃₂ ≳ 1) is redone in float64.

    *Non-finite values.* If the gradient, the Gram matrix, κ or the update is not finite, the step
    is **skipped with a warning** (weights and momentum untouched, ``stats["skipped"] = True``),
    so a single bad batch cannot corrupt the weights (as ``torch.amp.GradScaler`` does).

    *One process, one micro-batch.* The Fisher is that of the batch seen by the closure's forward.
    Gradient accumulation over several micro-batches and DDP (whose all-reduced ``.grad`` holds
    other ranks' samples) make ``.grad`` differ from the captured per-sample gradients; this is
    detected (residual warning) but not supported.

    *Batch coupling.* BatchNorm in train mode makes the loss not a sum of per-sample terms; the
    factor path then uses the coupled output-gradients and the ``torch.func`` path evaluates
    samples alone. Use eval-mode BatchNorm, LayerNorm or GroupNorm with NGD.

    Attributes
    ----------
    stats : dict
        After each step: ``kappa``, ``fisher_trace`` (tr F), ``update_norm`` (‖θ_{t+1} − θ_t‖),
        ``grad_residual``, ``num_pseudo_samples`` (N), ``batch_size``, ``solve_precision``,
        ``skipped``, ``seconds`` (wall time of the solve and update, closure excluded).
    layout : ParameterLayout
        The flat-vector layout of the optimized parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        *,
        alpha: float = 1.0,
        eps: float = 1e-10,
        fisher_type: str = "empirical",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        backend: str = "factors",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model must be an nn.Module (NGD needs per-sample information from its layers), "
                f"got {type(model).__name__}"
            )
        defaults = {
            "lr": _check_number("lr", lr, 0.0, low_open=True),
            "alpha": _check_number("alpha", alpha, 0.0, low_open=True),
            "eps": _check_number("eps", eps, 0.0, low_open=True),
            "momentum": _check_number("momentum", momentum, 0.0, low_open=False, high=1.0),
            "weight_decay": _check_number("weight_decay", weight_decay, 0.0, low_open=False),
        }
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model
        self.fisher_type = fisher_type
        self.backend = backend
        self.layout = ParameterLayout.from_module(model)
        self._building = True
        super().__init__(self.layout.parameters(model), defaults)
        self._building = False

        slices = self.layout.slices()
        name_of = {id(p): n for n, p in model.named_parameters()}
        owners: dict[int, int] = {}
        for m in model.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self._layers: dict[nn.Module, tuple[slice, slice | None]] = {}
        covered: set[str] = set()
        if backend == "factors":
            for m in model.modules():
                if not is_factorable(m):
                    continue
                w_name = name_of.get(id(m.weight))
                if w_name not in slices or owners[id(m.weight)] > 1:
                    continue  # frozen or shared weight: per-sample gradient is not this layer's
                b_slice = None
                if m.bias is not None:
                    b_name = name_of.get(id(m.bias))
                    if b_name in slices and owners[id(m.bias)] == 1:
                        b_slice = slices[b_name]
                        covered.add(b_name)
                    elif b_name in slices:
                        continue
                self._layers[m] = (slices[w_name], b_slice)
                covered.add(w_name)
        rest = [n for n in self.layout.names if n not in covered]
        self._fallback = ParameterLayout.from_module(model, rest) if rest else None

        self._armed = False
        self._capture: _Capture | None = None
        self._warned: set[str] = set()
        self.stats: dict[str, float | int | bool] = {}
        self._handles = [model.register_forward_hook(_Hook(self, "_root_hook"), with_kwargs=True)]
        for m in self._layers:
            self._handles.append(m.register_forward_hook(_Hook(self, "_layer_hook")))
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            warnings.warn(
                "NGD: the model has BatchNorm layers; in train mode they couple the samples of a "
                "batch, so per-sample gradients (and the Fisher) are only approximate.",
                stacklevel=2,
            )

    # -- param groups ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", False):
            raise ValueError(
                "param_group: NGD solves one system over all of the model's trainable parameters; "
                "extra parameter groups are not supported"
            )
        super().add_param_group(param_group)

    def remove_hooks(self) -> None:
        """Detach the optimizer's hooks from the model (it can no longer step)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- capture -----------------------------------------------------------------------------
    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record per-sample information from the forward/backward run inside the block."""
        self._capture = _Capture()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _recording(self) -> bool:
        return self._armed and self._capture is not None and torch.is_grad_enabled()

    def _layer_hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not self._recording() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        call = _LayerCall(x=inputs[0].detach())
        self._capture.calls.setdefault(module, []).append(call)
        if self.fisher_type == "true":
            call.z = output
        else:

            def keep(grad: Tensor, call: _LayerCall = call) -> None:
                call.d = grad.detach()

            output.register_hook(keep)

    def _root_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self._recording():
            return
        cap = self._capture
        cap.root_calls += 1
        cap.args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        cap.kwargs = dict(kwargs)
        if not isinstance(output, Tensor):
            return
        cap.output = output.detach()
        if self.fisher_type == "true" and cap.root_calls == 1:
            # Before the hook below exists: this backward must not be mistaken for the loss's.
            self._true_fisher_cotangents(cap, output)
        if output.requires_grad:

            def keep(grad: Tensor) -> None:
                cap.output_grad = grad.detach()

            output.register_hook(keep)

    def _true_fisher_cotangents(self, cap: _Capture, output: Tensor) -> None:
        """Output-gradients of the B·C pseudo-samples, while the forward graph is alive."""
        if output.dim() != 2:
            raise ValueError(
                "fisher_type='true' needs the model to return logits of shape (B, C), got "
                f"{tuple(output.shape)}"
            )
        if not bool(torch.isfinite(output.detach()).all()):
            # The step is skipped (see _step); raising here would abort training mid-closure.
            cap.nonfinite_outputs = True
            return
        probs = torch.softmax(output.detach().double(), dim=-1)
        probs = probs.clamp_min(torch.finfo(output.dtype).tiny)
        batch, num_classes = probs.shape
        if num_classes < 2:
            raise ValueError("fisher_type='true' needs at least 2 classes (logits of shape (B, C))")
        # diag p − p pᵀ has the null vector 1, so C − 1 pseudo-samples per input suffice:
        # with r = argmax p (the reference class) and q = p without r,
        # diag p − p pᵀ = Mᵀ (diag q − q qᵀ) M,  M = [I, −1] (drop r, subtract the r-th entry),
        # and with diag q − q qᵀ = L Lᵀ the cotangents are the C − 1 columns of Mᵀ L.
        ref = probs.argmax(-1)
        rows = torch.arange(batch, device=probs.device)
        keep = torch.ones_like(probs, dtype=torch.bool)
        keep[rows, ref] = False
        q = probs[keep].view(batch, num_classes - 1)
        chol = torch.linalg.cholesky(torch.diag_embed(q) - q[:, :, None] * q[:, None, :])
        cot = probs.new_zeros(batch, num_classes, num_classes - 1)
        cot[keep] = chol.reshape(-1, num_classes - 1)
        cot[rows, ref] = -chol.sum(1)
        cap.fisher_chol, cap.fisher_keep = chol, keep
        cap.true_cotangents = cot.permute(2, 0, 1).to(output.dtype)  # (C − 1, B, C)
        calls = [c for cs in cap.calls.values() for c in cs if c.z is not None]
        if not calls or not output.requires_grad:
            return
        # One backward per class: a vmapped backward (is_grads_batched) falls back to slow
        # per-slice loops for several CPU ops.
        zs = [c.z for c in calls]
        per_class = [
            torch.autograd.grad(output, zs, grad_outputs=u, retain_graph=True, allow_unused=True)
            for u in cap.true_cotangents
        ]
        grads = [
            None if per_class[0][j] is None else torch.stack([pc[j] for pc in per_class])
            for j in range(len(zs))
        ]
        for c, g in zip(calls, grads, strict=True):
            c.d = (
                torch.zeros((num_classes - 1, *c.z.shape), dtype=c.z.dtype, device=c.z.device)
                if g is None
                else g
            )
            c.z = None

    # -- step --------------------------------------------------------------------------------
    def step(self, closure: Callable[[], object] | None = None) -> object:  # type: ignore[override]
        """One NGD step.

        Parameters
        ----------
        closure : callable, optional
            Clears the gradients, runs the model's forward once, computes the mean loss, calls
            ``backward()`` and returns the loss. If omitted, the forward/backward must have run
            inside ``with optimizer.capture():``.

        Returns
        -------
        The closure's return value (``None`` without a closure).
        """
        loss = None
        if closure is not None:
            with self.capture(), torch.enable_grad():
                loss = closure()
        cap, self._capture = self._capture, None
        if cap is None:
            raise RuntimeError(
                "NGD needs per-sample information from the forward/backward pass: call "
                "step(closure) or run forward and backward inside `with optimizer.capture():`"
            )
        start = time.perf_counter()
        with torch.no_grad():
            self._step(cap)
        self.stats["seconds"] = time.perf_counter() - start
        return loss

    def _skip(self, reason: str, **stats: float) -> None:
        warnings.warn(f"NGD: step skipped, {reason}; weights left unchanged", stacklevel=3)
        self.stats = {
            "kappa": float("nan"),
            "fisher_trace": float("nan"),
            "update_norm": 0.0,
            "grad_residual": float("nan"),
            "skipped": True,
            **stats,
        }

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _batch_size(self, cap: _Capture) -> int:
        sizes = {int(c.x.shape[0]) for cs in cap.calls.values() for c in cs}
        if cap.output is not None and cap.output.dim() > 0:
            sizes.add(int(cap.output.shape[0]))
        if len(sizes) != 1:
            raise ValueError(
                f"NGD: inconsistent batch dimensions {sorted(sizes)} among the captured layer "
                "inputs and the model output; every layer must see the samples along dim 0"
            )
        return sizes.pop()

    def _check_output_grad(self, cap: _Capture, batch: int) -> Tensor | None:
        """The mean-loss gradient w.r.t. the logits; checks the softmax-CE reduction."""
        delta = cap.output_grad
        if delta is None or cap.output is None:
            return None
        if delta.shape != cap.output.shape:
            raise ValueError("NGD: output gradient and output shapes differ")
        if cap.output.dim() != 2 or batch < 2:
            return delta
        probs = torch.softmax(cap.output.double(), dim=-1)
        d64 = delta.double()
        tol = 1e-3 if delta.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
        mean_ok = _is_distribution(probs - batch * d64, tol)
        sum_like = not mean_ok and _is_distribution(probs - d64, tol)
        if self.fisher_type == "true":
            if sum_like:
                raise ValueError(
                    "NGD: the loss looks sum-reduced (output gradient = p − y instead of "
                    "(p − y)/B); use reduction='mean'"
                )
            if not mean_ok:
                raise ValueError(
                    "NGD: fisher_type='true' assumes a mean-reduced softmax cross-entropy on the "
                    "model's output (logits); the output gradient does not have the form "
                    "(p − y)/B"
                )
        elif sum_like:
            self._warn_once(
                "sum",
                "NGD: the loss looks sum-reduced (output gradient = p − y, not (p − y)/B); "
                "per-sample gradients are recovered assuming a mean-reduced loss",
            )
        return delta

    def _step(self, cap: _Capture) -> None:
        group = self.param_groups[0]
        lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        params: list[Tensor] = group["params"]
        if all(p.grad is None for p in params):  # e.g. Lightning skipped the batch
            self.stats = {
                "kappa": float("nan"),
                "fisher_trace": float("nan"),
                "update_norm": 0.0,
                "grad_residual": float("nan"),
                "skipped": True,
            }
            return
        if cap.root_calls > 1:
            raise RuntimeError(
                f"NGD: the model's forward ran {cap.root_calls} times during the step; it must "
                "run exactly once (per-sample information is taken from that call)"
            )
        ref = next(p for p in params if p.grad is not None)
        dtype, device = ref.dtype, ref.device
        grad = self.layout.flatten(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        )
        grad_sq = float(torch.dot(grad, grad))
        if cap.nonfinite_outputs:
            self._skip("the model's outputs are not finite")
            return
        if not math.isfinite(grad_sq):
            self._skip("the gradient is not finite")
            return
        if not cap.calls and cap.root_calls == 0:
            raise RuntimeError(
                "NGD: no forward pass of the model was recorded during the step (was the model "
                "given to NGD the one called in the closure?)"
            )
        batch = self._batch_size(cap)
        delta = self._check_output_grad(cap, batch)
        true = self.fisher_type == "true"
        if true and cap.true_cotangents is None:
            raise ValueError(
                "NGD: fisher_type='true' needs the forward of the model given to NGD to run in "
                "the closure and return logits (e.g. pass the network, not a wrapper whose "
                "forward is not called)"
            )
        reps = cap.true_cotangents.shape[0] if true else 1
        n = reps * batch

        factors: list[tuple[LayerFactors, slice, slice | None]] = []
        for module, calls in cap.calls.items():
            w_slice, b_slice = self._layers[module]
            a_parts, d_parts = [], []
            for c in calls:
                a_parts.append(layer_inputs(module, c.x))
                if c.d is None:  # output did not reach the loss
                    d_parts.append(None)
                elif true:
                    d_parts.append(layer_output_grads(module, c.d, lead=1))
                else:
                    d_parts.append(layer_output_grads(module, c.d * batch, lead=0)[None])
            out_features = module.weight.shape[0]
            d_parts = [
                d
                if d is not None
                else torch.zeros(
                    reps, batch, a.shape[1], out_features, dtype=a.dtype, device=a.device
                )
                for a, d in zip(a_parts, d_parts, strict=True)
            ]
            f = LayerFactors(torch.cat(a_parts, 1), torch.cat(d_parts, 2), b_slice is not None)
            factors.append((f, w_slice, b_slice))

        fallback_g = None
        if self._fallback is not None:
            if cap.root_calls == 0 or cap.output is None:
                raise ValueError(
                    "NGD: parameters outside Linear/Conv2d layers need the forward of the model "
                    "given to NGD to run in the closure and return one output tensor"
                )
            if true:
                cot = cap.true_cotangents
            elif delta is not None:
                cot = (delta * batch)[None]
            else:
                cot = torch.zeros_like(cap.output)[None]
            fallback_g = per_sample_vjps(self.model, self._fallback, cap.args, cap.kwargs, cot)
            fallback_slices = [self.layout.slices()[nm] for nm in self._fallback.names]

        # Gram matrix K = G Gᵀ, lower block triangle only (B×B blocks), in the parameter dtype.
        gram = torch.zeros(n, n, dtype=dtype, device=device)
        for f, _, _ in factors:
            f.add_gram_lower(gram)
        if fallback_g is not None:
            add_lower_block_gram(gram, fallback_g.view(reps, batch, -1))
        fisher_trace = float(gram.diagonal().double().sum()) / batch
        kappa = alpha * max(fisher_trace, eps) / self.layout.dim
        if not (math.isfinite(fisher_trace) and math.isfinite(kappa) and kappa > 0):
            self._skip("the Fisher is not finite", fisher_trace=fisher_trace)
            return

        # Span coefficients v with g = Gᵀv.
        if true:
            if delta is None:
                raise RuntimeError("NGD: the output gradient was not captured")
            # δ_i = Mᵀ y_i with y_i = δ_i without the reference class (δ_i sums to zero), so
            # the coefficients of the pseudo-samples Mᵀ L are v_i = L⁻¹ y_i.
            y = delta.double()[cap.fisher_keep].view(batch, -1, 1)
            v = torch.linalg.solve_triangular(cap.fisher_chol, y, upper=False)
            v = v[..., 0].T.reshape(n)
        else:
            v = torch.full((n,), 1.0 / batch, dtype=torch.float64, device=device)
        # ‖Gᵀv‖² = vᵀKv (K stored as its lower block triangle L: K = L + Lᵀ − blockdiag).
        v_work = v.to(gram.dtype)
        span_sq = 2 * float(v_work @ (gram @ v_work))
        for i in range(reps):
            block = slice(i * batch, (i + 1) * batch)
            span_sq -= float(v_work[block] @ (gram[block, block] @ v_work[block]))

        def g_transpose(columns: Tensor) -> Tensor:
            """``Gᵀ columns`` for ``columns`` (N, J) → (J, d) in the parameter dtype."""
            j = columns.shape[1]
            pieces: dict[int, Tensor] = {}  # slice start → (J, width), assembled in layout order
            for f, ws, bs in factors:
                w, b = f.combine(columns)
                pieces[ws.start] = w.reshape(j, -1).to(dtype)
                if bs is not None:
                    pieces[bs.start] = b.to(dtype)
            if fallback_g is not None:
                prod = (fallback_g.T @ columns.to(fallback_g.dtype)).T.to(dtype)
                start = 0
                for sl in fallback_slices:
                    width = sl.stop - sl.start
                    pieces[sl.start] = prod[:, start : start + width]
                    start += width
            for sl in self.layout.slices().values():
                if sl.start not in pieces:  # parameter never reached by the loss: zero gradient
                    pieces[sl.start] = torch.zeros(
                        j, sl.stop - sl.start, dtype=dtype, device=device
                    )
            return torch.cat([pieces[k] for k in sorted(pieces)], dim=1)

        gram.diagonal().add_(batch * kappa)
        solve, precision = _spd_solver(gram, batch * kappa)
        coeff = batch * solve(v[:, None])[:, 0]
        direction = g_transpose(coeff[:, None])[0]

        # Is g = Gᵀv? The norm identity ‖g‖² = vᵀKv is free; only if it fails is the residual
        # formed explicitly and solved by Woodbury (exact, but scaled by up to 1/κ off-span).
        tol = 1e3 * torch.finfo(dtype).eps
        mismatch = abs(grad_sq - span_sq) / grad_sq if grad_sq > 0 else 0.0
        rel_residual = math.sqrt(mismatch)
        residual = None
        if mismatch > tol:
            residual = grad - g_transpose(v[:, None])[0]
            rel_residual = float(residual.norm()) / math.sqrt(grad_sq)
        if residual is not None and rel_residual > tol:
            self._warn_once(
                "residual",
                f"NGD: the gradient differs from the mean of the captured per-sample gradients "
                f"(relative {rel_residual:.2e}): an explicit L2 term in the loss, gradient "
                "clipping, a non-mean reduction or parameters used outside their layers. The "
                "remainder is solved exactly but its out-of-span part is scaled by up to 1/kappa.",
            )
            g_r = torch.zeros(n, dtype=torch.float64, device=device)
            for f, ws, bs in factors:
                w_shape = (f.d.shape[-1], f.a.shape[-1])
                g_r += f.apply(
                    residual[ws].reshape(w_shape), residual[bs] if bs is not None else None
                ).double()
            if fallback_g is not None:
                r_fb = torch.cat([residual[sl] for sl in fallback_slices])
                g_r += (fallback_g @ r_fb.to(fallback_g.dtype)).double()
            w = solve(g_r[:, None])
            direction = direction + (residual - g_transpose(w)[0]) / kappa

        if not math.isfinite(float(direction.sum())):
            self._skip(
                "the natural-gradient direction is not finite",
                kappa=kappa,
                fisher_trace=fisher_trace,
            )
            return

        sq_norm = 0.0
        for p, d_p in zip(params, self.layout.unflatten(direction).values(), strict=True):
            state = self.state[p]
            if momentum > 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = d_p.clone()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(momentum).add_(d_p)
                d_p = buf
            if weight_decay > 0:
                update = d_p * lr + p * (lr * weight_decay)
                flat_update = update.reshape(-1)
                sq_norm += float(torch.dot(flat_update, flat_update))
                p.sub_(update)
            else:
                flat_dir = d_p.reshape(-1)
                sq_norm += lr * lr * float(torch.dot(flat_dir, flat_dir))
                p.add_(d_p, alpha=-lr)
        self.stats = {
            "kappa": kappa,
            "fisher_trace": fisher_trace,
            "update_norm": math.sqrt(sq_norm),
            "grad_residual": rel_residual,
            "num_pseudo_samples": n,
            "batch_size": batch,
            "solve_precision": precision,
            "skipped": False,
        }


def _spd_solver(system: Tensor, shift: float) -> tuple[Callable[[Tensor], Tensor], str]:
    """Solver for the SPD ``system = K + shift·I`` stored as its lower block triangle.

    Cholesky in the precision of ``system``: a float32 Gram matrix is only float32-accurate, so
    factorizing it in float32 (twice as fast) loses nothing. If that breaks down (κ so small that
    cond·ε₃₂ ≳ 1) the factorization is redone in float64; if even that fails through rounding, an
    eigendecomposition with the spectrum clamped at ``shift`` (the exact matrix has no
    eigenvalue below it) is used. Only lower triangles are read. Solutions come back as float64.
    """
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return (lambda rhs: torch.cholesky_solve(rhs.to(chol.dtype), chol).double()), str(
            system.dtype
        ).removeprefix("torch.")
    if system.dtype != torch.float64:
        return _spd_solver(system.double(), shift)
    evals, evecs = torch.linalg.eigh(system)  # reads the lower triangle too
    evals = evals.clamp_min(shift)
    return (lambda rhs: evecs @ ((evecs.T @ rhs) / evals[:, None])), "float64-eigh"
