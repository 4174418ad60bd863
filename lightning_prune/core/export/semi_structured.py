"""2:4 semi-structured ``Linear`` layers for GPU inference, through :func:`torch.sparse.to_sparse_semi_structured`.

A model pruned with :class:`~lightning_prune.core.criteria.NM` (2:4) can run its ``Linear`` layers on
the sparse tensor cores of NVIDIA GPUs of compute capability 8.0 and later (A100, H100, RTX 30/40).
:func:`to_semi_structured` swaps each eligible layer's weight for a ``SparseSemiStructuredTensor``
(``module.weight = nn.Parameter(to_sparse_semi_structured(weight))``, as PyTorch's tutorial does): the
module stays an ``nn.Linear`` and ``F.linear`` dispatches to the sparse kernel. It is for inference
only (no gradients through the compressed weight).

A layer is eligible when everything PyTorch requires holds, and :func:`semi_structured_problems` says
which does not, on any machine (the conversion itself needs CUDA):

- it is an ``nn.Linear`` (not a subclass) whose weight is on a CUDA device of compute capability
  ``>= 8.0``;
- the weight is ``float16``, ``bfloat16`` or ``int8`` (``float32`` needs another pattern, 1:2, and only
  the CUTLASS backend: convert the model with ``model.half()`` first);
- its shape ``(out, in)`` is a multiple of the backend's block for the dtype (cuSPARSELt, the default
  backend: ``16 x 16`` for fp16/bf16, ``32 x 32`` for int8; CUTLASS: ``32 x 64`` and ``16 x 128``),
  and at least one block;
- the weight, its pruned entries zeroed, holds at most 2 non-zeros in every group of 4 consecutive
  inputs (:func:`~lightning_prune.core.criteria.nm_counts`): 2:4, which ``NM(n=2, m=4)`` guarantees.

The refusal names every layer and every reason. On a machine without CUDA, :func:`to_semi_structured`
raises at once. The speed-up is measured by ``benchmarks/semi_structured.py``, on a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import cast

import torch
from torch import Tensor, nn

from lightning_prune.core.criteria.nm import nm_counts

__all__ = ["SEMI_STRUCTURED_DTYPES", "SemiStructuredReport", "semi_structured_problems", "to_semi_structured"]

SEMI_STRUCTURED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.int8)
"""Weight dtypes whose semi-structured pattern is 2:4."""

_BLOCKS = {  # (rows, cols) a sparse weight's shape must be a multiple of, by backend (torch 2.14's tables)
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128)},
}


@dataclass(frozen=True)
class SemiStructuredReport:
    """Outcome of :func:`to_semi_structured`.

    Attributes:
        converted: The layers whose weight is now semi-structured, in module order.
        refused: ``{layer: why}`` for the candidate layers left dense (only with ``strict=False``).
    """

    converted: list[str]
    refused: dict[str, str] = field(default_factory=dict)


def _backend() -> str:
    """The backend :func:`torch.sparse.to_sparse_semi_structured` uses: cuSPARSELt unless CUTLASS is forced."""
    return "cutlass" if getattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False) else "cusparselt"


def _block(dtype: torch.dtype) -> tuple[int, int]:
    """The backend's block for ``dtype`` (float16's if ``dtype`` is not a 2:4 one), from torch's own table."""
    backend = _backend()
    cls = getattr(torch.sparse, f"SparseSemiStructuredTensor{backend.upper()}", None)
    dtype = dtype if dtype in SEMI_STRUCTURED_DTYPES else torch.float16
    known = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if known is not None:
        return known.sparse_min_rows, known.sparse_min_cols
    return _BLOCKS[backend][dtype]


def _candidates(
    model: nn.Module, masks: Mapping[str, Tensor] | None, layers: Sequence[str] | None
) -> dict[str, nn.Linear]:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name}
    if layers is None:
        return {n: m for n, m in linears.items() if masks is None or f"{n}.weight" in masks}
    if isinstance(layers, str) or not layers:
        raise ValueError(f"`layers` must be None or a non-empty list of glob patterns, got {layers!r}.")
    chosen = {}
    for pattern in layers:
        hits = [n for n in linears if fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"Pattern {pattern!r} in `layers` matches no nn.Linear module; they are {list(linears)}.")
        chosen.update({n: linears[n] for n in hits})
    return {n: m for n, m in linears.items() if n in chosen}


def _effective(module: nn.Linear, keep: Tensor | None) -> Tensor:
    weight = module.weight.detach()
    return weight if keep is None else torch.where(keep.to(weight.device), weight, torch.zeros_like(weight))


