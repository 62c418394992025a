"""The distributed lifecycle of a run under torchrun, in one place (`train` uses it).

    with distributed.session("cpu") as dd:     # torchrun's environment -> a process group;
        dd.rank, dd.world, dd.local_rank, dd.device    without it: rank 0 of 1, no group
        ... every rank trains (DDP), dd.all_gather(...) ...
    # on leaving: a barrier (every rank is done), then the group is destroyed on every rank;
    # on an error: no barrier, the peers are told, the group is destroyed all the same
    ... rank 0 alone evaluates and writes, with no process group left ...

Rules, and why:
- Bounded waits: init_process_group and every collective time out after TIMEOUT, so a rank
  that never arrives or hangs is an error after that long, not a hang.
- A rank that fails tells the others: it posts its error in the rendezvous store, skips
  the barriers and destroys its end of the group at once. Its peers' next collective then
  fails (the connection closes), and they raise `PeerFailed` quoting that error instead of
  a bare gloo/nccl message. The failing rank waits (at most ACK_WAIT) until each peer has
  acknowledged, since torchrun stops every rank as soon as one exits.
- Healthy ranks leave together: a barrier, then `destroy_process_group` on every rank,
  and nothing collective after (rank 0's evaluation runs once the group is gone). The group
  must really be gone when a process exits: a gloo group still alive then keeps its worker
  threads and TCP connections into interpreter exit, and a peer closing its end at that
  moment aborts the exiting process. Two things kept it alive: DistributedDataParallel's
  import of torch.distributed.nn.functional, whose default arguments capture the group
  that exists at import time (so we import it before creating the group), and our own
  DDP wrappers (released before the group is destroyed; `gc.collect()` for any cycle).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=10)   # init and every collective (a checkpoint write on rank 0
                                  # is the longest wait for the other ranks)
STORE_WAIT = timedelta(seconds=5)  # one read or write of the failure notes
ACK_WAIT = timedelta(seconds=30)   # a failing rank waits this long for its peers to notice


class PeerFailed(RuntimeError):
    """Another rank of the run failed; the message quotes its error."""


_sessions = 0                     # sessions opened by this process: namespaces the notes


def environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return 0, 1, 0
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as e:
        raise ValueError(f"torchrun's environment is incomplete or not numeric ({e}): "
                         "RANK, WORLD_SIZE and LOCAL_RANK must be ints") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not in 0..WORLD_SIZE-1 = {world - 1}")
    return rank, world, local


@dataclass
class Session:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool = False      # we created the process group, so we destroy it

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(timeout=TIMEOUT)

    def all_gather(self, obj) -> list:
        """Every rank's `obj` (a picklable value), in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


class _Board:
    """Failure notes in the rendezvous store (torchrun's agent keeps it alive when a rank's
    process group is gone): the first failing rank's error, and each rank's acknowledgement.
    Every call is bounded and never raises: a store that is gone has nothing to tell."""

    def __init__(self, session_id: int, rank: int, world: int):
        self.prefix, self.rank, self.world = f"minihires/{session_id}/", rank, world
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:
            self.store = None

    def _do(self, fn, default=None):
        if self.store is None:
            return default
        try:
            self.store.set_timeout(STORE_WAIT)
            return fn(self.store)
        except Exception:
            return default

    def error(self) -> str | None:
        """Another rank's error, if one was posted."""
        key = self.prefix + "failed"
        message = self._do(lambda st: st.get(key).decode(errors="replace")
                           if st.check([key]) else None)
        return None if message is None or message.startswith(f"rank {self.rank}:") else message

    def post(self, error: BaseException) -> None:
        """This rank's error for its peers (the first one posted stays)."""
        text = f"rank {self.rank}: {type(error).__name__}: {error}".splitlines()[0][:500]
        self._do(lambda st: st.compare_set(self.prefix + "failed", "", text))

    def ack(self) -> None:
        self._do(lambda st: st.set(f"{self.prefix}ack/{self.rank}", "1"))

    def wait_acks(self) -> None:
        """Until every other rank has seen the failure (at most ACK_WAIT): torchrun stops all
        ranks when one exits, which could cut a peer off before it says why it stopped."""
        keys = [f"{self.prefix}ack/{r}" for r in range(self.world) if r != self.rank]
        self._do(lambda st: (st.set_timeout(ACK_WAIT), st.wait(keys)))


def _destroy() -> None:
    gc.collect()               # DDP wrappers caught in reference cycles hold the group
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "cpu"):
    """The run's ranks (see the module doc): a process group under torchrun, else none."""
    rank, world, local = environment()
    dev = torch.device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    s = Session(rank, world, local, dev)
    global _sessions
    _sessions += 1                       # every rank opens sessions in the same order
    session_id = _sessions
    if world > 1 and not dist.is_initialized():
        # Imported before the group exists, on purpose: this module's functions take
        # `group=group.WORLD` as a default argument, evaluated when it is first imported
        # (DistributedDataParallel imports it). Imported while a group exists, those defaults
        # hold that group forever: destroy_process_group then frees nothing, and gloo's
        # threads and connections live on into interpreter exit, where a peer closing its end
        # can abort the process ("terminate called without an active exception").
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
        s.owns_group = True
    try:
        yield s
        if s.distributed and s.owns_group:
            s.barrier()          # every rank is done with the group before any rank leaves it
    except BaseException as e:
        if s.distributed and dist.is_initialized():
            board = _Board(session_id, rank, world)
            # a collective that failed because a peer left: gloo raises a plain RuntimeError
            broken = type(e) is RuntimeError or isinstance(e, dist.DistError)
            peer = board.error() if broken else None
            # the traceback's finished frames hold the DDP wrappers, and so the group: free them
            traceback.clear_frames(e.__traceback__)
            if peer is not None:
                message = f"rank {rank} stopped because {peer}"
                print(f"[rank {rank}]: {message}", file=sys.stderr, flush=True)
                board.ack()
                if s.owns_group:
                    _destroy()
                raise PeerFailed(message) from e
            board.post(e)                # before the group goes: peers then find it
            board.ack()
            if s.owns_group:
                _destroy()               # the peers' next collective fails now, not later
            if not isinstance(e, KeyboardInterrupt):
                board.wait_acks()
        raise
    else:
        if s.distributed and s.owns_group:
            _destroy()
