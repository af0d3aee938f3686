"""The loss contract, checked before training starts: a dry run on a few measurement samples.

Every measurement differentiates ``L(θ) = loss_fn(pl_module(inputs), targets)`` and assumes it is
the *mean* loss over the batch (``docs/architecture.md``, loss contract). Violations that
PyTorch would
only report at the end of the first measured epoch, as a raw error or, worse, as silently wrong
numbers, are refused here with a :class:`LossContractError` that names the contract and the fix:

- ``loss_fn`` is a class, not an instance (``loss_fn=nn.CrossEntropyLoss``);
- the loss is not a scalar (``reduction="none"``), not a tensor, not finite, or has a non-finite
  gradient although it is finite;
- the loss is a *sum* over the batch (``reduction="sum"``): detected by comparing the loss of a
  batch with the losses of its two halves. For a mean, ``L(B) = (n₁L(B₁) + n₂L(B₂))/n``; for a
  sum, ``L(B) = L(B₁) + L(B₂)``. A sum would scale every curvature by the measurement-batch size
  (a trace 64x too large) and break the LLC's ``nβ·L_n``;
- the model's output cannot be fed to the loss (a tuple where a tensor is expected).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curvature.curvature import BatchSet

__all__ = ["LossContractError", "check_loss_contract", "check_loss_fn_object"]

CONTRACT = "loss_fn(pl_module(inputs), targets) must return the scalar mean loss of the batch"


class LossContractError(ValueError):
    """The training loss does not meet the contract the measurements rely on."""


def check_loss_fn_object(loss_fn: Any, where: str) -> None:
    """Refuse a loss *class* or a non-callable where a loss function instance belongs."""
    if isinstance(loss_fn, type):
        raise LossContractError(
            f"{where}: `loss_fn` is the class {loss_fn.__name__}, not a loss function; "
            f"instantiate it: loss_fn={loss_fn.__name__}()"
        )
    if not callable(loss_fn):
        raise LossContractError(
            f"{where}: `loss_fn` must be callable as loss_fn(outputs, targets), "
            f"got {loss_fn!r} ({type(loss_fn).__name__})"
        )


def _evaluate(model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, where: str) -> Tensor:
    outputs = model(inputs)
    try:
        loss = loss_fn(outputs, targets)
    except Exception as err:
        shape = type(outputs).__name__ if not isinstance(outputs, Tensor) else tuple(outputs.shape)
        hint = (
            " The model returned a "
            f"{type(outputs).__name__}: return a tensor from forward(), or pass a loss_fn that "
            "takes what forward() returns (e.g. loss_fn=lambda out, y: ce(out[0], y))."
            if not isinstance(outputs, Tensor)
            else ""
        )
        raise LossContractError(
            f"{where}: calling loss_fn on the model's output ({shape}) failed with {err!r}. "
            f"{CONTRACT}.{hint}"
        ) from err
    if not isinstance(loss, Tensor):
        raise LossContractError(
            f"{where}: loss_fn returned {type(loss).__name__}, not a tensor. {CONTRACT}."
        )
    if loss.numel() != 1:
        raise LossContractError(
            f"{where}: loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar "
            f"(reduction='none'?). {CONTRACT}: use the mean reduction, e.g. "
            "nn.CrossEntropyLoss() or loss_fn=lambda out, y: per_sample(out, y).mean()."
        )
    return loss.reshape(())


def _first_samples(data: BatchSet, count: int) -> tuple[Any, Any]:
    inputs, targets = data.batches[0]
    return inputs[:count], targets[:count]


def check_loss_contract(
    model: nn.Module,
    loss_fn: Callable,
    data: BatchSet,
    where: str,
    *,
    num_samples: int = 8,
) -> None:
    """Dry-run the loss on the first ``num_samples`` samples of ``data`` (see module docstring).

    Runs with gradients on and leaves no trace (no ``.grad`` written; the caller's guard
    restores mode and RNG streams).

    Raises
    ------
    LossContractError
        With the violated contract and the fix.
    """
    inputs, targets = _first_samples(data, num_samples)
    n = int(targets.shape[0]) if isinstance(targets, Tensor) and targets.dim() > 0 else 1
    params = [p for p in model.parameters() if p.requires_grad]
    loss = _evaluate(model, loss_fn, inputs, targets, where)
    value = float(loss.detach())
    if not torch.isfinite(loss.detach()):
        raise LossContractError(
            f"{where}: the loss of the first {n} measurement samples is {value} at the initial "
            "weights; the measurements need a finite loss"
        )
    if params and loss.requires_grad:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        bad = [g for g in grads if g is not None and not torch.isfinite(g).all()]
        if bad:
            raise LossContractError(
                f"{where}: the loss is finite ({value:.6g}) but its gradient has NaN or inf "
                "entries: the model or loss contains an operation whose derivative is not "
                "finite here (sqrt or log at 0, a norm of a zero vector, an overflow in "
                "backward). Curvature and SGLD would report this as an ill-conditioned "
                "eigensolver or diverged chains; fix the model or loss first"
            )
    if n >= 4:
        _check_mean_reduction(model, loss_fn, inputs, targets, value, n, where)


def _check_mean_reduction(
    model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, full: float, n: int, where: str
) -> None:
    half = n // 2
    with torch.no_grad():
        first = float(_evaluate(model, loss_fn, inputs[:half], targets[:half], where))
        second = float(_evaluate(model, loss_fn, inputs[half:], targets[half:], where))
    mean = (half * first + (n - half) * second) / n
    total = first + second
    scale = max(abs(full), abs(mean), abs(total), 1e-12)
    if abs(full - total) <= 1e-4 * scale and abs(full - mean) > 1e-3 * scale:
        raise LossContractError(
            f"{where}: loss_fn sums over the batch: on {n} samples it gave {full:.6g}, the sum of "
            f"its values on the two halves ({first:.6g} + {second:.6g}) instead of their "
            f"weighted mean {mean:.6g}. {CONTRACT}; a sum would scale every curvature by the "
            "batch size. Use reduction='mean' (e.g. nn.CrossEntropyLoss()) or divide by the "
            "batch size."
        )
