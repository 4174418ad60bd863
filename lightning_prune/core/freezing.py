"""Freezing all but part of a network, for local retraining after a prune, and thawing it again.

Which part trains is given by glob patterns (:func:`fnmatch.fnmatchcase` syntax) over qualified module
names, as :meth:`torch.nn.Module.named_modules` gives them. A parameter trains if *any* prefix of its
owning module's path matches *any* pattern: ``"classifier"`` and ``"classifier.*"`` both cover
``"classifier.1.weight"``, ``"fc1"`` covers ``"fc1.weight"`` and ``"fc1.bias"``, and ``"*"`` covers every
parameter, the root module's own included.

Freezing sets ``requires_grad=False``, so autograd builds no graph through a frozen prefix of the
network (``features`` before a trained ``classifier``) and backpropagation stops where training starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from lightning_prune.core.validation import preview

__all__ = ["Freezer", "trainable_parameters"]


def _check_patterns(model: nn.Module, train_only: Sequence[str]) -> list[str]:
    """Validate ``train_only`` against the model's module names and return it as a list."""
    if isinstance(train_only, str):
        raise TypeError(
            f"`train_only` must be a sequence of glob patterns over module names, got the string {train_only!r}. "
            f"Wrap it in a list: [{train_only!r}]."
        )
    patterns = list(train_only)
    if not patterns:
        raise ValueError("`train_only` is empty, which would leave no parameter trainable. Give at least one pattern.")
    names = list(dict.fromkeys(name for name, _ in model.named_modules(remove_duplicate=False)))
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"`train_only` must hold glob patterns (str), got {pattern!r} of type {type(pattern).__name__}."
            )
        if not any(fnmatchcase(name, pattern) for name in names):
            raise ValueError(
                f"Pattern {pattern!r} in `train_only` matches no module. Modules it could match: "
                f"{preview([n for n in names if n]) or 'none'}."
            )
    return patterns


