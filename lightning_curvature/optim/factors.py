"""Per-sample gradient algebra of ``nn.Linear`` / ``nn.Conv2d`` layers from their factors.

For one call of a linear layer ``z_t = W a_t + b`` at positions ``t = 1..T`` (``T = 1`` for a
``Linear`` on ``(B, in)`` inputs; the spatial positions of the unfolded input for ``Conv2d``), the
gradient of sample ``n``'s loss with respect to ``W`` is ``P_n = sum_t d_{n,t} a_{n,t}^T`` where
``d_{n,t} = dL_n/dz_t``. Everything NGD needs from the B×d (or BC×d) per-sample gradient matrix
``G`` can be written in the layer inputs ``a`` and output-gradients ``d``:

* Gram ``(G Gᵀ)_{nm} = <P_n, P_m> + <d̄_n, d̄_m>`` (bias). For ``T = 1`` this factorizes:
  ``(a_n·a_m + 1)(d_n·d_m)``, a Hadamard product of two B×B Grams and no per-sample gradient
  ever exists. For ``T > 1`` it is ``sum_{t,s}(a_{n,t}·a_{m,s} + 1)(d_{n,t}·d_{m,s})``; depending
  on which is cheaper we either form those position-pair Grams or the per-layer per-sample
  gradients ``P_n`` (``out × in`` numbers each; for convolutions this is smaller than the
  unfolded input that autograd already keeps).
* ``Gᵀc = sum_n c_n P_n = sum_{n,t} c_n d_{n,t} a_{n,t}ᵀ``: one weight-gradient-sized product.
* ``G r`` (``r`` a vector in parameter space): ``(G r)_n = sum_t d_{n,t}ᵀ (R a_{n,t} + r_b)``.

Pseudo-samples: the true Fisher of a softmax output uses ``R = C`` output-gradients per input, so
``d`` carries a leading axis ``R`` and the pseudo-sample index is ``n = r·B + i``; the inputs
``a`` are shared by the ``R`` pseudo-samples of input ``i``.

Reference: the Gram identity is the one used for per-example gradient norms by Goodfellow (2015),
"Efficient per-example gradient computations", arXiv:1510.01799, and by "ghost clipping"
(Li et al. 2022, arXiv:2110.05679) for the ``T > 1`` case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerFactors",
    "add_lower_block_gram",
    "is_factorable",
    "layer_inputs",
    "layer_output_grads",
]


def is_factorable(module: nn.Module) -> bool:
    """Whether ``module``'s per-sample gradients can be built from its inputs/output-gradients.

    Exactly ``nn.Linear`` and ``nn.Conv2d`` (not subclasses: they may bypass ``forward``, e.g.
    the output projection of ``nn.MultiheadAttention``); convolutions only with ``groups=1``,
    numeric padding and ``padding_mode='zeros'`` (what ``F.unfold`` reproduces).
    """
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return (
            module.groups == 1
            and not isinstance(module.padding, str)
            and module.padding_mode == "zeros"
        )
    return False


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """The layer input as ``(B, T, in)`` positions (unfolded patches for ``Conv2d``)."""
    if isinstance(module, nn.Conv2d):
        if x.dim() != 4:
            raise ValueError(
                f"NGD needs batched (B, C, H, W) inputs for Conv2d layers, got shape "
                f"{tuple(x.shape)}"
            )
        cols = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return cols.transpose(1, 2)
    if x.dim() < 2:
        raise ValueError(
            f"NGD needs batched inputs (B, ..., in) for Linear layers, got shape {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_output_grads(module: nn.Module, grad: Tensor, lead: int) -> Tensor:
    """Output-gradients as ``(*lead_dims, B, T, out)``; ``lead`` = number of axes before B."""
    if isinstance(module, nn.Conv2d):
        shape = grad.shape
        g = grad.reshape(*shape[: lead + 2], -1)  # (..., B, out, L)
        return g.transpose(-1, -2)
    shape = grad.shape
    return grad.reshape(*shape[: lead + 1], -1, shape[-1])


def add_lower_block_gram(out: Tensor, rows: Tensor, factor: Tensor | None = None) -> None:
    """``out += (X Xᵀ) ⊙ tile(factor)`` on the lower block triangle only, in place.

    ``rows`` is ``(R, B, k)`` (``X`` = its ``(R·B, k)`` reshape), ``factor`` an optional ``(B, B)``
    matrix multiplied elementwise into every ``B×B`` block. Blocks above the diagonal are left
    untouched: for the true Fisher (``R = C`` groups) this halves the dominant cost, and the
    Cholesky factorization reads only the lower triangle.
    """
    r, b = rows.shape[:2]
    for i in range(r):
        width = (i + 1) * b
        blk = rows[i] @ rows[: i + 1].reshape(width, -1).T
        target = out[i * b : width, :width]
        if factor is not None:
            # Fused Hadamard product and accumulation (one pass over the block).
            target.view(b, i + 1, b).addcmul_(
                blk.view(b, i + 1, b).to(out.dtype), factor[:, None, :].to(out.dtype)
            )
        else:
            target += blk.to(out.dtype)


@dataclass
class LayerFactors:
    """Inputs and output-gradients of one layer for one minibatch.

    Attributes
    ----------
    a : Tensor
        ``(B, T, in)`` layer inputs (``in = C_in·k_h·k_w`` for convolutions).
    d : Tensor
        ``(R, B, T, out)`` gradients of the *per-sample* losses with respect to the layer
        output (``R = 1`` for the empirical Fisher, ``R = C`` pseudo-samples for the true one).
    has_bias : bool
        Whether the layer's bias is one of the optimized parameters.
    """

    a: Tensor
    d: Tensor
    has_bias: bool

    @property
    def num_pseudo(self) -> int:
        return self.d.shape[0] * self.d.shape[1]

    def _use_pairs(self) -> bool:
        """Position-pair Gram if it is cheaper than per-sample layer gradients (T > 1 only)."""
        n, t, k, o = self.num_pseudo, self.a.shape[1], self.a.shape[2], self.d.shape[3]
        pair_cost = n * n * t * t * (k + o)
        mat_cost = n * t * o * k + n * n * o * k
        pair_memory = n * n * t * t
        return pair_cost < mat_cost and pair_memory <= 2**26

    def per_sample_weight_grads(self) -> Tensor:
        """``(R·B, out·in)``: per-sample weight gradients of this layer (T > 1 route only)."""
        p = torch.einsum("rbto,btk->rbok", self.d, self.a)
        return p.reshape(self.num_pseudo, -1)

    def gram(self) -> Tensor:
        """``(N, N)`` Gram matrix of this layer's per-sample gradients, ``N = R·B``."""
        r, b, t, o = self.d.shape
        n = r * b
        if t == 1:
            a = self.a[:, 0]
            ag = a @ a.T
            if self.has_bias:
                ag = ag + 1
            dd = self.d.reshape(n, o)
            dg = (dd @ dd.T).view(r, b, r, b)
            return (dg * ag[None, :, None, :]).reshape(n, n)
        if self._use_pairs():
            ag = torch.einsum("itk,jsk->ijts", self.a, self.a)
            if self.has_bias:
                ag = ag + 1
            dg = torch.einsum("rito,qjso->riqjts", self.d, self.d)
            return (dg * ag[None, :, None]).sum((-1, -2)).reshape(n, n)
        p = self.per_sample_weight_grads()
        k = p @ p.T
        if self.has_bias:
            db = self.d.sum(2).reshape(n, o)
            k = k + db @ db.T
        return k

    def add_gram_lower(self, out: Tensor) -> None:
        """Add this layer's Gram to the lower block triangle of ``out`` ``(N, N)``, in place.

        See :func:`add_lower_block_gram`. Falls back to the full Gram for the position-pair route.
        """
        r, b, t, o = self.d.shape
        if t > 1 and self._use_pairs():
            full = self.gram().to(out.dtype).view(r, b, r, b)
            for i in range(r):
                out[i * b : (i + 1) * b, : (i + 1) * b] += full[i, :, : i + 1].reshape(b, -1)
            return
        if t == 1:
            a = self.a[:, 0]
            ag = a @ a.T
            if self.has_bias:
                ag = ag + 1
            add_lower_block_gram(out, self.d.reshape(r, b, o), ag)
            return
        add_lower_block_gram(out, self.per_sample_weight_grads().view(r, b, -1))
        if self.has_bias:
            add_lower_block_gram(out, self.d.sum(2))

    def combine(self, coeffs: Tensor) -> tuple[Tensor, Tensor | None]:
        """``Gᵀc`` for each column of ``coeffs`` ``(N, J)``: weights ``(J, out, in)``, biases."""
        r, b, t, o = self.d.shape
        c = coeffs.to(self.d.dtype).reshape(r, b, -1)
        a = self.a.reshape(b * t, -1)
        if c.shape[-1] == 1:
            # The step direction (one column): one plain GEMM, as a weight gradient is formed
            # (a batched matmul over a transposed operand is about 2x slower on CPU).
            e = (self.d * c[:, :, None, :]).sum(0) if r > 1 else self.d[0] * c[0, :, None, :]
            e = e.reshape(b * t, o)
            w = (e.T @ a)[None]
            bias = e.sum(0)[None] if self.has_bias else None
            return w, bias
        # Contract the pseudo-sample axis first: it leaves a weight-gradient-sized product.
        e = torch.einsum("rbj,rbto->jbto", c, self.d).reshape(c.shape[-1], b * t, o)
        w = e.transpose(1, 2) @ a
        bias = e.sum(1) if self.has_bias else None
        return w, bias

    def apply(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``G r`` restricted to this layer, ``r = (weight (out, in), bias (out,))``: ``(N,)``."""
        ar = self.a @ weight.to(self.a.dtype).T  # (B, T, out)
        if self.has_bias and bias is not None:
            ar = ar + bias.to(self.a.dtype)
        return torch.einsum("rbto,bto->rb", self.d, ar).reshape(-1)