def _problems(module: nn.Linear, keep: Tensor | None) -> list[str]:
    weight = module.weight
    found = []
    if type(module) is not nn.Linear:
        found.append(f"a {type(module).__name__}, not an nn.Linear")
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        return ["already semi-structured"]
    if not weight.is_cuda:
        found.append(f"on {weight.device.type}: needs a CUDA device")
    elif torch.cuda.get_device_capability(weight.device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(weight.device)
        found.append(f"GPU compute capability {major}.{minor}: sparse tensor cores need 8.0 or later")
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        dtype = str(weight.dtype).removeprefix("torch.")
        found.append(f"dtype {dtype}: needs float16, bfloat16 or int8 (model.half())")
    rows, cols = _block(weight.dtype)
    out, inp = weight.shape
    if out < rows or out % rows or inp < cols or inp % cols:
        found.append(f"shape ({out}, {inp}): both sides must be multiples of ({rows}, {cols}), at least one")
    if inp % 4 == 0:  # otherwise the shape is refused already
        counts = nm_counts(_effective(module, keep) != 0, 4)
        worst = int(counts.max()) if counts.numel() else 0
        if worst > 2:
            bad = int((counts > 2).sum())
            found.append(
                f"not 2:4: {bad} group(s) of 4 inputs hold more than 2 non-zeros (up to {worst}); prune with NM()"
            )
    return found


def semi_structured_problems(
    model: nn.Module, masks: Mapping[str, Tensor] | None = None, *, layers: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Per candidate ``Linear`` layer, why :func:`to_semi_structured` would leave it dense; changes nothing.

    Runs on any machine, so a CPU can tell what a layer still needs before the model goes to a GPU.

    Args:
        model: The network.
        masks: ``{parameter name: bool mask}``: entries outside a layer's mask count as zero, and with
            ``layers=None`` only the ``Linear`` layers whose ``weight`` has a mask are candidates.
            ``None``: the weights as they are, every ``Linear`` a candidate.
        layers: Glob patterns over module names choosing the candidates (``Linear`` modules only).

    Returns:
        ``{layer: [reasons]}`` for every candidate, in module order; an empty list: eligible.

    Raises:
        ValueError: If a pattern of ``layers`` matches no ``Linear`` module.

    Example::

        >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> for name, why in semi_structured_problems(net).items():
        ...     print(name, "|", "; ".join(why))  # doctest: +NORMALIZE_WHITESPACE
        0 | on cpu: needs a CUDA device; dtype float32: needs float16, bfloat16 or int8 (model.half());
            not 2:4: 512 group(s) of 4 inputs hold more than 2 non-zeros (up to 4); prune with NM()
        2 | on cpu: needs a CUDA device; dtype float32: needs float16, bfloat16 or int8 (model.half());
            shape (10, 32): both sides must be multiples of (16, 16), at least one;
            not 2:4: 80 group(s) of 4 inputs hold more than 2 non-zeros (up to 4); prune with NM()
    """
    with torch.no_grad():
        return {
            name: _problems(module, None if masks is None else masks.get(f"{name}.weight"))
            for name, module in _candidates(model, masks, layers).items()
        }


def to_semi_structured(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    layers: Sequence[str] | None = None,
    strict: bool = True,
) -> SemiStructuredReport:
    """Give eligible 2:4-pruned ``Linear`` layers a semi-structured sparse weight, in place, for GPU inference.

    Move and cast the model first (``model.cuda().half().eval()``). Each converted layer's weight
    becomes ``nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)``, its pruned
    entries zeroed first.

    Args:
        model: The network, on the GPU in fp16, bf16 or int8.
        masks: As in :func:`semi_structured_problems` (typically ``pruner.masks``).
        layers: As in :func:`semi_structured_problems`.
        strict: Refuse (``ValueError``, nothing converted) if any candidate is not eligible; ``False``:
            convert the eligible ones and report the others in ``refused``.

    Returns:
        The converted layers, and the refused ones with their reasons.

    Raises:
        RuntimeError: Without CUDA (``torch.cuda.is_available()`` is False): nothing is converted.
        ValueError: With ``strict=True``, naming every candidate that is not eligible and why; or
            when there is no candidate at all.

    Example::

        model = model.cuda().half().eval()
        report = to_semi_structured(model, pruner.masks)   # after NM(n=2, m=4) rounds
        report.converted                                    # ['fc1', 'fc2']
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured needs CUDA: torch.sparse.to_sparse_semi_structured runs on CUDA tensors only, and "
            "torch.cuda.is_available() is False here. Convert on the GPU that will serve the model, after "
            "model.cuda().half(); semi_structured_problems(model, masks) tells on any machine what a layer still needs."
        )
    problems = semi_structured_problems(model, masks, layers=layers)
    if not problems:
        raise ValueError("No candidate layer: the model has no nn.Linear module (with a mask, when masks are given).")
    refused = {name: "; ".join(why) for name, why in problems.items() if why}
    if strict and refused:
        lines = "\n".join(f"  {name}: {why}" for name, why in refused.items())
        raise ValueError(
            f"{len(refused)} of {len(problems)} candidate layer(s) cannot be semi-structured (nothing was converted; "
            f"strict=False converts the others):\n{lines}"
        )
    modules = dict(model.named_modules())
    sparse = {}
    for name in (n for n, why in problems.items() if not why):  # all compressed before any is swapped in
        keep = None if masks is None else masks.get(f"{name}.weight")
        with torch.no_grad():
            dense = _effective(cast(nn.Linear, modules[name]), keep).contiguous()
        try:
            sparse[name] = torch.sparse.to_sparse_semi_structured(dense)
        except (RuntimeError, NotImplementedError) as err:
            raise ValueError(f"Layer {name!r} could not be made semi-structured by PyTorch: {err}") from err
    for name, weight in sparse.items():
        modules[name].weight = nn.Parameter(weight, requires_grad=False)
    return SemiStructuredReport(list(sparse), {} if strict else refused)
