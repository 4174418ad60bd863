"""Sparse inference: ``nn.Linear`` layers with a CSR weight, for pruned models."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["SparseLinear", "to_sparse_linear"]


class SparseLinear(nn.Module):
    """Inference-only ``Linear`` with a CSR weight: ``y = x W^T + b`` through :func:`torch.sparse.addmm`.

    Args:
        weight: Dense ``(out, in)`` weight; its zeros are dropped.
        bias: Optional ``(out,)`` bias.

    Example::

        >>> w = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
        >>> SparseLinear(w, torch.tensor([0.5, 0.0]))(torch.tensor([[1.0, 3.0]]))
        tensor([[6.5000, 1.0000]])
    """

    weight: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            self.register_buffer("weight", weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to the last dimension of ``x``."""
        flat = x.reshape(-1, self.in_features).t()
        out: Tensor
        if self.bias is None:
            out = torch.sparse.mm(self.weight, flat)
        else:
            out = torch.sparse.addmm(self.bias.unsqueeze(1).expand(-1, flat.shape[1]), self.weight, flat)
        return out.t().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Sizes and the number of stored weights."""
        nnz = self.weight._nnz()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def to_sparse_linear(
    model: nn.Module, masks: Mapping[str, Tensor] | None = None, *, max_density: float = 0.5
) -> list[str]:
    """Replace pruned ``nn.Linear`` layers by :class:`SparseLinear`, in place, for inference.

    Args:
        model: The network.
        masks: ``{parameter_name: bool mask}``: the layers whose ``weight`` has a mask are converted
            (entries outside the mask dropped). ``None``: every ``nn.Linear`` whose share of nonzero
            weights is at most ``max_density``.
        max_density: Density limit when ``masks`` is ``None`` (sparse kernels lose to dense ones
            well below 50% density on most hardware).

    Returns:
        Names of the replaced layers.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> keep = torch.rand(3, 4) < 0.3
        >>> to_sparse_linear(net, {"0.weight": keep})
        ['0']
    """
    replace: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not name:
            continue
        key = f"{name}.weight"
        with torch.no_grad():
            weight = module.weight.detach()
            if masks is not None:
                if key not in masks:
                    continue
                weight = torch.where(masks[key].to(weight.device), weight, torch.zeros_like(weight))
            elif weight.count_nonzero() > max_density * weight.numel():
                continue
        replace[name] = SparseLinear(weight, module.bias)
    for name, layer in replace.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return list(replace)
