"""Worker processes: each loads the model once and takes cases from the parent's queue,
largest first; a worker that dies loses only the case in its model, and is replaced.

The parent is the queue. Each worker has its own pipe to it and asks for one case at a time,
so a worker killed mid-message can only break its own pipe, never a lock shared with the
others (a ``multiprocessing.Queue`` can be left locked by a killed reader). The parent also
knows which cases each worker holds, and in which phase, which is what lets it blame the
right case when a worker dies.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from itk_infer import errors
from itk_infer.backends import visible_gpus
from itk_infer.cases import Case, OutputLayout, largest_first
from itk_infer.config import Settings
from itk_infer.errors import DiskFullError, ItkInferError
from itk_infer.locks import remove_stale_locks
from itk_infer.outfolder import remove_temporaries
from itk_infer.progress import Progress, available_cores
from itk_infer.records import NOT_RUN_DISK_FULL, CaseOutcome, complete_record, record_status
from itk_infer.spawn import (
    collections_paused,
    new_crash_log,
    skip_final_collection,
    start_process,
    worker_args,
)

if TYPE_CHECKING:
    from itk_infer.pipeline import Model

log = logging.getLogger(__name__)

# A worker gets this many tries to load its model before its slot is given up.
STARTUP_TRIES = 2
# A case that was in the pipeline (reading or writing, not in the model) of this many dying
# workers is failed instead of being handed out again.
MAX_ATTEMPTS = 2
# Seconds a worker gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 5.0
# The pipeline step each function of a crashed thread's stack means (innermost wins).
_STEPS = {"load_case": "read", "infer_case": "model", "engine_part": "model",
          "write_case": "write"}
_WHILE = {"read": "while reading it", "model": "in the model", "write": "while writing it"}


def describe_exit(exitcode: int | None) -> str:
    """``worker exited with signal 9 (SIGKILL)`` / ``worker exited with code 1``."""
    if exitcode is not None and exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        return f"worker exited with signal {-exitcode}{name}"
    return f"worker exited with code {exitcode}"


def crashed_step(dump: str) -> str | None:
    """The pipeline step ("read", "model", "write") the thread that crashed was in, from a
    :mod:`faulthandler` dump of all threads; ``None`` if the dump does not say.

    A worker reads the next case and writes the previous one while the model runs the
    current one, so the case in the model is not always the one a native crash belongs to.
    """
    _, marker, current = dump.partition("Current thread ")
    if not marker:
        return None
    for line in current.splitlines()[1:]:
        if not line.strip():
            break
        match = re.search(r" in (\w+)$", line)
        if match and match.group(1) in _STEPS:
            return _STEPS[match.group(1)]
    return None


def _read_crash_log(path: str) -> str:
    try:
        with open(path, errors="replace") as file:
            return file.read()
    except OSError:
        return ""
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


# --------------------------------------------------------------------------- worker side


class _Channel:
    """The worker's end of its pipe; sends may come from the reader/writer threads (logs)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self._lock:
            self.conn.send(message)

    def request(self, message: tuple) -> tuple:
        with self._lock:
            self.conn.send(message)
        return self.conn.recv()  # only the worker's main thread ever receives


