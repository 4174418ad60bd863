"""The magnitude pruner: selected parameters, their masks, the rules that set them, and enforcement.

It is pure PyTorch and owns no schedule: whoever drives it (the Lightning callback, or a plain
training loop) decides *when* to call :meth:`MagnitudePruner.prune`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.core import criteria
from lightning_prune.core.masks import (
    MaskPairs,
    check_mask,
    mask_gradients,
    mask_weights,
    multiplier,
    zero_optimizer_state,
)
from lightning_prune.core.report import LayerStats
from lightning_prune.core.selection import resolve_per_layer, select_parameters

Criterion = Literal["std", "fraction", "global"]
CRITERIA: tuple[str, ...] = ("std", "fraction", "global")
StdOf = Literal["dense", "surviving"]
STD_OF: tuple[str, ...] = ("dense", "surviving")


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


class PruningError(RuntimeError):
    """A prune that cannot be carried out (non-finite weights, a layer that would lose every connection)."""


def check_fraction(value: float, name: str) -> float:
    """Return ``value`` as a float if it lies in ``[0, 1]``, else raise naming ``name``.

    Example::

        >>> check_fraction(0.9, "amount")
        0.9
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")
    return float(value)


def check_quality(quality: float | Mapping[str, float]) -> None:
    """Raise if ``quality`` (a number or ``{pattern: number}``) holds a negative or non-finite value.

    Example::

        >>> check_quality({"conv*": 0.5, "*": 1.0})
    """
    values = quality.items() if isinstance(quality, Mapping) else [(None, quality)]
    for pattern, value in values:
        where = "`quality`" if pattern is None else f"`quality[{pattern!r}]`"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where} must be a finite number >= 0, got {value!r}.")


