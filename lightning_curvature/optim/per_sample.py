"""Per-sample gradients of arbitrary parameters through the model output, with ``torch.func``.

The fallback for parameters that are not in a factorable ``Linear``/``Conv2d`` layer (norm layers,
embeddings, custom modules, shared weights). Sample ``i``'s gradient with cotangent ``u`` on its
model output is the vector-Jacobian product ``J_iᵀu`` of the single-sample forward pass,
vectorized over samples with ``vmap`` and over several cotangents per sample (the true-Fisher
pseudo-samples) with a nested ``vmap`` of the ``vjp`` function.

The forward pass is re-run one sample at a time, so it must be a per-sample function: BatchNorm
in train mode couples the samples of a batch (per-sample gradients are then not defined), and
dropout in train mode draws new masks (run under ``torch.random.fork_rng``, so the global RNG
streams are left as they were). The module itself is never written: buffers are cloned.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ..curvature.params import ParameterLayout

__all__ = ["per_sample_vjps"]


def per_sample_vjps(
    model: nn.Module,
    layout: ParameterLayout,
    args: tuple,
    kwargs: dict,
    cotangents: Tensor,
) -> Tensor:
    """Per-sample gradients ``J_iᵀ u_{r,i}`` for the parameters in ``layout``.

    Parameters
    ----------
    model : nn.Module
        The model; called as ``model(*args, **kwargs)`` on one sample at a time.
    layout : ParameterLayout
        The parameters to differentiate (a sub-layout of the model).
    args, kwargs : tuple, dict
        The batched forward inputs. Tensor arguments whose leading size is the batch size are
        split by sample; everything else is passed unchanged to every sample.
    cotangents : Tensor
        ``(R, B, *output_shape)``: ``R`` cotangents on each sample's model output.

    Returns
    -------
    Tensor
        ``(R·B, layout.dim)`` with row ``r·B + i`` the gradient for cotangent ``r`` of sample ``i``.
    """
    r, b = cotangents.shape[:2]
    named = dict(model.named_parameters())
    theta = {n: named[n].detach() for n in layout.names}
    fixed = {n: p.detach() for n, p in named.items() if n not in theta}
    fixed.update({n: t.detach().clone() for n, t in model.named_buffers()})

    def batched(x: object) -> bool:
        return isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == b

    arg_dims = tuple(0 if batched(a) else None for a in args)

    def single_output(params: dict[str, Tensor], *sample_args: object) -> Tensor:
        one = tuple(
            a.unsqueeze(0) if d == 0 else a for a, d in zip(sample_args, arg_dims, strict=True)
        )
        out = functional_call(model, {**fixed, **params}, one, kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                "NGD's per-sample fallback needs a model whose forward returns one tensor, got "
                f"{type(out).__name__}"
            )
        return out.squeeze(0)

    def one_sample(cot: Tensor, *sample_args: object) -> dict[str, Tensor]:
        _, pullback = vjp(lambda p: single_output(p, *sample_args), theta)
        return vmap(pullback)(cot)[0]

    devices = [cotangents.device.index or 0] if cotangents.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        grads = vmap(one_sample, in_dims=(1, *arg_dims), randomness="different")(cotangents, *args)
    flat = layout.flatten(grads)  # (B, R, dim)
    return flat.transpose(0, 1).reshape(r * b, layout.dim)
