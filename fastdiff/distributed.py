"""Many processes, one sampling run: ranks, devices, the split of image indices, barriers and failures.

``torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m fastdiff sample ...``
starts one process per GPU (or per CPU worker). Each reads its rank from torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), takes ``cuda:LOCAL_RANK`` on CUDA, and draws its own share of the image
indices. Ranks never talk while sampling: image ``i`` depends only on ``(seed, i)``, so each rank knows its
share and writes its images itself. They meet only at stage boundaries (``Ranks.stage``): after rank 0 has
prepared the output folder, and at the end, where every rank reports success or its error. Communication is
a handful of small Python objects over gloo (CPU), whatever the device.

Failure: a rank whose stage raises drops a flag file into the output folder so the others stop at their next
batch, and every rank leaves the stage with that rank's error (``RankFailedError`` on the others), so the whole
run exits non-zero with it. Images are written atomically, so only complete images remain. A rank that dies
outright is torchrun's to handle: it stops the other workers (SIGTERM, which fastdiff turns into an orderly
exit that keeps only complete files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal

import torch

from .cli import RankFailedError  # noqa: F401 - raised here, reported by the CLI (exit status of the failed rank)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
ABORT_FLAG = ".fastdiff-abort"  # dropped into the output folder by a failing rank; the others stop early
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)  # the CLI's exit status 2


@dataclasses.dataclass
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    abort_flag: str | None = None  # set by the run: where a failing rank signals the others
    reports: dict = dataclasses.field(default_factory=dict)  # stage name -> every rank's report (see stage)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ devices and work
    def device_for(self, name: str) -> torch.device:
        """The device this rank samples on: ``--device`` as given, with CUDA mapped to ``cuda:LOCAL_RANK``
        under torchrun; a one-line ValueError when this rank has no such device."""
        from .devices import resolve_device

        where = f" (rank {self.rank})" if self.distributed else ""
        try:
            device = resolve_device(name)
        except ValueError as exc:
            raise ValueError(f"{exc}{where}") from None
        if device.type == "cuda" and self.distributed and str(name) in ("cuda", "auto"):
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise ValueError(f"--device {name}: rank {self.rank} has LOCAL_RANK {self.local_rank} but this "
                                 f"node has {count} CUDA GPUs; start at most {count} processes per node")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def owns(self, index: int, batch_size: int) -> bool:
        """Whether this rank draws image ``index``: batches of ``batch_size`` consecutive indices go to the
        ranks in turn (as NVlabs/edm's generate.py), so shares stay balanced and contiguous within a batch."""
        return (index // batch_size) % self.world_size == self.rank

    def my_indices(self, indices, batch_size: int) -> list[int]:
        return [i for i in indices if self.owns(i, batch_size)]

    # ------------------------------------------------------------------ meeting points
    def should_stop(self) -> bool:
        """Whether another rank has failed (checked between batches: a file test, no communication)."""
        return self.distributed and self.abort_flag is not None and os.path.exists(self.abort_flag)

    def gather(self, value) -> list:
        """Every rank's ``value`` (small, picklable), in rank order; also a barrier."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    @contextlib.contextmanager
    def stage(self, name: str, report=None):
        """Run the body on every rank, then meet: if any rank's body raised, every rank raises.

        The failing rank re-raises its own error; the others raise ``RankFailedError`` with its message.
        Single process: the body's error propagates unchanged. ``report`` (a dict, filled by the body) is
        gathered too and returned in ``self.reports[name]`` (one entry per rank).
        """
        error = None
        try:
            yield
        except BaseException as exc:
            if self.distributed and self.abort_flag is not None:
                with contextlib.suppress(OSError):
                    open(self.abort_flag, "a").close()
            if not self.distributed or not isinstance(exc, Exception):
                raise  # an interrupt (or SIGTERM from torchrun) exits at once: the others are being stopped too
            error = exc
        if not self.distributed:
            self.reports[name] = [report]
            return
        message = None
        if error is not None:
            text = str(error).strip().splitlines()
            message = (text[0] if text else type(error).__name__, 2 if isinstance(error, USER_ERRORS) else 1)
        everyone = self.gather((message, report))
        self.reports[name] = [r for _, r in everyone]
        failures = [(rank, m) for rank, (m, _) in enumerate(everyone) if m is not None]
        if failures and self.is_main and self.abort_flag is not None:  # everyone has stopped: the flag is spent
            with contextlib.suppress(OSError):
                os.unlink(self.abort_flag)
        if error is not None:
            raise error
        if failures:
            rank, (text, code) = failures[0]
            raise RankFailedError(f"rank {rank} failed while {name}: {text}", code)

    def close(self, meet: bool = True) -> None:
        """Leave the process group. ``meet``: after a run that succeeded on every rank, wait for the others first,
        so no rank tears its connections down while another still reads from them (gloo can abort the process
        then); after a failure the ranks may not all get here, so each leaves at once."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                if meet:
                    dist.barrier()
                dist.destroy_process_group()


def _env_int(name: str):
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def from_environment(timeout_minutes: float = 60.0) -> Ranks:
    """This process's Ranks from torchrun's environment (one process without it), with the gloo group joined.

    Checks that the variables agree (a rank or node count that does not fit is a one-line ValueError).
    """
    rank, world, local_rank, local_world = (_env_int(n) for n in ENV_VARS)
    if world is None or world == 1:
        return Ranks()
    if rank is None or local_rank is None:
        raise ValueError("WORLD_SIZE is set but RANK or LOCAL_RANK is not; start the run with torchrun")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    if local_world is not None and (not 0 <= local_rank < local_world or world % local_world):
        raise ValueError(f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world} and WORLD_SIZE={world} do not "
                         "fit together: every node must run the same number of processes (--nproc-per-node)")
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed; run one process per machine")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks, the environment says {world}")
    _terminate_cleanly()
    return Ranks(rank=rank, world_size=world, local_rank=local_rank)


def _terminate_cleanly() -> None:
    """SIGTERM (torchrun stopping the workers after a failure) raises KeyboardInterrupt in the main thread,
    so writes in progress finish or remove their temporary files before the process exits."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    with contextlib.suppress(ValueError):  # not in the main thread: leave the default
        signal.signal(signal.SIGTERM, interrupt)