class MagnitudePruner:
    """Masks for a model's selected parameters, the rules that set them, and their enforcement.

    Masks are ``bool`` tensors keyed by qualified parameter name, on the parameter's device. The
    model itself is never re-parametrized: pruned weights are plain zeros in ordinary tensors, so its
    ``state_dict`` stays that of the unmodified module.

    Args:
        model: The network to prune.
        layers: Glob patterns over module names; ``None`` selects every Linear and Conv1d/2d/3d.
        include_bias: Also prune the selected layers' biases.

    Example::

        >>> net = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
        >>> pruner = MagnitudePruner(net)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> pruner.attach(opt)  # pruned weights stay zero on every step
        >>> stats = pruner.prune(criterion="fraction", amount=0.5)
        >>> [s.remaining for s in stats]
        [200, 20]
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *, include_bias: bool = False):
        self.model = model
        self.layer_of: dict[str, str] = select_parameters(model, layers, include_bias=include_bias)
        self.masks: dict[str, Tensor] = {}
        self.dense_std: dict[str, float] = {}
        self.thresholds: dict[str, float] = {}
        self.rules: dict[str, str] = {}
        self._optimizers: dict[int, tuple[torch.optim.Optimizer, list[RemovableHandle]]] = {}
        self._pairs_cache: dict[int, MaskPairs] = {}
        self._sentinels: dict[int, list[tuple[int, ...]]] = {}
        self._masked_early: set[int] = set()

    @property
    def layers(self) -> list[str]:
        """Names of the pruned layers, in module order."""
        return list(dict.fromkeys(self.layer_of.values()))

    def parameter(self, name: str) -> nn.Parameter:
        """The model's parameter called ``name``."""
        return self.model.get_parameter(name)

    def prune(
        self,
        criterion: Criterion = "std",
        *,
        quality: float | Mapping[str, float] = 1.0,
        amount: float | Mapping[str, float] | None = None,
        std_of: StdOf = "dense",
        min_remaining: float | None = None,
        layers: Sequence[str] | None = None,
    ) -> list[LayerStats]:
        """Compute new masks, then apply them to weights and to attached optimizers' state.

        Nothing is changed if any check fails.

        Args:
            criterion: ``"std"`` keeps ``|w| > quality * std(W)`` (Han et al.); ``"fraction"``
                prunes the smallest ``amount`` of each layer; ``"global"`` prunes the smallest
                ``amount`` of all selected weights together.
            quality: For ``"std"``: a number, or ``{pattern: number}`` per layer.
            amount: For ``"fraction"`` (number or ``{pattern: number}``) and ``"global"`` (number):
                target share pruned, counting connections pruned before.
            std_of: For ``"std"``: ``"dense"`` scales by the std of the weights as first pruned
                (cached, so a quality means the same cut in every round); ``"surviving"`` by the std
                of the weights alive now (the threshold climbs round after round).
            min_remaining: ``None`` raises :class:`PruningError` if a layer would lose every
                connection; a share in ``[0, 1]`` keeps at least that many (and one) of the largest.
            layers: Prune only these selected layers (glob patterns); ``None`` prunes all of them.

        Returns:
            Stats of every selected parameter after the prune.

        Raises:
            ValueError: On a bad argument.
            PruningError: On non-finite weights, or a layer that would be emptied.
        """
        names = self._names_for(layers)
        per_layer = self._per_layer_values(criterion, quality, amount, std_of, min_remaining, names)
        weights = {name: self.parameter(name) for name in names}
        for name, weight in weights.items():
            if not torch.isfinite(weight.detach()).all():
                raise PruningError(
                    f"Parameter {name!r} holds NaN or inf values; it cannot be pruned by magnitude. "
                    f"Check the training run for divergence before pruning."
                )
        new, thresholds, rules, stds = self._compute(criterion, per_layer, std_of, weights)
        for name, keep in new.items():
            if min_remaining is not None:
                new[name] = criteria.floor_mask(weights[name], keep, self.masks.get(name), min_remaining)
            elif not keep.any():
                raise PruningError(
                    f"Pruning would remove every connection of {name!r} (threshold {thresholds[name]:.4g}, largest "
                    f"|w| {float(weights[name].detach().abs().max()):.4g}, rule {rules[name]}). Lower the "
                    f"quality/amount of layer {self.layer_of[name]!r}, or set `min_remaining` to keep a floor."
                )
        self._commit(new, thresholds, rules, stds)
        return self.stats()

    def _names_for(self, layers: Sequence[str] | None) -> list[str]:
        if layers is None:
            return list(self.layer_of)
        chosen = select_parameters(self.model, layers, include_bias=True)
        outside = [layer for layer in dict.fromkeys(chosen.values()) if layer not in self.layers]
        if outside:
            raise ValueError(f"Layer {outside[0]!r} is not among the pruned layers: {self.layers}.")
        return [name for name in self.layer_of if name in chosen]

    def check(
        self,
        criterion: Criterion = "std",
        *,
        quality: float | Mapping[str, float] = 1.0,
        amount: float | Mapping[str, float] | None = None,
        std_of: StdOf = "dense",
        min_remaining: float | None = None,
        layers: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Validate :meth:`prune` arguments against this model without pruning.

        Returns:
            The quality (``"std"``) or amount per pruned parameter.

        Raises:
            ValueError: On a bad argument, naming it and the accepted values.
        """
        names = self._names_for(layers)
        return self._per_layer_values(criterion, quality, amount, std_of, min_remaining, names)

    def _per_layer_values(
        self,
        criterion: str,
        quality: float | Mapping[str, float],
        amount: float | Mapping[str, float] | None,
        std_of: str,
        min_remaining: float | None,
        names: list[str],
    ) -> dict[str, float]:
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}.")
        if std_of not in STD_OF:
            raise ValueError(f"`std_of` must be one of {STD_OF}, got {std_of!r}.")
        if min_remaining is not None:
            check_fraction(min_remaining, "min_remaining")
        layers = list(dict.fromkeys(self.layer_of[n] for n in names))
        if criterion == "std":
            check_quality(quality)
            values = resolve_per_layer(quality, layers, name="quality")
        else:
            for key, value in amount.items() if isinstance(amount, Mapping) else [("", amount)]:
                if value is not None:
                    check_fraction(value, f"amount[{key!r}]" if key else "amount")
            if amount is None:
                raise ValueError(f"criterion={criterion!r} needs `amount`, the share of weights to prune in [0, 1].")
            if criterion == "global" and isinstance(amount, Mapping):
                raise ValueError("criterion='global' takes one `amount` for all layers, not a mapping.")
            values = resolve_per_layer(amount, layers, name="amount")
        return {name: values[self.layer_of[name]] for name in names}

    def _compute(
        self, criterion: str, per_name: dict[str, float], std_of: str, weights: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str], dict[str, float]]:
        keeps = {name: self.masks[name] for name in weights if name in self.masks}
        if criterion == "global":
            amount = next(iter(per_name.values()))
            new, threshold = criteria.global_masks(weights, amount, keeps)
            rule = f"{100 * amount:.1f}% global"
            return new, dict.fromkeys(new, threshold), dict.fromkeys(new, rule), {}
        new, thresholds, rules, stds = {}, {}, {}, {}
        for name, weight in weights.items():
            keep, value = keeps.get(name), per_name[name]
            if criterion == "fraction":
                new[name], thresholds[name] = criteria.fraction_mask(weight, value, keep)
                rules[name] = f"{100 * value:.1f}% of layer"
                continue
            if std_of == "dense":
                stds[name] = self.dense_std.get(name, criteria.surviving_std(weight))
            else:
                stds[name] = criteria.surviving_std(weight, keep)
            new[name], thresholds[name] = criteria.std_mask(weight, value, stds[name], keep)
            rules[name] = f"{value:.2f} x std" + ("" if std_of == "dense" else " (surviving)")
        return new, thresholds, rules, stds

    def _commit(
        self, new: dict[str, Tensor], thresholds: dict[str, float], rules: dict[str, str], stds: dict[str, float]
    ) -> None:
        for name, keep in new.items():
            self.dense_std.setdefault(name, stds.get(name, criteria.surviving_std(self.parameter(name))))
            if name in self.masks:
                self.masks[name].logical_and_(keep)
            else:
                self.masks[name] = keep.clone()
        self.thresholds.update(thresholds)
        self.rules.update(rules)
        self._pairs_cache.clear()
        self._sentinels.clear()
        self.apply()
        changed = {self.parameter(name): self.masks[name] for name in new}
        for optimizer, _ in self._optimizers.values():
            zero_optimizer_state(optimizer, changed)

    def _pairs(self, optimizer: torch.optim.Optimizer | None = None) -> MaskPairs:
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

    def refresh(self) -> None:
        """Move the masks to their parameters' devices (after the model moved) and rebuild the caches."""
        for name, keep in self.masks.items():
            device = self.parameter(name).device
            if keep.device != device:
                self.masks[name] = keep.to(device)
        self._pairs_cache.clear()
        self._sentinels.clear()

    def apply(self) -> None:
        """Zero the pruned weights (of every optimizer's parameters)."""
        mask_weights(self._pairs())

    def mask_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the gradients of pruned weights (only those ``optimizer`` holds, if given).

        An attached optimizer masks them at its step anyway; a driver calls this earlier where a
        computation before the step must not see them (the norm of gradient clipping). The step then
        only checks one pruned entry per parameter and masks again if one is no longer zero (a NaN
        clipping norm, or gradients rewritten in between), instead of a second pass over them.
        """
        mask_gradients(self._pairs(optimizer))
        if optimizer is not None and id(optimizer) in self._optimizers:
            self._masked_early.add(id(optimizer))

    def _still_masked(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether one pruned entry of each parameter's gradient is still exactly zero."""
        pairs = self._pairs(optimizer)
        sentinels = self._sentinels.get(id(optimizer))
        if sentinels is None:
            sentinels = self._sentinels[id(optimizer)] = [tuple((mult == 0).nonzero()[0].tolist()) for _, mult in pairs]
        values = [p.grad[i] for (p, _), i in zip(pairs, sentinels, strict=True) if p.grad is not None]
        return not values or not bool(torch.stack([v.to(values[0].device) for v in values]).ne(0).any())

    def _mask_at_step(self, optimizer: torch.optim.Optimizer) -> None:
        early = id(optimizer) in self._masked_early
        self._masked_early.discard(id(optimizer))
        if not (early and self._still_masked(optimizer)):
            mask_gradients(self._pairs(optimizer))

    def attach(self, optimizer: torch.optim.Optimizer, *, remask: Literal["auto", "always"] = "auto") -> None:
        """Enforce the masks on every step of ``optimizer``; zero its state of pruned entries now and on prune.

        A step pre-hook masks the gradients at the last moment before the update: when the step is
        given a closure (as Lightning does), right after the closure returns, so after the backward
        pass and any gradient clipping inside it; otherwise at once. Masking writes exact zeros, so a
        NaN or inf gradient at a pruned entry leaves its weight and optimizer state at zero.

        A step post-hook re-masks the weights after each step when ``remask="always"``, or with
        ``"auto"`` for any optimizer not in :data:`ZERO_PRESERVING`. The optimizers in it leave a zero
        weight with a zero gradient and zero state exactly zero, so for them the re-mask would be a
        second pass over every pruned weight for nothing.

        Example::

            >>> net = nn.Linear(8, 2)
            >>> opt = torch.optim.Adam(net.parameters(), weight_decay=0.1)
            >>> pruner = MagnitudePruner(net)
            >>> pruner.attach(opt)
            >>> _ = pruner.prune("fraction", amount=0.5)
            >>> net(torch.randn(4, 8)).sum().backward()
            >>> opt.step()
            >>> net.weight.grad.count_nonzero().item(), net.weight.count_nonzero().item()
            (8, 8)
        """
        if remask not in ("auto", "always"):
            raise ValueError(f"`remask` must be 'auto' or 'always', got {remask!r}.")
        if id(optimizer) in self._optimizers:
            return
        handles = [optimizer.register_step_pre_hook(self._before_step)]
        if remask == "always" or type(optimizer) not in ZERO_PRESERVING:
            handles.append(optimizer.register_step_post_hook(lambda opt, *_: mask_weights(self._pairs(opt))))
        self._optimizers[id(optimizer)] = (optimizer, handles)
        zero_optimizer_state(optimizer, {self.parameter(n): k for n, k in self.masks.items()})

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

    def detach(self) -> None:
        """Remove the hooks of every attached optimizer."""
        for _, handles in self._optimizers.values():
            for handle in handles:
                handle.remove()
        self._optimizers.clear()
        self._pairs_cache.clear()
        self._sentinels.clear()
        self._masked_early.clear()

    def stats(self) -> list[LayerStats]:
        """Per-parameter remaining counts, last thresholds and rules, in module order."""
        out = []
        for name in self.layer_of:
            param = self.parameter(name)
            keep = self.masks.get(name)
            out.append(
                LayerStats(
                    name=name,
                    shape=tuple(param.shape),
                    weights=param.numel(),
                    remaining=param.numel() if keep is None else int(keep.sum()),
                    threshold=self.thresholds.get(name),
                    rule=self.rules.get(name, ""),
                )
            )
        return out

    def sparsity(self) -> float:
        """Share of all selected weights that are pruned, in ``[0, 1]``."""
        stats = self.stats()
        total = sum(s.weights for s in stats)
        return 1.0 - sum(s.remaining for s in stats) / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Masks (``bool`` CPU tensors) and threshold statistics: plain values only, ``weights_only``-safe."""
        return {
            "masks": {name: keep.to("cpu", copy=True) for name, keep in self.masks.items()},
            "dense_std": dict(self.dense_std),
            "thresholds": dict(self.thresholds),
            "rules": dict(self.rules),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and statistics, check them against the model, and re-apply the masks.

        Raises:
            ValueError: If a mask names a parameter that is not selected here, is not a bool tensor of
                its parameter's shape, or is missing for a parameter the state records as pruned.
        """
        masks = state.get("masks", {})
        if not isinstance(masks, Mapping):
            raise ValueError(f"The saved masks must map parameter names to bool tensors, got {type(masks).__name__}.")
        recorded = [n for key in ("thresholds", "rules", "dense_std") for n in state.get(key, {}) if n not in masks]
        if recorded:
            raise ValueError(
                f"The saved state records a prune of {recorded[0]!r} but holds no mask for it; the checkpoint is "
                f"damaged or was edited."
            )
        for name, keep in masks.items():
            if name not in self.layer_of:
                raise ValueError(
                    f"The saved masks include {name!r}, which is not among the pruned parameters "
                    f"{list(self.layer_of)}. Was the checkpoint made with other `layers`?"
                )
            check_mask(name, keep, self.parameter(name).shape, "parameter")
        self.masks = {name: keep.to(self.parameter(name).device, copy=True) for name, keep in masks.items()}
        self.dense_std = dict(state.get("dense_std", {}))
        self.thresholds = dict(state.get("thresholds", {}))
        self.rules = dict(state.get("rules", {}))
        self._pairs_cache.clear()
        self._sentinels.clear()
        self.apply()
        for optimizer, _ in self._optimizers.values():
            zero_optimizer_state(optimizer, {self.parameter(n): k for n, k in self.masks.items()})
