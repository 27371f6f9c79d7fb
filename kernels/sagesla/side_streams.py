"""Side CUDA streams for work of the SageSLA preparation that the next step does not need.

The preparation is a chain of small kernels on one stream. The fold of the linear statistics with
proj_l is read only by the attention kernel's epilogue, so it runs on a side stream beside the key
means, top-k and quantization (`linear_fold.fold_linear_beside`). `beside` forks such a piece off the
calling stream and returns the event its consumer waits on (`join`). (Moving the statistics kernel
itself and the top-k beside the chain was measured too, and was no faster: RESULTS.md, session 16.)

Memory: tensors a side piece writes are allocated on the calling stream before the fork, and the
consumer joins before anything it queues afterwards can reuse their memory. Under CUDA-graph capture
the fork and the join are captured as parallel branches of the graph.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

__all__ = ["beside", "join"]

R = TypeVar("R")
_STREAMS: dict[tuple[torch.device, int], "torch.cuda.Stream"] = {}


def _stream(device: torch.device, lane: int) -> "torch.cuda.Stream":
    key = (device, lane)
    s = _STREAMS.get(key)
    if s is None:
        s = _STREAMS.setdefault(key, torch.cuda.Stream(device))
    return s


def beside(device: torch.device, lane: int, fn: Callable[[], R], uses=()) -> tuple[R, "torch.cuda.Event | None"]:
    """Run ``fn`` (which launches kernels) on side stream ``lane`` of ``device``, after everything
    queued so far on the calling stream. ``uses``: the tensors ``fn`` reads or writes that were
    allocated on other streams; outside CUDA-graph capture they are marked as used by the side stream
    (`record_stream`), so the allocator does not hand their memory out again before the side work is
    done, even if the caller drops them without joining. Under capture they are not: a block with a
    side-stream use stays out of the graph's pool until the capture ends, and the graph's edges
    order the side work before anything queued after the join. Returns (fn's result, the event that
    marks its end). Off CUDA the piece runs in order and the event is None."""
    if device.type != "cuda":
        return fn(), None
    side = _stream(device, lane)
    side.wait_stream(torch.cuda.current_stream(device))
    if not torch.cuda.is_current_stream_capturing():
        for t in uses:
            t.record_stream(side)
    with torch.cuda.stream(side):
        res = fn()
        done = torch.cuda.Event()
        done.record(side)
    return res, done


def join(device: torch.device, events) -> None:
    """Make the calling stream wait for every event in ``events`` (None entries are skipped)."""
    if device.type != "cuda":
        return
    cur = torch.cuda.current_stream(device)
    for ev in events:
        if ev is not None:
            cur.wait_event(ev)
