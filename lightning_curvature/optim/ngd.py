"""Natural-gradient descent with trace-scaled damping, solved exactly in the sample space.

Update (``docs/ngd.md``)::

    θ ← (1 − lr·wd)·θ − lr·m,     m ← μ·m + Δ,     Δ = (F + κI)⁻¹ g,
    κ = α · max(tr F, ε) / d        (damping="per_parameter", the default: seed 002's formula)
    κ = α · max(tr F, ε) / N        (damping="per_sample": α × the mean nonzero eigenvalue)

with ``g`` the minibatch gradient, ``d`` the number of optimized parameters and
``F = (1/B) Gᵀ G`` the minibatch Fisher, ``G`` the N×d matrix of (pseudo-)sample gradients.
F has at most N nonzero eigenvalues, so for N ≪ d the per-parameter κ is about α·N/d of their
mean and the step is nearly undamped; ``damping="per_sample"`` makes α the damping relative to
the curvature the step actually sees. ``rescale=True`` additionally rescales Δ to ‖g‖ (the
norm-preserving step of seed 002's online NGD).

The step is assembled from named pieces: :class:`.sample_space.SampleGradients` (G as layer
factors: Gram matrix, ``Gᵀc``, ``Gr``), :mod:`.solve` (span coefficients, κ, the SPD solve with
its float64 fallback, the Woodbury remainder) and :func:`.update.apply_update`.

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

from ..checks import ArgumentError, check_bool, check_choice, check_float
from ..curvature.params import ParameterLayout
from .factors import LayerFactors, is_factorable, layer_inputs, layer_output_grads
from .per_sample import per_sample_vjps
from .sample_space import SampleGradients, lower_block_quadratic_form
from .solve import (
    DAMPINGS,
    Solver,
    damping_kappa,
    empirical_span_coefficients,
    relative_norm,
    span_direction_parts,
    span_mismatch,
    spd_solver,
    true_span_coefficients,
    woodbury_remainder,
)
from .update import apply_update

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


def _is_distribution(q: Tensor, tol: float) -> bool:
    """Whether every row of ``q`` is a probability vector (up to ``tol``)."""
    low, off = torch.stack([q.min(), (q.sum(-1) - 1).abs().max()]).tolist()  # one sync
    return low >= -tol and off <= tol


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
        Damping scale α > 0 in ``κ = α·max(tr F, ε)/d`` (or ``/N``, see ``damping``). Large α →
        SGD with lr/κ.
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
    damping : {"per_parameter", "per_sample"}
        ``"per_parameter"`` (default, seed 002's formula as written): ``κ = α·max(tr F, ε)/d``,
        α times the mean of all d eigenvalues of F, i.e. about α·N/d of the mean *nonzero*
        eigenvalue: nearly undamped when N ≪ d. ``"per_sample"``: ``κ = α·max(tr F, ε)/N`` with
        N the number of pseudo-samples (B empirical, B·(C−1) true), α times the mean nonzero
        eigenvalue (the documented working setting, ``docs/ngd.md``).
    rescale : bool
        Rescale the direction Δ to the raw gradient's norm ‖g‖ before momentum (the
        norm-preserving step of seed 002's online NGD); ``stats["rescale"]`` is the factor.

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
        ``skipped``, ``rescale`` (the norm-preserving factor, 1 without ``rescale``),
        ``seconds`` (wall time of the solve and update, closure excluded).
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
        damping: str = "per_parameter",
        rescale: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentError(
                "`model` must be an nn.Module (NGD needs per-sample information from its "
                f"layers), got {type(model).__name__}"
            )
        defaults = {
            "lr": check_float("lr", lr, low=0.0, low_open=True),
            "alpha": check_float("alpha", alpha, low=0.0, low_open=True),
            "eps": check_float("eps", eps, low=0.0, low_open=True),
            "momentum": check_float("momentum", momentum, low=0.0, high=1.0, high_open=True),
            "weight_decay": check_float("weight_decay", weight_decay, low=0.0),
        }
        self.model = model
        self.fisher_type = check_choice("fisher_type", fisher_type, FISHER_TYPES)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.damping = check_choice("damping", damping, DAMPINGS)
        self.rescale = check_bool("rescale", rescale)
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

    def _skip(self, reason: str | None, **stats: float) -> None:
        """Leave weights and momentum untouched; warn unless there was nothing to do."""
        if reason is not None:
            warnings.warn(f"NGD: step skipped, {reason}; weights left unchanged", stacklevel=4)
        known = {"kappa": float("nan"), "fisher_trace": float("nan"), **stats}
        self.stats = _step_stats(update_norm=0.0, grad_residual=float("nan"), skipped=True, **known)

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
        """Gather → Gram → κ → span coefficients → solve → remainder → update."""
        group = self.param_groups[0]
        params: list[Tensor] = group["params"]
        if all(p.grad is None for p in params):  # e.g. Lightning skipped the batch
            self._skip(None)
            return
        if cap.root_calls > 1:
            raise RuntimeError(
                f"NGD: the model's forward ran {cap.root_calls} times during the step; it must "
                "run exactly once (per-sample information is taken from that call)"
            )
        grads = [p.grad for p in params if p.grad is not None]
        grad_sq = _sum_of_squares(grads)
        if cap.nonfinite_outputs:
            self._skip("the model's outputs are not finite")
            return
        if not math.isfinite(grad_sq):
            self._skip("the gradient is not finite")
            return
        batch, delta = self._validate_capture(cap)
        samples = self._sample_gradients(cap, batch, delta, grads[0].dtype, grads[0].device)
        gram = samples.gram_lower()
        fisher_trace = float(gram.diagonal().double().sum()) / batch
        kappa = damping_kappa(
            self.damping,
            group["alpha"],
            fisher_trace,
            group["eps"],
            self.layout.dim,
            samples.num_pseudo,
        )
        if not (math.isfinite(fisher_trace) and math.isfinite(kappa) and kappa > 0):
            self._skip("the Fisher is not finite", fisher_trace=fisher_trace)
            return
        v = self._span_coefficients(cap, delta, batch, samples.device)
        span_sq = lower_block_quadratic_form(gram, v, batch)
        gram.diagonal().add_(batch * kappa)
        solve, precision = spd_solver(gram, batch * kappa)
        del gram  # the solver holds the factor; the Gram is the step's largest temporary
        # One tensor per parameter: the step never forms the flat d-vector (unless a remainder).
        direction = span_direction_parts(samples, solve, v)
        direction, rel_residual = self._add_remainder(
            direction, samples, solve, v, params, grad_sq, span_sq, kappa
        )
        if not _all_finite(direction):
            self._skip(
                "the natural-gradient direction is not finite",
                kappa=kappa,
                fisher_trace=fisher_trace,
            )
            return
        scale = 1.0
        if self.rescale:
            # Seed 002's (Kaldi's) norm-preserving rescale: the step has the raw gradient's norm.
            dir_norm = math.sqrt(_sum_of_squares(direction))
            scale = math.sqrt(grad_sq) / dir_norm if dir_norm > 0 else 1.0
            direction = torch._foreach_mul(direction, scale)
        update_norm = apply_update(
            params,
            direction,
            [self.state[p] for p in params],
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
        )
        self.stats = _step_stats(
            kappa=kappa,
            fisher_trace=fisher_trace,
            update_norm=update_norm,
            grad_residual=rel_residual,
            num_pseudo_samples=samples.num_pseudo,
            batch_size=batch,
            solve_precision=precision,
            rescale=scale,
            skipped=False,
        )

    def _validate_capture(self, cap: _Capture) -> tuple[int, Tensor | None]:
        """The batch size and the checked output gradient, or an error naming what is missing."""
        if not cap.calls and cap.root_calls == 0:
            raise RuntimeError(
                "NGD: no forward pass of the model was recorded during the step (was the model "
                "given to NGD the one called in the closure?)"
            )
        batch = self._batch_size(cap)
        delta = self._check_output_grad(cap, batch)
        if self.fisher_type == "true" and cap.true_cotangents is None:
            raise ValueError(
                "NGD: fisher_type='true' needs the forward of the model given to NGD to run in "
                "the closure and return logits (e.g. pass the network, not a wrapper whose "
                "forward is not called)"
            )
        if self._fallback is not None and (cap.root_calls == 0 or cap.output is None):
            raise ValueError(
                "NGD: parameters outside Linear/Conv2d layers need the forward of the model "
                "given to NGD to run in the closure and return one output tensor"
            )
        return batch, delta

    def _sample_gradients(
        self,
        cap: _Capture,
        batch: int,
        delta: Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> SampleGradients:
        """``G`` of this step: layer factors from the hooks, ``torch.func`` rows for the rest."""
        true = self.fisher_type == "true"
        reps = cap.true_cotangents.shape[0] if true else 1
        factors = []
        for module, calls in cap.calls.items():
            w_slice, b_slice = self._layers[module]
            f = _layer_factors(module, calls, batch, reps, true=true, has_bias=b_slice is not None)
            factors.append((f, w_slice, b_slice))
        fallback, fallback_slices = None, []
        if self._fallback is not None:
            if true:
                cot = cap.true_cotangents
            elif delta is not None:
                cot = (delta * batch)[None]
            else:
                cot = torch.zeros_like(cap.output)[None]
            fallback = per_sample_vjps(self.model, self._fallback, cap.args, cap.kwargs, cot)
            slices = self.layout.slices()
            fallback_slices = [slices[nm] for nm in self._fallback.names]
        return SampleGradients(
            layout=self.layout,
            reps=reps,
            batch=batch,
            factors=factors,
            fallback=fallback,
            fallback_slices=fallback_slices,
            dtype=dtype,
            device=device,
        )

    def _span_coefficients(
        self, cap: _Capture, delta: Tensor | None, batch: int, device: torch.device
    ) -> Tensor:
        """``v`` (float64, N) with ``g = Gᵀv`` when ``.grad`` is the mean of the captured terms."""
        if self.fisher_type != "true":
            return empirical_span_coefficients(batch, torch.float64, device)
        if delta is None:
            raise RuntimeError("NGD: the output gradient was not captured")
        return true_span_coefficients(delta, cap.fisher_chol, cap.fisher_keep)

    def _add_remainder(
        self,
        direction: list[Tensor],
        samples: SampleGradients,
        solve: Solver,
        v: Tensor,
        params: list[Tensor],
        grad_sq: float,
        span_sq: float,
        kappa: float,
    ) -> tuple[list[Tensor], float]:
        """Add the Woodbury solve of ``r = g − Gᵀv`` if ``g`` is not in the span; ``(Δ, ‖r‖/‖g‖)``.

        ``Δ`` is given and returned per parameter. The norm identity ``‖g‖² = vᵀKv`` is free;
        only if it fails by more than ``1000·ε_dtype`` is the residual formed explicitly (one
        more ``Gᵀ`` product).
        """
        tol = 1e3 * torch.finfo(samples.dtype).eps
        mismatch = span_mismatch(grad_sq, span_sq)
        if mismatch <= tol:
            return direction, math.sqrt(mismatch)
        grad = self.layout.flatten(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        )
        residual = grad - samples.transpose_times(v[:, None])[0]
        rel_residual = relative_norm(residual, grad_sq)
        if rel_residual <= tol:
            return direction, rel_residual
        self._warn_once(
            "residual",
            f"NGD: the gradient differs from the mean of the captured per-sample gradients "
            f"(relative {rel_residual:.2e}): an explicit L2 term in the loss, gradient "
            "clipping, a non-mean reduction or parameters used outside their layers. The "
            "remainder is solved exactly but its out-of-span part is scaled by up to 1/kappa.",
        )
        full = self.layout.flatten(direction) + woodbury_remainder(samples, solve, residual, kappa)
        return list(self.layout.unflatten(full).values()), rel_residual


def _sum_of_squares(tensors: list[Tensor]) -> float:
    """``Σ_k ‖t_k‖²`` over a list of tensors, with one multi-tensor kernel and one sync."""
    if not tensors:
        return 0.0
    return float(torch.stack(torch._foreach_norm(tensors)).double().square().sum())


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether the entries of the tensors sum to a finite number (inf and NaN propagate).

    A sum (one cheap pass, one sync) rather than max-norms, which are ~20x slower on CPU.
    """
    if not tensors:
        return True
    return math.isfinite(float(torch.stack([t.sum() for t in tensors]).sum()))


