"""Keeping pruned weights at zero through optimizer steps: gradients at the step, optimizer state, re-masks.

:class:`Enforcer` holds a reference to the pruner's masks and hooks the optimizers it is attached to.
No forward hook and no re-parametrization: the model's parameters stay ordinary tensors holding zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.core.masks import MaskPairs, mask_gradients, mask_weights, multiplier, zero_optimizer_state
from lightning_prune.core.sharding import local

__all__ = ["ZERO_PRESERVING", "Enforcer"]

ZERO_PRESERVING: frozenset[type[torch.optim.Optimizer]] = frozenset(
    {
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adagrad,
        torch.optim.Adadelta,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.RMSprop,
    }
)
"""Optimizers (exact types) whose step leaves a weight at exactly zero when its gradient and state are
zero, weight decay included: for them masked gradients and zeroed state keep pruned weights zero, and
no re-mask after the step is needed. Any other optimizer (subclasses included) gets the re-mask."""


class Enforcer:
    """Enforces a dict of masks (shared with its owner, updated in place) on attached optimizers.

    Args:
        masks: ``{parameter name: bool mask}``; the owner changes it and calls :meth:`invalidate`.
        parameter: ``parameter(name)`` gives the model's parameter of that name.

    Example::

        >>> net = nn.Linear(4, 2)
        >>> masks = {"weight": net.weight.abs() > 0.3}
        >>> enforcer = Enforcer(masks, net.get_parameter)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> enforcer.attach(opt)
        >>> enforcer.apply()
        >>> net(torch.randn(3, 4)).sum().backward(); opt.step()
        >>> bool((net.weight[~masks["weight"]] == 0).all())
        True
    """

    def __init__(self, masks: Mapping[str, Tensor], parameter: Callable[[str], nn.Parameter]):
        self.masks = masks
        self.parameter = parameter
        self._optimizers: dict[int, tuple[torch.optim.Optimizer, list[RemovableHandle]]] = {}
        self._pairs_cache: dict[int, MaskPairs] = {}
        self._sentinels: dict[int, list[tuple[int, ...]]] = {}
        self._masked_early: set[int] = set()

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The attached optimizers."""
        return [optimizer for optimizer, _ in self._optimizers.values()]

    def invalidate(self) -> None:
        """Forget the cached ``(parameter, multiplier)`` pairs: masks or parameters changed."""
        self._pairs_cache.clear()
        self._sentinels.clear()

    def pairs(self, optimizer: torch.optim.Optimizer | None = None) -> MaskPairs:
        """``(parameter, multiplier)`` of every mask with a pruned entry (of ``optimizer``'s parameters, if given)."""
        key = 0 if optimizer is None else id(optimizer)
        pairs = self._pairs_cache.get(key)
        if pairs is None:
            owned = None if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
            pairs = []
            for name, keep in self.masks.items():
                param = self.parameter(name)
                if (owned is None or id(param) in owned) and not bool(keep.all()):
                    pairs.append((param, multiplier(keep)))
            self._pairs_cache[key] = pairs
        return pairs

    def apply(self) -> None:
        """Zero the pruned weights."""
        mask_weights(self.pairs())

    def zero_state(self, names: list[str] | None = None) -> None:
        """Zero the attached optimizers' state of the pruned entries (of ``names`` only, if given)."""
        chosen: dict[Tensor, Tensor] = {
            self.parameter(n): self.masks[n] for n in (self.masks if names is None else names)
        }
        for optimizer in self.optimizers:
            zero_optimizer_state(optimizer, chosen)

    def mask_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the gradients of pruned weights now (only those ``optimizer`` holds, if given).

        An attached optimizer masks them at its step anyway; a driver calls this earlier where a
        computation before the step must not see them (the norm of gradient clipping). The step then
        only checks one pruned entry per parameter and masks again if one is no longer zero (a NaN
        clipping norm, or gradients rewritten in between), instead of a second pass over them.
        """
        mask_gradients(self.pairs(optimizer))
        if optimizer is not None and id(optimizer) in self._optimizers:
            self._masked_early.add(id(optimizer))

    def attach(self, optimizer: torch.optim.Optimizer, *, remask: Literal["auto", "always"] = "auto") -> None:
        """Enforce the masks on every step of ``optimizer``, and zero its state of pruned entries now.

        A step pre-hook masks the gradients at the last moment before the update: when the step is
        given a closure (as Lightning does), right after the closure returns, so after the backward
        pass and any gradient clipping inside it; otherwise at once. Masking writes exact zeros, so a
        NaN or inf gradient at a pruned entry leaves its weight and optimizer state at zero.

        A step post-hook re-masks the weights after each step when ``remask="always"``, or with
        ``"auto"`` for any optimizer not in :data:`ZERO_PRESERVING`. The optimizers in it leave a zero
        weight with a zero gradient and zero state exactly zero, so for them the re-mask would be a
        second pass over every pruned weight for nothing.

        Raises:
            ValueError: If ``remask`` is not ``"auto"`` or ``"always"``.
        """
        if remask not in ("auto", "always"):
            raise ValueError(f"`remask` must be 'auto' or 'always', got {remask!r}.")
        if id(optimizer) in self._optimizers:
            return
        handles = [optimizer.register_step_pre_hook(self._before_step)]
        if remask == "always" or type(optimizer) not in ZERO_PRESERVING:
            handles.append(optimizer.register_step_post_hook(lambda opt, *_: mask_weights(self.pairs(opt))))
        self._optimizers[id(optimizer)] = (optimizer, handles)
        zero_optimizer_state(optimizer, {self.parameter(n): k for n, k in self.masks.items()})

    def detach(self) -> None:
        """Remove the hooks of every attached optimizer."""
        for _, handles in self._optimizers.values():
            for handle in handles:
                handle.remove()
        self._optimizers.clear()
        self.invalidate()
        self._masked_early.clear()

    def still_masked(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether one pruned entry of each parameter's gradient is still exactly zero (one small check)."""
        pairs = self.pairs(optimizer)
        sentinels = self._sentinels.get(id(optimizer))
        if sentinels is None:
            sentinels = self._sentinels[id(optimizer)] = [tuple((mult == 0).nonzero()[0].tolist()) for _, mult in pairs]
        values = [local(p.grad)[i] for (p, _), i in zip(pairs, sentinels, strict=True) if p.grad is not None]
        return not values or not bool(torch.stack([v.to(values[0].device) for v in values]).ne(0).any())

    def _mask_at_step(self, optimizer: torch.optim.Optimizer) -> None:
        early = id(optimizer) in self._masked_early
        self._masked_early.discard(id(optimizer))
        if not (early and self.still_masked(optimizer)):
            mask_gradients(self.pairs(optimizer))

    def _before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:
            self._mask_at_step(optimizer)
            return None

        def masked_closure() -> Any:
            loss = closure()
            self._mask_at_step(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": masked_closure}
        return (args[0], masked_closure, *args[2:]), kwargs
