"""The inference worker: one thread runs the encoders' forward passes in dynamic batches.

Request handlers call `await batcher.embed(tensors, encoder)` with the encoder of the generation
they leased; the images join a bounded queue and the worker thread takes up to `max_batch_size`
of them that share that encoder, waiting at most `max_wait_ms` after the first one to fill a
batch (only around a generation swap do two encoders' images meet in the queue). Results come
back through asyncio futures, so the forward pass never runs on the event loop. When the queue
cannot take a request's images it is refused at once (`QueueFullError` -> 429) instead of
queueing without bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ace_model.embedding import EmbeddingPolicy
from ace_model.encoder import Embeddings, Encoder


class QueueFullError(RuntimeError):
    """The batcher's queue cannot take more images right now."""


class WorkerDownError(RuntimeError):
    """The worker thread has died: nothing queued would ever be answered."""


@dataclass(frozen=True)
class Embedded:
    patches: torch.Tensor  # (h, w, D) unit-norm coarse patch embeddings on the CPU
    queue_ms: float  # time spent waiting for the worker
    inference_ms: float  # duration of the forward pass of the batch it ran in
    fine: torch.Tensor | None = None  # (H, W, d) unit-norm fine grid; None for single-level encoders


@dataclass
class _Item:
    tensor: torch.Tensor  # (3, S, S) uint8 letterboxed pixels (normalised on the device, batched)
    encoder: Encoder  # the leased generation's encoder, already on the device
    future: asyncio.Future[Embedded] | concurrent.futures.Future[Embedded]
    loop: asyncio.AbstractEventLoop | None  # None: a thread waits on a concurrent future (warm-up)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int  # images per forward pass
    max_wait_ms: float  # wait after the first image to fill a batch
    queue_size: int  # images allowed to wait
    policy: EmbeddingPolicy  # device and precision, as index building uses them
    stall_s: float = 120.0  # one forward pass running longer than this counts as stuck (/ready)


BatchObserver = Callable[[int, int], None]  # (batch size, queue depth after taking it)


