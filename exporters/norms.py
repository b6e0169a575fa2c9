"""Last-dim LayerNorms written out in plain ops before lowering: the same function, in the form a backend handles.

* ``mean="linear"`` (``.pte``): ExecuTorch 1.5's XNNPACK partitioner has no config for ``native_layer_norm``, so
  each one ran on a portable kernel and cut the graph (MiniLM: 13 norms, 52 delegate blobs, 0.73 ms of 6.7 ms).
  Mean and variance are taken as a ``linear`` with a constant 1/C row (``mean.dim`` is only delegated for 4-D
  inputs, and the squeeze back is not). The quantizers only touch named ``nn.Linear`` layers, so these stay float.
* ``mean="reduce"`` (``.tflite``): ``mean(-1, keepdim=True)``. litert-torch lowers ``native_layer_norm`` so that the
  converter folds the norm's scale and shift into the weights and bias of every linear that reads the norm (the
  shift and scale stay in the graph only for the residual path). A linear's int8 per-channel weights then carry the
  norm's per-channel scale in their columns, and the quantizer sees those instead of the model's own: MiniLM
  ``tflite/int8-dynamic`` tracked PyTorch at mean cosine 0.9982 (min 0.9971) that way and 0.9990 (0.9985) written
  out, with 315 instead of 367 ops (2% faster). In this form the converter leaves the linears as they are.

The original module is untouched (other exporters share it): a copy is returned when any norm is rewritten.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import nn

Mean = Literal["linear", "reduce"]


def last_dim_norms(module: nn.Module) -> list[str]:
    """Names of the ``nn.LayerNorm``\\ s over the last dim only: the ones :func:`rewrite_layer_norms` writes out."""
    from torch import nn

    return [name for name, m in module.named_modules() if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1]


def rewrite_layer_norms(module: nn.Module, mean: Mean) -> tuple[nn.Module, int]:
    """A copy of ``module`` whose last-dim ``nn.LayerNorm``\\ s compute the same in plain ops; how many were
    rewritten (``module`` itself and 0 when it has none)."""
    import torch
    from torch import nn

    class _Norm(nn.Module):
        avg: torch.Tensor

        def __init__(self, ln: nn.LayerNorm) -> None:
            super().__init__()
            c = int(ln.normalized_shape[0])
            self.eps = float(ln.eps)
            self.weight = ln.weight
            self.bias = ln.bias
            self.linear = mean == "linear"
            if self.linear:
                self.register_buffer("avg", torch.full((1, c), 1.0 / c, dtype=torch.float32))

        def _mean(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.avg) if self.linear else x.mean(-1, keepdim=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            d = x - self._mean(x)
            y = d * torch.rsqrt(self._mean(d * d) + self.eps)
            if self.weight is not None:
                y = y * self.weight
            if self.bias is not None:
                y = y + self.bias
            return y

    targets = last_dim_norms(module)
    if not targets:
        return module, 0
    out = copy.deepcopy(module)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, _Norm(getattr(parent, child)))
    return out, len(targets)
