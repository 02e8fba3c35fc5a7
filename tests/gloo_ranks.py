"""One CPU rank of a gloo process group for tests that spawn ranks with torch.multiprocessing.

A rank process has now and then aborted (SIGABRT, "terminate called without an active exception")
after every check passed: gloo's C++ threads and TCP pairs outlive ``destroy_process_group`` and are
torn down in interpreter finalization while the peer closes its sockets (neollm.train's
``leave_without_finalizing`` says more). The trainer leaves a finished gloo run with ``os._exit(0)``;
this does the same for test ranks, so a test reports what it checks. Failures still raise and are
reported by ``mp.spawn``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gloo_rank(rank: int, world: int, init_file: str) -> Iterator[None]:
    """Join the group, run the body, wait for every rank, leave the group and exit the process
    without C++ teardown when the body passed."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()  # no collective may still be in flight when the group goes
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