def _step_stats(
    *,
    kappa: float,
    fisher_trace: float,
    update_norm: float,
    grad_residual: float,
    skipped: bool,
    num_pseudo_samples: int = 0,
    batch_size: int = 0,
    solve_precision: str = "none",
    rescale: float = 1.0,
) -> dict[str, float | int | bool | str]:
    """The one place where ``NGD.stats`` is written: every step, skipped or not, has all keys."""
    return {
        "kappa": kappa,
        "fisher_trace": fisher_trace,
        "update_norm": update_norm,
        "grad_residual": grad_residual,
        "num_pseudo_samples": num_pseudo_samples,
        "batch_size": batch_size,
        "solve_precision": solve_precision,
        "rescale": rescale,
        "skipped": skipped,
    }


def _layer_factors(
    module: nn.Module,
    calls: list[_LayerCall],
    batch: int,
    reps: int,
    *,
    true: bool,
    has_bias: bool,
) -> LayerFactors:
    """Inputs ``(B, T, in)`` and per-sample output-gradients ``(R, B, T, out)`` of one layer.

    Several calls of the same layer (weight reuse along the forward) are concatenated along the
    position axis T. A call whose output did not reach the loss contributes zero gradients.
    """
    a_parts, d_parts = [], []
    out_features = module.weight.shape[0]
    for c in calls:
        a = layer_inputs(module, c.x)
        a_parts.append(a)
        if c.d is None:  # output did not reach the loss
            d_parts.append(
                torch.zeros(reps, batch, a.shape[1], out_features, dtype=a.dtype, device=a.device)
            )
        elif true:
            d_parts.append(layer_output_grads(module, c.d, lead=1))
        else:  # mean loss: per-sample gradients are B × the captured output-gradients
            d_parts.append(layer_output_grads(module, c.d * batch, lead=0)[None])
    if len(calls) == 1:  # the usual case: no copy
        return LayerFactors(a_parts[0], d_parts[0], has_bias)
    return LayerFactors(torch.cat(a_parts, 1), torch.cat(d_parts, 2), has_bias)
