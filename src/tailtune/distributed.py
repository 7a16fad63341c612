"""Multi-process training: which process writes, and ``tailtune run --processes N``.

The distributed work itself is the transformers Trainer's DDP support (through accelerate):
it shards the training batches, averages gradients across processes and gathers evaluation
outputs. This module only sets up accelerate's process state the way the Trainer will (gloo
on CPU, NCCL on GPU) so tailtune can ask "am I the process that writes?" before the Trainer
exists, and relaunches a command line under torchrun.

Launched by ``torchrun`` / ``accelerate launch`` (or ``--processes``), every process runs the
same ``tailtune run``; the output folder must be on a filesystem all of them see (always true
on one machine), because every process resumes from the same checkpoints.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from tailtune.errors import TailtuneError

# Seconds a process waits at a barrier or collective before giving up: the Trainer's default
# (TrainingArguments.ddp_timeout), which it cannot apply when tailtune joined the group first.
TIMEOUT_S = 1800


def state():
    """accelerate's ``PartialState`` of this process (one process when not launched).

    The first call joins the process group that torchrun / accelerate launch describe in the
    environment; ``cpu`` must match the Trainer's ``use_cpu``, or a CPU-only worker would see a
    single process and the Trainer, sharing the state, would not train in parallel.
    """
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=TIMEOUT_S))


def is_main() -> bool:
    """True in the process that writes files (rank 0), and in a process that was not launched."""
    return state().is_main_process


# torchrun, whose failure report (a traceback and a table per rank) would follow the workers'
# own one-line error: a failed worker's exit code is the launcher's, and the report is dropped.
TORCHRUN = """
import logging, sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run
logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
try:
    run(get_args_parser().parse_args(sys.argv[1:]))
except ChildFailedError as exc:
    code = exc.get_first_failure()[1].exitcode
    sys.exit(code if code > 0 else 128 - code)  # a signal: 128 + its number, as a shell reports it
"""


def relaunch(processes: int) -> int | None:
    """Run this command line again in ``processes`` processes on this machine, under torchrun.

    Returns their exit code, or None when this process should just go on: one process was
    asked for, or this process already is one of the workers (torchrun sets ``WORLD_SIZE``).
    Each worker gets an even share of the CPU threads unless ``OMP_NUM_THREADS`` is set.
    """
    if processes < 1:
        raise TailtuneError(f"--processes must be 1 or more, got {processes}")
    world = os.environ.get("WORLD_SIZE")
    if world is not None:
        if processes > 1 and int(world) != processes:
            raise TailtuneError(f"--processes {processes}, but this was launched with {world} processes")
        return None
    if processes == 1:
        return None
    import torch

    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise TailtuneError(
            f"--processes {processes}, but this machine has {torch.cuda.device_count()} GPUs (one process each)"
        )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    env["TAILTUNE_WORKER"] = "1"  # the launcher, not a worker, sets the exit status (no torchrun error report)
    # --standalone: a rendezvous on a free local port, so two runs on one machine don't collide.
    # --log-dir: torchrun otherwise leaves an empty torchelastic_* folder in the temp dir per run.
    with tempfile.TemporaryDirectory(prefix="tailtune-torchrun-") as logs:
        command = [
            sys.executable,
            "-c",
            TORCHRUN,
            "--standalone",
            f"--nproc-per-node={processes}",
            f"--log-dir={logs}",
            "-m",
            "tailtune.cli",
            *sys.argv[1:],
        ]
        return subprocess.call(command, env=env)
