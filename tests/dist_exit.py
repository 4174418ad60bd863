"""How the multi-process test scripts end: every rank leaves together, and none runs interpreter teardown.

Gloo's worker threads can still hold work, and Python references with it, when the interpreter finalizes;
a thread destroyed then aborts the process ("terminate called without an active exception", exit code -6)
after a finished, correct run (pytorch/pytorch#190489). A barrier and ``destroy_process_group`` made it
rarer, not gone: it hit CI again on 2026-12-04 on rank 0 of a resumed ``ModelParallelStrategy`` fit.
The scripts write their results before calling this, so skipping finalization loses nothing.
"""

from __future__ import annotations

import os
import sys

import torch


def leave() -> None:
    """Wait for every rank, tear the process group down, flush, and exit with 0 at once (``os._exit``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
