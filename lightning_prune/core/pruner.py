"""The pruner: a model's selected parameters, their masks, the criterion that sets them, and their enforcement.

It is pure PyTorch and owns no schedule: whoever drives it (the Lightning callback, or a plain
training loop) decides *when* to call :meth:`Pruner.prune`, with which :class:`~lightning_prune.core.criteria.Criterion`
and level. The pruner makes every criterion's decision safe: intersected with the current mask (masks
only shrink), checked, floored by ``min_remaining``, never emptying a layer, and all or nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_prune.core.collective import Collective, count_true
from lightning_prune.core.criteria import Criterion, Decision, LevelSpec, PruneContext, checked_decisions, get_criterion
from lightning_prune.core.criteria.magnitude import surviving_std
from lightning_prune.core.dropout import layer_counts
from lightning_prune.core.enforcement import Enforcer
from lightning_prune.core.masks import check_mask
from lightning_prune.core.report import LayerStats
from lightning_prune.core.selection import Target, resolve_per_target, select_targets
from lightning_prune.core.sharding import any_true, collective_of, is_sharded, local, local_mask, local_rows
from lightning_prune.core.validation import check_fraction

__all__ = ["Pruner", "PruningError"]


class PruningError(RuntimeError):
    """A prune that cannot be carried out (non-finite weights, a layer that would lose every connection)."""


class Pruner:
    """Masks for a model's selected parameters, the criterion that sets them, and their enforcement.

    What is judged are *targets* (:func:`~lightning_prune.core.selection.select_targets`): a weight, the
    q, k or v rows of an attention input projection, a parametrization's effective weight. Masks are
    ``bool`` tensors keyed by the qualified name of the parameter they keep at zero, on its device; the
    statistics (dense std, threshold, rule) are kept per target. The model itself is never
    re-parametrized: pruned weights are plain zeros in ordinary tensors, so its ``state_dict`` stays
    that of the unmodified module.

    Parameters sharded by FSDP2 (``DTensor``, rows split over processes) are pruned shard by shard:
    each mask is this process's shard of the whole mask, decided with statistics all-reduced over the
    shards (:mod:`lightning_prune.core.sharding`), so the masks are those one process would compute on
    the whole weights. Every process must then call :meth:`prune` and :meth:`set_masks` together.

    Args:
        model: The network to prune.
        layers: Glob patterns over module or parameter names; ``None``: every multiply-accumulate weight
            (Linear, Conv, ConvTranspose, attention projections, RNN weights).
        include_bias: Also prune the selected layers' biases.

    Example::

        >>> net = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
        >>> pruner = Pruner(net)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> pruner.attach(opt)  # pruned weights stay zero on every step
        >>> stats = pruner.prune("fraction", 0.5)
        >>> [s.remaining for s in stats]
        [200, 20]
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *, include_bias: bool = False):
        self.model = model
        self.targets: dict[str, Target] = {t.name: t for t in select_targets(model, layers, include_bias=include_bias)}
        self.layer_of: dict[str, str] = {t.param: t.layer for t in self.targets.values()}
        self._masks: dict[str, Tensor] = {}
        self.dense_std: dict[str, float] = {}
        self.thresholds: dict[str, float] = {}
        self.rules: dict[str, str] = {}
        self._alive: dict[str, int] = {}
        self.enforcer = Enforcer(self._masks, self.parameter)

    @property
    def masks(self) -> dict[str, Tensor]:
        """``{parameter name: bool mask}`` (``True`` = alive) of the parameters pruned so far.

        Assigning replaces them as :meth:`set_masks` does (checked, applied, enforced).
        """
        return self._masks

    @masks.setter
    def masks(self, masks: Mapping[str, Tensor]) -> None:
        self.set_masks(masks)

    @property
    def layers(self) -> list[str]:
        """Names of the pruned layers, in module order."""
        return list(dict.fromkeys(self.layer_of.values()))

    def parameter(self, name: str) -> nn.Parameter:
        """The model's parameter called ``name``."""
        return self.model.get_parameter(name)

    def selected(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of every parameter a mask keeps at zero, in module order."""
        return {name: self.parameter(name) for name in self.layer_of}

    def prune(
        self,
        criterion: str | Criterion = "std",
        level: LevelSpec | str | None = None,
        *,
        min_remaining: float | None = None,
        layers: Sequence[str] | None = None,
    ) -> list[LayerStats]:
        """Compute new masks with ``criterion``, then apply them to weights and to attached optimizers' state.

        Nothing is changed if any check fails.

        Args:
            criterion: A :class:`~lightning_prune.core.criteria.Criterion`, or a registered name
                (``"std"``: Han's ``quality x std``; ``"fraction"``; ``"global"``).
            level: The level (quality, amount, ...): a number, ``{pattern: number}`` per layer, or a
                levels file; ``None``: the criterion's own.
            min_remaining: A share in ``[0, 1]``: each target keeps at least that many (and one) of its
                largest connections, widened the criterion's way (:meth:`Criterion.floor`: whole units
                for a structured criterion); ``None``: the criterion's floor, and with none a prune that
                would empty a target raises :class:`PruningError`.
            layers: Prune only these selected layers (glob patterns); ``None`` prunes all of them.

        Returns:
            Stats of every selected parameter after the prune.

        Raises:
            ValueError: On a bad argument, or a criterion's decision that is not a bool mask of the
                parameter's shape.
            PruningError: On non-finite weights, or a layer that would be emptied.
        """
        rule = get_criterion(criterion)
        levels = self.check(rule, level, min_remaining=min_remaining, layers=layers)
        floor = min_remaining if min_remaining is not None else rule.min_remaining
        collective = self._collective(rule, levels)
        weights = {name: self._weight(name) for name in levels}
        _check_finite(weights, collective)
        keeps = {name: self._keep(name) for name in weights}
        stds = {
            n: self.dense_std[n] if n in self.dense_std else surviving_std(w, None, collective)
            for n, w in weights.items()
        }
        context = PruneContext(stds, {n: self.targets[n].layer for n in weights}, collective)
        copies = {n: None if k is None else k.clone() for n, k in keeps.items()}  # the criterion cannot edit masks
        decisions = _checked(rule, rule.select(weights, copies, levels, context), weights, keeps)
        if floor is not None:
            decisions = _floored(rule, decisions, rule.floor(weights, copies, _keeps(decisions), floor, context))
            decisions = _checked(rule, decisions, weights, keeps)
        decisions = {name: self._norm_units_kept(name, d, weights[name], keeps[name]) for name, d in decisions.items()}
        new = {name: self._not_emptied(name, d, weights[name], collective) for name, d in decisions.items()}
        self._commit(new, decisions, stds, collective)
        return self.stats()

    def _collective(self, rule: Criterion, names: Collection[str]) -> Collective:
        """The processes whose shards make up the parameters of ``names``; refuses what cannot prune shards."""
        params = [self.parameter(self.targets[name].param) for name in names]
        collective = collective_of(params)
        if collective.world_size > 1 or any(is_sharded(p) for p in params):
            if not rule.shardable:
                raise ValueError(
                    f"Criterion {rule.describe()} cannot prune sharded (FSDP) parameters: it is not `shardable`. "
                    f"Use Std, Fraction or Global, whose thresholds are exact across shards."
                )
            refused = [name for name in names if self.targets[name].value is not None]
            if refused:
                raise ValueError(
                    f"Target {refused[0]!r} is a parametrization's weight, which cannot be pruned sharded (FSDP): "
                    f"remove the parametrization or leave the layer out with `layers`."
                )
        return collective

    def _weight(self, name: str) -> Tensor:
        """What the criterion judges for target ``name``: its tensor, or this process's rows of it if sharded."""
        target = self.targets[name]
        with torch.no_grad():
            param = self.parameter(target.param)
            if not is_sharded(param):
                return target.weight(self.model).detach()
            shard = local(param).detach()
            rows = local_rows(param, target.rows)
            return shard if rows is None else shard[rows[0] : rows[1]]

    def _rows(self, name: str) -> tuple[int, int] | None:
        """The rows of its parameter's (local) mask that target ``name`` owns; ``None``: all of them."""
        target = self.targets[name]
        return local_rows(self.parameter(target.param), target.rows)

    def check(
        self,
        criterion: str | Criterion = "std",
        level: LevelSpec | str | None = None,
        *,
        min_remaining: float | None = None,
        layers: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Validate :meth:`prune` arguments against this model without pruning.

        Returns:
            The level of every target that would be pruned.

        Raises:
            ValueError: On a bad argument, naming it and the accepted values.
        """
        rule = get_criterion(criterion)
        check_fraction(min_remaining, "min_remaining", optional=True)
        names = self._names_for(layers)
        with torch.no_grad():
            rule.check_weights(
                {name: self.targets[name].weight(self.model).detach() for name in names},
                {name: self.targets[name].layer for name in names},
            )
        spec = rule.level if level is None else rule.check_levels(level, rule.level_name)
        if spec is None:
            raise ValueError(
                f"Criterion {rule.describe()} has no `{rule.level_name}`: give it one, e.g. "
                f"{type(rule).__name__}({rule.level_name}=0.5), or give each round a `level`."
            )
        return resolve_per_target(spec, {name: self.targets[name].layer for name in names}, name=rule.level_name)

    def _names_for(self, layers: Sequence[str] | None) -> list[str]:
        if layers is None:
            return list(self.targets)
        chosen = {t.name: t.layer for t in select_targets(self.model, layers, include_bias=True)}
        outside = [layer for layer in dict.fromkeys(chosen.values()) if layer not in self.layers]
        if outside:
            raise ValueError(f"Layer {outside[0]!r} is not among the pruned layers: {self.layers}.")
        return [name for name in self.targets if name in chosen]

    def _keep(self, name: str) -> Tensor | None:
        """The current mask of target ``name`` (its rows of its parameter's mask), ``None`` if never pruned."""
        keep = self._masks.get(self.targets[name].param)
        rows = self._rows(name)
        if keep is None or rows is None:
            return keep
        return keep[rows[0] : rows[1]]

    def _norm_units_kept(self, name: str, decision: Decision, weight: Tensor, keep: Tensor | None) -> Decision:
        """``decision``, with the largest entry kept in each unit of a ``weight_norm`` it would empty.

        ``weight_norm`` divides each unit (a slice along its ``dim``) by its norm: an all-zero unit is
        0 / 0, NaN in the effective weight and in every output after it.
        """
        dim = _weight_norm_dim(self.model, self.targets[name])
        if dim is None:
            return decision
        units = decision.keep.movedim(dim, 0).flatten(1)
        emptied = ~units.any(1)
        if not emptied.any():
            return decision
        score = weight.detach().abs().movedim(dim, 0).flatten(1).clone()
        if keep is not None:
            score[~keep.movedim(dim, 0).flatten(1)] = -1.0
        units = units.clone()
        rows = emptied.nonzero()[:, 0]
        units[rows, score[rows].argmax(1)] = True
        shape = decision.keep.movedim(dim, 0).shape
        kept = units.reshape(shape).movedim(0, dim)
        return Decision(kept, decision.threshold, f"{decision.rule}; 1 kept in {len(rows)} weight-norm units")

    def _not_emptied(self, name: str, decision: Decision, weight: Tensor, collective: Collective) -> Tensor:
        if not count_true([decision.keep], collective):
            threshold = "none" if decision.threshold is None else f"{decision.threshold:.4g}"
            largest = collective.all_max(float(weight.detach().abs().max()) if weight.numel() else 0.0)
            raise PruningError(
                f"Pruning would remove every connection of {name!r} (threshold {threshold}, largest |w| "
                f"{largest:.4g}, rule {decision.rule}). Lower the level of layer "
                f"{self.targets[name].layer!r}, or set `min_remaining` to keep a floor."
            )
        return decision.keep

    def _commit(
        self, new: dict[str, Tensor], decisions: dict[str, Decision], stds: dict[str, float], collective: Collective
    ) -> None:
        for name, keep in new.items():
            target = self.targets[name]
            self.dense_std.setdefault(name, stds[name])
            if target.param not in self._masks:
                shard = local(self.parameter(target.param))
                self._masks[target.param] = torch.ones(shard.shape, dtype=torch.bool, device=shard.device)
            whole, rows = self._masks[target.param], self._rows(name)
            (whole if rows is None else whole[rows[0] : rows[1]]).logical_and_(keep)
            threshold = decisions[name].threshold
            if threshold is not None:
                self.thresholds[name] = threshold
            self.rules[name] = decisions[name].rule
        self._count_alive(collective)
        self.enforcer.invalidate()
        self.enforcer.apply()
        self.enforcer.zero_state(list(dict.fromkeys(self.targets[name].param for name in new)))

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Replace the masks (e.g. by those of a shrunk model), checked against the parameters, and apply them.

        For a sharded parameter a mask is this process's shard, or the whole tensor's mask (from a full
        checkpoint), of which this process keeps its rows.

        Raises:
            ValueError: If a mask names a parameter that is not selected, or does not fit its shape.
        """
        for name in masks:
            if name not in self.layer_of:
                raise ValueError(
                    f"The masks include {name!r}, which is not among the pruned parameters {list(self.layer_of)}. "
                    f"Was the checkpoint made with other `layers`?"
                )
        chosen = {}
        for name, keep in masks.items():
            param = self.parameter(name)
            shard = local(param)
            keep = local_mask(keep, param) if isinstance(keep, Tensor) else keep
            check_mask(name, keep, shard.shape, "parameter" if shard is param else "parameter's local shard")
            chosen[name] = keep.to(shard.device, copy=True)
        self._masks.clear()
        self._masks.update(chosen)
        self._count_alive(collective_of(self.parameter(name) for name in chosen))
        self.refresh()
        self.enforcer.apply()
        self.enforcer.zero_state()

    def refresh(self) -> None:
        """Move the masks to their parameters' devices (after the model moved) and rebuild the caches."""
        for name, keep in self.masks.items():
            device = local(self.parameter(name)).device
            if keep.device != device:
                self.masks[name] = keep.to(device)
        self.enforcer.invalidate()

    def apply(self) -> None:
        """Zero the pruned weights."""
        self.enforcer.apply()

    def attach(self, optimizer: torch.optim.Optimizer, *, remask: Literal["auto", "always"] = "auto") -> None:
        """Keep pruned weights at zero on every step of ``optimizer`` (see :meth:`Enforcer.attach`).

        Example::

            >>> net = nn.Linear(8, 2)
            >>> opt = torch.optim.Adam(net.parameters(), weight_decay=0.1)
            >>> pruner = Pruner(net)
            >>> pruner.attach(opt)
            >>> _ = pruner.prune("fraction", 0.5)
            >>> net(torch.randn(4, 8)).sum().backward()
            >>> opt.step()
            >>> net.weight.grad.count_nonzero().item(), net.weight.count_nonzero().item()
            (8, 8)
        """
        self.enforcer.attach(optimizer, remask=remask)

    def detach(self) -> None:
        """Remove the hooks of every attached optimizer."""
        self.enforcer.detach()

    def mask_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the gradients of pruned weights now (see :meth:`Enforcer.mask_gradients`)."""
        self.enforcer.mask_gradients(optimizer)

    def stats(self) -> list[LayerStats]:
        """Per-target remaining counts, last thresholds and rules, in module order."""
        out = []
        for name, target in self.targets.items():
            param = self.parameter(target.param)
            shape = tuple(param.shape) if target.rows is None else (target.rows[1] - target.rows[0], *param.shape[1:])
            numel = 1
            for size in shape:
                numel *= size
            remaining = self._alive.get(name, numel) if self._keep(name) is not None else numel
            out.append(LayerStats(name, shape, numel, remaining, self.thresholds.get(name), self.rules.get(name, "")))
        return out

    def _count_alive(self, collective: Collective) -> None:
        """Count every target's surviving connections (over all shards: every process takes part)."""
        names = [name for name in self.targets if self._keep(name) is not None]
        local_counts = [int(self._keep(name).sum()) for name in names]  # type: ignore[union-attr]
        totals = collective.counts(local_counts).sum(0).tolist() if names else []
        self._alive = dict(zip(names, (int(t) for t in totals), strict=True))

    @property
    def sharded(self) -> bool:
        """Whether any selected parameter is sharded (FSDP2 ``DTensor``)."""
        return any(is_sharded(self.parameter(name)) for name in self.layer_of)

    def layer_counts(self) -> dict[str, tuple[int, int]]:
        """``{layer: (remaining, total)}`` connections of the weights pruned so far, over all shards.

        :func:`~lightning_prune.core.dropout.layer_counts` of the masks, with each parameter's counts taken
        from all of its shards (a target's counts are all-reduced when it is pruned).
        """
        return layer_counts(self._masks, self.layer_of, self.parameter_counts())

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """``{parameter: (remaining, total)}`` of the parameters pruned so far, over all shards.

        A parameter pruned as several targets (an attention block's q/k/v rows) sums them.

        Example::

            >>> pruner = Pruner(nn.Sequential(nn.Linear(4, 2)))
            >>> _ = pruner.prune("fraction", 0.5)
            >>> pruner.parameter_counts()
            {'0.weight': (4, 8)}
        """
        whole: dict[str, tuple[int, int]] = {}
        for stats, target in zip(self.stats(), self.targets.values(), strict=True):
            remaining, total = whole.get(target.param, (0, 0))
            whole[target.param] = (remaining + stats.remaining, total + stats.weights)
        return whole

    def counts(self) -> tuple[int, int]:
        """``(remaining, total)`` connections of the selected parameters."""
        stats = self.stats()
        return sum(s.remaining for s in stats), sum(s.weights for s in stats)

    def sparsity(self) -> float:
        """Share of all selected weights that are pruned, in ``[0, 1]``."""
        remaining, total = self.counts()
        return 1.0 - remaining / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Masks (``bool`` CPU tensors, local shards if sharded) and threshold statistics, ``weights_only``-safe."""
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
        recorded = [
            n for key in ("thresholds", "rules", "dense_std") for n in state.get(key, {}) if not self._masked(n, masks)
        ]
        if recorded:
            raise ValueError(
                f"The saved state records a prune of {recorded[0]!r} but holds no mask for it; the checkpoint is "
                f"damaged or was edited."
            )
        self.set_masks(masks)
        self.dense_std = dict(state.get("dense_std", {}))
        self.thresholds = dict(state.get("thresholds", {}))
        self.rules = dict(state.get("rules", {}))

    def _masked(self, name: str, masks: Mapping[str, Any]) -> bool:
        """Whether statistics recorded under ``name`` (a target, or a parameter in old states) have a mask."""
        target = self.targets.get(name)
        return (target.param if target is not None else name) in masks


def _check_finite(weights: Mapping[str, Tensor], collective: Collective) -> None:
    for name, weight in weights.items():
        if any_true(not bool(torch.isfinite(weight.detach()).all()), collective):
            raise PruningError(
                f"Parameter {name!r} holds NaN or inf values; it cannot be pruned by magnitude. "
                f"Check the training run for divergence before pruning."
            )


def _weight_norm_dim(model: nn.Module, target: Target) -> int | None:
    """The dimension of a ``weight_norm``-ed target's units; ``None`` if it has none (or one norm over all)."""
    if target.value is None or target.rows is not None:
        return None
    owner, _, attr = target.value.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    (parametrization,) = cast(Any, module.parametrizations)[attr]
    dim = getattr(parametrization, "dim", None) if type(parametrization).__name__ == "_WeightNorm" else None
    weight = model.get_parameter(target.param)
    return None if dim is None or dim == -1 or weight.dim() < 2 else dim % weight.dim()


def _keeps(decisions: Mapping[str, Decision]) -> dict[str, Tensor]:
    return {name: decision.keep for name, decision in decisions.items()}


def _floored(rule: Criterion, decisions: Mapping[str, Decision], widened: Any) -> dict[str, Decision]:
    """The decisions with the masks ``rule.floor`` widened them to (checked by the caller)."""
    if not isinstance(widened, Mapping) or set(widened) != set(decisions):
        got = sorted(widened) if isinstance(widened, Mapping) else type(widened).__name__
        raise ValueError(
            f"Criterion {rule.describe()}.floor must return a mask for each of {sorted(decisions)}, got {got}."
        )
    return {name: Decision(widened[name], d.threshold, d.rule) for name, d in decisions.items()}


def _checked(
    rule: Criterion, decisions: Any, weights: Mapping[str, Tensor], keeps: Mapping[str, Any]
) -> dict[str, Decision]:
    """The criterion's decisions, checked (:func:`checked_decisions`) and intersected with the current masks."""
    out = {}
    for name, decision in checked_decisions(rule, decisions, weights).items():
        keep = decision.keep if keeps[name] is None else decision.keep & keeps[name]
        out[name] = Decision(keep, decision.threshold, decision.rule)
    return out