class _ForwardLogs(logging.Handler):
    """Hands log records to the parent, which prints them (through its bars, if any)."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.channel.send(("log", record.levelno, record.name, record.getMessage()))
        except Exception:  # the parent is gone; nothing left to tell
            pass


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this worker if the parent dies, so no orphan keeps a GPU busy."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(Exception):
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def worker_main(
    slot: int,
    conn: Connection,
    settings: Settings,
    gpu_index: int,
    threads: int | None,
    log_level: int,
    parent_pid: int,
    crash_log: str = "",
) -> None:
    """Entry point of a worker process (spawned): load the model, then run cases until the
    parent says stop. A fatal signal (a crash in a native library) dumps every thread's
    stack to ``crash_log``, from which the parent tells which case's step crashed."""
    # Ctrl-C reaches the whole process group; the parent alone decides how workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    if crash_log:
        # Kept open for the life of the process: faulthandler writes to its descriptor.
        faulthandler.enable(open(crash_log, "w"), all_threads=True)
    channel = _Channel(conn)
    root = logging.getLogger("itk_infer")
    root.handlers[:] = [_ForwardLogs(channel)]
    root.setLevel(log_level)
    root.propagate = False
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)

    try:
        model = _load_worker_model(settings, gpu_index, threads)
        channel.send(("ready", model.fingerprint, model.describe(), str(model.backend.device)))
    except Exception as error:
        kind = type(error).__name__ if isinstance(error, ItkInferError) else ""
        text = str(error) if kind else f"{type(error).__name__}: {error}"
        with contextlib.suppress(Exception):
            channel.send(("fatal", kind, text))
        return
    _run_worker_cases(channel, settings, model)


def _load_worker_model(settings: Settings, gpu_index: int, threads: int | None) -> Model:
    """The worker's model on its device and share of the threads."""
    # The worker's side (torch and the whole core) is imported here, in the worker only: the
    # parent runs the pool without torch.
    with collections_paused():
        import torch

        from itk_infer.backends import resolve_device
        from itk_infer.pipeline import load_model

    if threads is not None:
        _limit_threads(threads)
    device = resolve_device(settings.device, gpu_index=gpu_index)
    if device.type == "cuda":  # calls that take no device then act on this worker's GPU
        torch.cuda.set_device(device)
    return load_model(settings, device, intra_op_threads=threads if device.type == "cpu" else None)


def _run_worker_cases(channel: _Channel, settings: Settings, model: Model) -> None:
    """Ask the parent for cases and run them until it has none; then say goodbye."""
    from itk_infer.caseloop import CaseLoop

    def next_case() -> Case | None:
        reply = channel.request(("next",))
        return reply[1] if reply[0] == "case" else None

    try:
        CaseLoop(
            next_case, model, OutputLayout(settings.output_folder), settings.outputs,
            report=lambda result: channel.send(("outcome", result.outcome())),
            overwrite=settings.overwrite,
            phase=lambda case, phase: channel.send(("phase", case.name, phase)),
        ).run()
        skip_final_collection()  # this process ends now: spare the parent its join
        channel.send(("bye",))
    except DiskFullError as error:
        channel.send(("diskfull", str(error)))
    except (EOFError, OSError):  # the parent is gone: stop quietly
        return


# --------------------------------------------------------------------------- parent side


@dataclass
class ParallelResult:
    """What the workers did, and which model they ran (to tell done from stale cases)."""

    outcomes: list[CaseOutcome] = field(default_factory=list)
    fingerprint: str = ""
    described: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Worker:
    slot: int
    process: BaseProcess
    conn: Connection
    held: dict[str, tuple[Case, str]] = field(default_factory=dict)  # name → (case, phase)
    ready: bool = False
    stopping: bool = False  # told that the queue is empty
    open: bool = True  # the pipe has not reached EOF
    progressed: float = field(default_factory=time.monotonic)  # last phase change or outcome
    timed_out: bool = False  # killed by the parent for --case-timeout
    crash_log: str = ""  # where its faulthandler writes on a fatal signal


def _culprits(worker: _Worker, crashed: str | None = None) -> list[str]:
    """The cases a dead worker's death is blamed on: the one in the model (a crash or an
    out-of-memory kill there is the likely cause); for a worker killed for --case-timeout with
    no case in the model, the step it was stuck in: the oldest read, else the write. The
    others in its pipeline get one more try."""
    by_phase: dict[str, list[str]] = {}
    for case, phase in worker.held.values():
        by_phase.setdefault(phase, []).append(case.name)
    if crashed is not None and by_phase.get(crashed):  # the crashed thread's own case
        return by_phase[crashed][-1:]
    if by_phase.get("model") or not worker.timed_out:
        return by_phase.get("model", [])
    for phase in ("read", "queued", "write"):
        if by_phase.get(phase):
            return by_phase[phase][:1]
    return []