class Batcher:
    def __init__(self, config: BatcherConfig, observe: BatchObserver) -> None:
        self.config = config
        self._observe = observe
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy_since: float | None = None  # when the running forward pass started
        self.worker_cpu_s = 0.0  # the worker thread's CPU seconds, as of its last batch
        self._thread = threading.Thread(target=self._run, name="ace-batcher", daemon=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def problem(self) -> str | None:
        """Why the worker cannot answer now (dead, or one forward pass running too long), or None."""
        if not self._thread.is_alive():
            return "the inference worker thread is not running"
        busy_since = self._busy_since
        if busy_since is not None and time.perf_counter() - busy_since > self.config.stall_s:
            return f"the inference worker has been in one forward pass for over {self.config.stall_s:.0f} s"
        return None

    def prepare(self, encoder: Encoder, timeout_s: float = 600) -> Encoder:
        """Move an encoder to the serving device and run one forward pass on the worker (CUDA
        kernels and caches are made where they are used). Call from a thread, not the event loop."""
        encoder = self.config.policy.place(encoder)
        size = encoder.spec.img_size
        future: concurrent.futures.Future[Embedded] = concurrent.futures.Future()
        with self._cond:  # beyond queue_size on purpose: a warm-up is never refused
            self._check_running()
            self._queue.append(_Item(torch.zeros(3, size, size, dtype=torch.uint8), encoder, future, None))
            self._cond.notify()
        future.result(timeout=timeout_s)
        return encoder

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._fail_queued(WorkerDownError("the service is shutting down"))

    async def embed(self, tensors: list[torch.Tensor], encoder: Encoder) -> list[Embedded]:
        """Embed the images together with whatever else is queued; QueueFullError when full."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Embedded]] = [loop.create_future() for _ in tensors]
        items = [_Item(t, encoder, f, loop) for t, f in zip(tensors, futures, strict=True)]
        with self._cond:
            self._check_running()
            if len(self._queue) + len(items) > self.config.queue_size:
                raise QueueFullError(
                    f"the inference queue is full ({len(self._queue)} images waiting); retry later"
                )
            self._queue.extend(items)
            self._cond.notify()
        try:  # a stuck forward pass must not hold this request (and its memory reservation) forever
            async with asyncio.timeout(self.config.stall_s):
                return list(await asyncio.gather(*futures))
        except TimeoutError as err:
            raise WorkerDownError(f"no answer from the inference worker within {self.config.stall_s:.0f} s "
                                  "(ACE_WORKER_STALL_S)") from err

    def _check_running(self) -> None:
        """Call holding self._cond."""
        if self._stopping:
            raise WorkerDownError("the service is shutting down")
        if not self._thread.is_alive():
            raise WorkerDownError("the inference worker is not running; the service needs a restart")

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._process(batch)
        finally:  # however the thread ends, nothing queued is left waiting for it
            self._fail_queued(WorkerDownError("the inference worker stopped; the service needs a restart"))

    def _fail_queued(self, err: WorkerDownError) -> None:
        with self._cond:
            stranded = list(self._queue)
            self._queue.clear()
        for item in stranded:
            _resolve(item, err)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._queue:
                return None
            deadline = self._queue[0].enqueued + self.config.max_wait_ms / 1000
            while len(self._queue) < self.config.max_batch_size and not self._stopping:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take_batch()

    def _take_batch(self) -> list[_Item]:
        """The oldest image and up to max_batch_size - 1 more of its bucket (encoder and input
        size), from anywhere in the queue: a batch never pads to, or waits behind, another size.
        The others keep their order."""
        first = self._queue[0]
        batch: list[_Item] = []
        rest: deque[_Item] = deque()
        for item in self._queue:
            if len(batch) < self.config.max_batch_size and _fits(item, first):
                batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        return batch

    def _process(self, batch: list[_Item]) -> None:
        try:
            results = self._embedded(batch)
        except Exception as err:  # the worker must survive; each caller gets the error
            results = [err] * len(batch)
        for item, outcome in zip(batch, results, strict=True):
            _resolve(item, outcome)
        self.worker_cpu_s = time.thread_time()  # the calling thread's CPU: only the worker can read its own

    def _embedded(self, batch: list[_Item]) -> list[Embedded | Exception]:
        self._observe(len(batch), len(self._queue))
        started = self._busy_since = time.perf_counter()
        try:
            out = self.forward(torch.stack([item.tensor for item in batch]), batch[0].encoder)
        finally:
            self._busy_since = None
        inference_ms = (time.perf_counter() - started) * 1000
        return [Embedded(out.patches[n], (started - item.enqueued) * 1000, inference_ms,
                         None if out.fine is None else out.fine[n]) for n, item in enumerate(batch)]

    def forward(self, images: torch.Tensor, encoder: Encoder) -> Embeddings:
        """(B, 3, S, S) -> Embeddings, float32 on the CPU. Call from the worker (or `prepare`)."""
        return self.config.policy.forward(encoder, images)


def _fits(item: _Item, first: _Item) -> bool:
    """Same encoder, same input size (second looks are twice the size) as the batch's first image."""
    return item.encoder is first.encoder and item.tensor.shape == first.tensor.shape


def _resolve(item: _Item, outcome: Embedded | Exception) -> None:
    if item.loop is None:
        assert isinstance(item.future, concurrent.futures.Future)
        _settle_thread_future(item.future, outcome)
        return
    loop = item.loop

    def settle() -> None:
        if item.future.done():  # the client went away and the handler was cancelled
            return
        if isinstance(outcome, Exception):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the event loop has already closed
        loop.call_soon_threadsafe(settle)


def _settle_thread_future(future: concurrent.futures.Future[Embedded], outcome: Embedded | Exception) -> None:
    if future.done():  # failed already (the worker stopping) or given up on
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