def _covered(module_path: str, patterns: Sequence[str]) -> bool:
    """Whether any prefix of ``module_path`` (the root's ``""`` included) matches any pattern."""
    parts = module_path.split(".") if module_path else []
    prefixes = [".".join(parts[:i]) for i in range(len(parts) + 1)]
    return any(fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def _covered_ids(model: nn.Module, patterns: Sequence[str]) -> set[int]:
    """Identities of the parameters covered by the patterns through any of their names (tied weights)."""
    covered = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if _covered(name.rpartition(".")[0], patterns):
            covered.add(id(param))
    return covered


def _trainable(model: nn.Module, train_only: Sequence[str], also_trainable: set[int]) -> list[str]:
    """:func:`trainable_parameters`, counting the parameters in ``also_trainable`` as requiring grad."""
    patterns = _check_patterns(model, train_only)
    covered = _covered_ids(model, patterns)
    named = list(model.named_parameters())
    names = [n for n, p in named if id(p) in covered and (p.requires_grad or id(p) in also_trainable)]
    if not names:
        hits = [n for n, p in named if id(p) in covered]
        why = (
            f"they cover {len(hits)} parameter(s) ({preview(hits)}), none of which requires grad"
            if hits
            else "they cover no parameter (only parameter-free modules)"
        )
        raise ValueError(f"`train_only` patterns {patterns} leave no parameter trainable: {why}.")
    return names


def trainable_parameters(model: nn.Module, train_only: Sequence[str]) -> list[str]:
    """Qualified names of the parameters that train under ``train_only``, in the model's parameter order.

    A parameter trains if some prefix of its owning module's path matches some pattern and it requires
    grad (a parameter the user froze never trains). A parameter tied to several modules trains if any
    of its names is covered, and is listed under its first name.

    Args:
        model: The network.
        train_only: Glob patterns over module names.

    Returns:
        The names of the trained parameters.

    Raises:
        TypeError: If ``train_only`` is a single string rather than a sequence of them.
        ValueError: If a pattern matches no module, or the patterns leave no parameter trainable.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
        >>> trainable_parameters(net, ["2.1"])
        ['2.1.weight', '2.1.bias']
        >>> trainable_parameters(net, ["2"]) == trainable_parameters(net, ["2.*"])
        True
    """
    return _trainable(model, train_only, set())


class Freezer:
    """Freezes every parameter outside ``train_only`` (and the BatchNorm statistics there) until thawed.

    Only parameters that required grad are frozen, and exactly those are thawed, so parameters the user
    froze stay frozen. With ``freeze_bn_stats`` every BatchNorm module lying entirely in the frozen part
    (its path is not covered and none of its parameters trains) is put in eval mode, so its running
    statistics stop moving and it normalizes with them; :meth:`reapply` puts them back in eval mode after
    a framework calls ``model.train()``, and :meth:`thaw` restores the mode each had when frozen.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        >>> freezer = Freezer()
        >>> freezer.freeze(net, ["3"])
        >>> freezer.frozen, freezer.frozen_norms
        (['0.weight', '0.bias', '1.weight', '1.bias'], ['1'])
        >>> net[0].weight.requires_grad, net[1].training, net[3].weight.requires_grad
        (False, False, True)
        >>> _ = net.train()  # as a training framework would
        >>> freezer.reapply()
        >>> net[1].training
        False
        >>> freezer.thaw()
        >>> net[0].weight.requires_grad, net[1].training, freezer.frozen
        (True, True, [])
    """

    def __init__(self) -> None:
        self._frozen: list[tuple[str, nn.Parameter]] = []
        self._norms: list[tuple[str, nn.Module, bool]] = []

    @property
    def frozen(self) -> list[str]:
        """Names of the parameters this freezer set to ``requires_grad=False``, in the model's order."""
        return [name for name, _ in self._frozen]

    @property
    def frozen_norms(self) -> list[str]:
        """Names of the BatchNorm modules this freezer holds in eval mode."""
        return [name for name, _, _ in self._norms]

    def freeze(self, model: nn.Module, train_only: Sequence[str], *, freeze_bn_stats: bool = True) -> None:
        """Freeze every parameter of ``model`` outside ``train_only``, thawing any earlier freeze first.

        Nothing is changed if ``train_only`` is rejected.

        Args:
            model: The network.
            train_only: Glob patterns over module names; see :func:`trainable_parameters`.
            freeze_bn_stats: Also put the BatchNorm modules of the frozen part in eval mode.

        Raises:
            TypeError: If ``train_only`` is a single string.
            ValueError: If a pattern matches no module, the patterns leave no parameter trainable, or a
                parameter to freeze is not initialized yet (a lazy module before its first forward pass).
        """
        # Validate as if thawed (parameters frozen by this freezer count as trainable) before changing anything.
        thawed = {id(p) for _, p in self._frozen}
        trained = set(_trainable(model, train_only, thawed))
        named = list(model.named_parameters())
        to_freeze = [(n, p) for n, p in named if n not in trained and (p.requires_grad or id(p) in thawed)]
        lazy = [n for n, p in to_freeze if is_lazy(p)]
        if lazy:
            raise ValueError(
                f"Parameter(s) {preview(lazy)} to be frozen are not initialized yet (lazy modules). Run a forward "
                f"pass before freezing."
            )
        self.thaw()
        trained_ids = {id(p) for n, p in named if n in trained}
        for name, param in to_freeze:
            param.requires_grad_(False)
            self._frozen.append((name, param))
        if not freeze_bn_stats:
            return
        patterns = list(train_only)
        covered_norms = {id(m) for n, m in model.named_modules(remove_duplicate=False) if _covered(n, patterns)}
        for name, module in model.named_modules():
            if not isinstance(module, _BatchNorm) or id(module) in covered_norms:
                continue
            if any(id(p) in trained_ids for p in module.parameters()):
                continue
            self._norms.append((name, module, module.training))
            module.train(False)

    def reapply(self) -> None:
        """Put the frozen part's BatchNorm modules back in eval mode (after ``model.train()``, say)."""
        for _, module, _ in self._norms:
            module.train(False)

    def thaw(self) -> None:
        """Restore ``requires_grad`` of the frozen parameters and the modes of the frozen BatchNorm modules.

        Each BatchNorm module gets back the mode it had when frozen. Does nothing if nothing is frozen.
        """
        for _, param in self._frozen:
            param.requires_grad_(True)
        for _, module, was_training in self._norms:
            module.train(was_training)
        self._frozen = []
        self._norms = []