def _error_from_worker(kind: str, text: str) -> ItkInferError:
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, ItkInferError):
        return cls(text)
    return ItkInferError(f"a worker could not load the model: {text}")


# Hands over a worker already started with these arguments, if there is one (prestart.take).
Adopt = Callable[[tuple], Any]


class _Pool:
    def __init__(self, todo: list[Case], settings: Settings, layout: OutputLayout,
                 workers: int, device_type: str, gpu_index: int | None = None,
                 adopt: Adopt | None = None) -> None:
        self.settings, self.layout, self.adopt = settings, layout, adopt
        self.queue: deque[Case] = deque(sorted(todo, key=largest_first))
        self.slots = min(workers, len(self.queue))
        # --gpus 0: every visible GPU.
        self.gpus = (settings.gpus or visible_gpus()) if device_type == "cuda" else 1
        self.gpu_index = gpu_index  # every worker on this one (a GPU leased by the caller)
        self.threads = max(1, available_cores() // self.slots)
        self.workers: dict[int, _Worker] = {}
        self.started_any = False  # the first start may adopt the command's early worker
        self.result = ParallelResult()
        self.attempts: Counter[str] = Counter()
        self.startup_failures: Counter[int] = Counter()
        self.restarts_left = len(todo) + self.slots
        self.any_ready = False
        self.stopped = ""  # why no more cases are handed out (the disk is full)
        self.seen_logs: set[tuple[int, str]] = set()
        self.progress = Progress(len(todo), self.slots, settings.progress)
        where = f"{self.gpus} GPU(s)" if device_type == "cuda" else "the CPU"
        log.info("%d worker processes on %s, %d CPU thread(s) each, %d case(s) to run",
                 self.slots, where, self.threads, len(todo))

    # ---- lifecycle

    def start(self, slot: int) -> None:
        gpu = slot % self.gpus if self.gpu_index is None else self.gpu_index
        args = worker_args(self.settings, slot, gpu, self.threads)
        # The command may have started this worker already, before its own imports.
        early = self.adopt(args) if self.adopt and slot == 0 and not self.started_any else None
        self.started_any = True
        if early is not None:
            log.debug("worker %d: the one started before the runner's imports", slot)
            process, conn, crash_log = early.process, early.conn, early.crash_log
        else:
            crash_log = new_crash_log()
            process, conn = start_process(worker_main, (*args, crash_log),
                                          f"itk_infer-worker-{slot}")
        self.workers[slot] = _Worker(slot, process, conn, crash_log=crash_log)
        self.progress.idle(slot, "loading the model")

    def stop_all(self) -> None:
        """Stop every worker now (interrupt or fatal error) and clear their temporaries."""
        for worker in self.workers.values():
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self.workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
            _read_crash_log(worker.crash_log)
        self.workers.clear()
        remove_temporaries(self.layout)
        remove_stale_locks(self.layout)

    def run(self) -> ParallelResult:
        try:
            for slot in range(self.slots):
                self.start(slot)
            while self.workers:
                self.step()
            while self.queue:  # only when workers kept dying
                case = self.queue.popleft()
                self.fail(case.name, "not run: worker processes kept dying", None)
        except BaseException:
            self.stop_all()
            raise
        finally:
            self.progress.close()
        remove_temporaries(self.layout)
        return self.result

    def step(self) -> None:
        by_handle: dict[Any, _Worker] = {}
        for worker in self.workers.values():
            if worker.open:
                by_handle[worker.conn] = worker
            by_handle[worker.process.sentinel] = worker
        for handle in wait(list(by_handle), timeout=self._next_deadline()):
            worker = by_handle[handle]
            if worker.slot not in self.workers or self.workers[worker.slot] is not worker:
                continue  # already handled this round
            if handle is worker.conn:
                self.drain(worker)
            else:
                self.drain(worker)
                self.exited(worker)
        self._kill_overdue()

    # ---- --case-timeout

    def _next_deadline(self) -> float | None:
        """Seconds until the earliest worker busy with a case overruns the timeout."""
        limit = self.settings.case_timeout
        busy = [w.progressed for w in self.workers.values() if w.ready and w.held]
        if limit is None or not busy:
            return None
        return max(0.0, min(busy) + limit - time.monotonic())

    def _kill_overdue(self) -> None:
        """Kill a worker stuck in one step of a case (no phase change or outcome) for longer
        than --case-timeout; its death is then handled like any other (see :meth:`exited`)."""
        limit = self.settings.case_timeout
        if limit is None:
            return
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.ready and worker.held and not worker.timed_out \
                    and now - worker.progressed > limit:
                worker.timed_out = True
                worker.process.kill()

    # ---- messages

    def drain(self, worker: _Worker) -> None:
        while worker.open:
            try:
                if not worker.conn.poll():
                    return
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.open = False
                return
            self.handle(worker, message)

    def send(self, worker: _Worker, message: tuple) -> None:
        try:
            worker.conn.send(message)
        except OSError:
            pass  # it died; its exit is handled when its sentinel fires

    def handle(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "next":
            if self.queue and not self.stopped:
                case = self.queue.popleft()
                worker.held[case.name] = (case, "queued")
                self.send(worker, ("case", case))
            else:
                worker.stopping = True
                self.send(worker, ("stop",))
        elif kind == "phase":
            worker.progressed = time.monotonic()
            name, phase = message[1], message[2]
            if name in worker.held:
                worker.held[name] = (worker.held[name][0], phase)
            self.progress.phase(worker.slot, name, phase)
        elif kind == "outcome":
            worker.progressed = time.monotonic()
            outcome: CaseOutcome = message[1]
            worker.held.pop(outcome.case, None)
            self.report(outcome, worker.slot)
        elif kind == "log":
            level, name, text = message[1], message[2], message[3]
            # Every worker loads the same model: say each of its warnings once.
            if level >= logging.WARNING:
                if (level, text) in self.seen_logs:
                    return
                self.seen_logs.add((level, text))
            logging.getLogger(name).log(level, "%s", text)
        elif kind == "ready":
            worker.ready = self.any_ready = True
            self.startup_failures[worker.slot] = 0
            if not self.result.fingerprint:
                self.result.fingerprint, self.result.described = message[1], message[2]
            self.progress.idle(worker.slot, f"ready on {message[3]}")
        elif kind == "fatal":
            raise _error_from_worker(message[1], message[2])
        elif kind == "diskfull":
            if not self.stopped:
                self.stopped = message[1]
                log.error("%s", message[1])
            while self.queue:
                self.not_run(self.queue.popleft().name)
        elif kind == "bye":
            self.progress.idle(worker.slot, "finished")

    # ---- deaths

    def exited(self, worker: _Worker) -> None:
        worker.process.join()
        worker.conn.close()
        del self.workers[worker.slot]
        code = worker.process.exitcode
        crashed = crashed_step(_read_crash_log(worker.crash_log))
        self.completed_before_exit(worker)
        if self.stopped:  # what it still held was never run
            for case, _phase in worker.held.values():
                self.not_run(case.name)
            self.progress.idle(worker.slot, "stopped")
            return
        if code == 0 and not worker.held:
            # A clean exit. Deaths elsewhere may have put cases back in the queue after this
            # worker was told to stop; they need a worker if no other one takes cases.
            if self.queue and not any(not w.stopping for w in self.workers.values()):
                self.replace(worker.slot, "finished")
            else:
                self.progress.idle(worker.slot, "finished")
            return
        cause = describe_exit(code)
        if crashed is not None:
            cause = f"{cause} {_WHILE[crashed]}"
        if worker.timed_out:
            cause = f"timed out after {self.settings.case_timeout:g} s"
        # Its temporaries (half-written outputs) and lock files would otherwise wait for the
        # next run; the kernel has already dropped its locks.
        remove_temporaries(self.layout)
        remove_stale_locks(self.layout)
        if not worker.ready:
            self.startup_failures[worker.slot] += 1
            log.warning("worker %d died while loading the model: %s", worker.slot, cause)
        culprits = _culprits(worker, crashed)
        if worker.held:
            log.error("worker %d: %s while running %s", worker.slot, cause,
                      ", ".join(culprits) or "no case in the model")
        for case, phase in worker.held.values():
            self.attempts[case.name] += 1
            if case.name in culprits or self.attempts[case.name] >= MAX_ATTEMPTS:
                self.fail(case.name, cause, worker.slot)
            else:
                log.warning("%s (was %s by worker %d) goes back in the queue", case.name,
                            "read" if phase in ("queued", "read") else "written", worker.slot)
                self.queue.appendleft(case)
        if self.queue:
            self.replace(worker.slot, cause)
        else:
            self.progress.idle(worker.slot, cause)

    def completed_before_exit(self, worker: _Worker) -> None:
        """Count as done the cases whose record the worker published before it died.

        A worker reports a written case only after the model step of the next one, so a
        crash there took the report with it. The case was locked by that worker, so a
        complete, current record can only be its own. Sent back to the queue, the case would
        come out "skipped", as if another run had made it.
        """
        if not self.result.fingerprint:  # no worker got the model loaded: nothing was written
            return
        for name, (case, phase) in list(worker.held.items()):
            if phase != "write":
                continue
            record = complete_record(self.layout, case, self.settings.outputs)
            if record is None or record_status(
                    record, self.result.fingerprint, self.result.described) != "done":
                continue
            del worker.held[name]
            seconds = sum(record.timings_s.get(k, 0.0) for k in ("read", "infer", "write"))
            outcome = CaseOutcome(name, "done", seconds=seconds, confidence=record.confidence)
            log.info("%s was written before worker %d exited", name, worker.slot)
            self.report(outcome, worker.slot)

    def report(self, outcome: CaseOutcome, slot: int | None = None) -> None:
        """A case's final outcome: into the run's result and onto the progress display."""
        self.result.outcomes.append(outcome)
        self.progress.done(outcome, slot)

    def not_run(self, name: str) -> None:
        self.report(CaseOutcome(name, "skipped", reason=f"not run: {NOT_RUN_DISK_FULL}"))

    def fail(self, name: str, cause: str, slot: int | None) -> None:
        self.report(CaseOutcome(name, "failed", reason=cause), slot)

    def replace(self, slot: int, cause: str) -> None:
        if self.startup_failures[slot] >= STARTUP_TRIES or self.restarts_left <= 0:
            self.progress.idle(slot, f"given up: {cause}")
            if not self.workers and not self.any_ready:
                raise ItkInferError(f"worker processes could not start: {cause}")
            return  # the others carry on with the queue; run() fails what nobody ran
        self.restarts_left -= 1
        log.info("starting a replacement for worker %d", slot)
        self.start(slot)


def run_parallel(
    todo: list[Case],
    settings: Settings,
    layout: OutputLayout,
    workers: int,
    device_type: str,
    gpu_index: int | None = None,
    adopt: Adopt | None = None,
) -> ParallelResult:
    """Run ``todo`` in ``min(workers, len(todo))`` spawned worker processes, on ``"cpu"`` or
    ``"cuda"`` (``device_type``; each worker resolves its own device). Imports no torch on
    the CPU: the workers do.

    Worker k runs on GPU ``k mod G`` of the first G visible CUDA devices (``--gpus``; 0: all
    of them), or on GPU ``gpu_index`` if given, or on the CPU with its share of the cores.
    ``adopt(args)`` may hand over an already started worker 0 for those arguments (see
    :func:`itk_infer.prestart.take`).

    Raises:
        UsageError: the workers cannot use the model (reported by the first to try).
        ItkInferError: no worker process could start.
        KeyboardInterrupt: workers are stopped and their temporaries removed first.
    """
    return _Pool(todo, settings, layout, workers, device_type, gpu_index, adopt).run()
