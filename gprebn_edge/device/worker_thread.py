"""The device loop's worker thread as the serving thread sees it: hand it a job without ever blocking, and
stop it, bounded, before the loop returns."""

from __future__ import annotations

import queue
import sys
import threading
import time

from gprebn_edge.device.stop import INTERRUPTED
from gprebn_edge.device.worker import Job, Worker

__all__ = ["WorkerThread", "SERVING_SWITCH_INTERVAL", "WORKER_FINISH_TIMEOUT", "WORKER_STOP_TIMEOUT"]

SERVING_SWITCH_INTERVAL = 0.0005  # seconds: how long serving may wait for the GIL while a round runs
WORKER_FINISH_TIMEOUT = 600.0     # seconds the round in flight may take to finish when the source ends
WORKER_STOP_TIMEOUT = 30.0        # seconds the worker may take to drop its round on Ctrl-C/SIGTERM or an error


class WorkerThread:
    """The background thread that runs a Worker, as the serving thread sees it: hand it a job without ever
    blocking, and stop it, bounded. While it runs, the interpreter's switch interval is short (put back by
    stop): the worker runs Python between its kernels holding the GIL, and the default 5 ms would let it keep
    serving waiting that long, which is what a frame's p99 then shows."""

    def __init__(self, worker: Worker) -> None:
        self.shared = worker.shared
        self.report = worker.report
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=1)
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SERVING_SWITCH_INTERVAL)
        self.thread = threading.Thread(target=worker.run, args=(self.jobs,), name="gprebn-readapt", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        """False once the worker has died (it reported why): a put with no consumer would block forever."""
        return self.thread.is_alive()

    def submit(self, job: Job) -> bool:
        """Hand `job` over; False (never a wait) if one is still queued."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return False
        return True

    def stop(self, finish: bool) -> bool:
        """Stop the thread before the loop returns: a thread still inside torch or onnxruntime when the
        interpreter exits makes their native thread pools abort the process. `finish` (the source ended): the
        round in flight finishes and is logged (its swap is not served); otherwise (the loop's stop token is
        set), or once a stop is requested while waiting, it is dropped at its next step. Bounded either way:
        a worker that does not stop is reported, never waited for. Returns whether it was abandoned. A
        KeyboardInterrupt while waiting stops the worker the same way and is raised again once it stopped."""
        try:
            return self._stop(finish)
        finally:
            sys.setswitchinterval(self._switch_interval)

    def _stop(self, finish: bool) -> bool:
        stop = self.shared.stop
        deadline = time.monotonic() + (WORKER_FINISH_TIMEOUT if finish and not stop.is_set() else WORKER_STOP_TIMEOUT)
        sent = stop.is_set()  # a stopped worker leaves its loop by itself
        shortened = keyboard = False
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:
                if stop.is_set() and not shortened:
                    shortened = True
                    deadline = min(deadline, time.monotonic() + WORKER_STOP_TIMEOUT)
                if not sent:
                    try:
                        self.jobs.put(None, timeout=0.1)
                        sent = True
                    except queue.Full:
                        continue
                self.thread.join(timeout=0.1)
            except KeyboardInterrupt:  # a library caller's Ctrl-C while the last round finishes: drop it
                keyboard = True
                stop.request(INTERRUPTED)
        if self.thread.is_alive():
            stop.request(INTERRUPTED if keyboard else "worker did not stop")
            self.report("the adaptation worker did not stop in time; its round is dropped")
        if keyboard:
            raise KeyboardInterrupt
        return self.thread.is_alive()
