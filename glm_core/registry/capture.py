"""Captured calls: what :meth:`Backend.capture` returns, and the reference semantics of one.

A device that runs work queued by a host loop pays the host's time for every launch; a
decode step of a large model is hundreds of small launches. Recording the step once and
replaying the record removes that cost, but a record reads and writes fixed memory: the
buffers it was recorded with. :class:`StaticCall` is that contract made explicit and
backend-neutral, so a backend that records (the cuda backend with a CUDA graph) supplies
only the recording and ``replay``: arguments are copied into the recorded input buffers,
the record is replayed, and the recorded output tensors are returned, rewritten in place
by every call.

:func:`eager_capture` is the same contract without a device record (the function simply
runs again at each call). It is the reference a caller's capture handling is checked
against on a host with no graphs: the tests and the GPU check's dry run use it, so the
copying into static buffers, the warm-up runs and the reuse of output buffers are
exercised where no GPU is.
"""
from __future__ import annotations

from typing import Callable

import torch

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


class StaticCall:
    """A recorded function behind fixed buffers (see the module docstring).

    ``static_inputs``: the tensors the record reads; ``outputs``: the tensors it writes
    (returned by every call, so a result is valid until the next call); ``replay``: runs the
    record.
    """

    def __init__(self, static_inputs: tuple[torch.Tensor, ...], outputs: Outputs, replay: Callable[[], None]):
        self.static_inputs, self.outputs, self.replay = static_inputs, outputs, replay

    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"a captured call takes {len(self.static_inputs)} tensor(s), got {len(inputs)}")
        for i, (dst, src) in enumerate(zip(self.static_inputs, inputs)):
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"input {i} is {src.dtype} {tuple(src.shape)}; the capture was recorded with "
                                 f"{dst.dtype} {tuple(dst.shape)} (a record replays fixed shapes)")
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
        self.replay()
        return self.outputs


def eager_capture(fn: Callable[..., Outputs], example_inputs: tuple[torch.Tensor, ...],
                  warmup: int = 1) -> StaticCall:
    """``fn`` behind static buffers, re-run at each call: what a device capture does, minus
    the record. Like a device capture it runs ``fn`` ``warmup`` times on copies of
    ``example_inputs`` first, side effects included, and its outputs are buffers that every
    call overwrites."""
    static = tuple(x.clone() for x in example_inputs)
    for _ in range(warmup):
        fn(*static)
    first = fn(*static)
    single = isinstance(first, torch.Tensor)
    outputs = first.clone() if single else tuple(t.clone() for t in first)

    def replay():
        fresh = fn(*static)
        for dst, src in ((outputs, fresh),) if single else zip(outputs, fresh):
            dst.copy_(src)

    return StaticCall(static, outputs, replay)
