"""Test-only launcher of ``itk_infer`` that can kill or slow down its own workers.

Run it as a script (``python tests/cli/fault_driver.py <itk_infer arguments>``). Worker
processes are started with ``spawn``, which imports the parent's main script in every worker
(as ``__mp_main__``) before the worker runs; so the patch below reaches the workers without any
hook in the library itself. It wraps ``itk_infer.caseloop.infer_case``, the model step:

- ``ITK_INFER_TEST_KILL_CASE=<case>``: SIGKILL the process that is about to run ``<case>``
  through the model (a worker that dies like a segfault or an out-of-memory kill);
- ``ITK_INFER_TEST_SLOW_S=<seconds>``: sleep that long before each model step, so that a
  test can act while a run is busy;
- ``ITK_INFER_TEST_KILL_WORKERS_AT_START=1``: every worker dies (SIGKILL) as it starts;
- ``ITK_INFER_TEST_CRASH=<step>:<case>:<how>`` (step ``read``, ``model`` or ``write``; how
  ``segv`` or ``abort``): a real native crash (a NULL read through ctypes, or ``abort()``)
  inside the pipeline's own call of that step for ``<case>``: reading the image
  (``read_volume``), the model's forward, or writing the label map (``write_label_map``);
- ``ITK_INFER_TEST_CRASH_AFTER=<file>``: a crash of ``ITK_INFER_TEST_CRASH`` first waits (up
  to 60 s) until ``<file>`` exists, e.g. the record of the case written before;
- ``ITK_INFER_TEST_SHOW_THREADS=1``: print ``threads torch=<n> onnxruntime=<n> spinning=<0|1>``
  (the CPU threads the model runs with, and whether ONNX Runtime's idle ones spin) to stderr
  before each model step.
"""

from __future__ import annotations

import os
import signal
import sys
import time

if __name__ == "__mp_main__" and os.environ.get("ITK_INFER_TEST_KILL_WORKERS_AT_START"):
    os.kill(os.getpid(), signal.SIGKILL)

from itk_infer import caseloop, pipeline
from itk_infer.atomic import final_name
from itk_infer.cases import case_name

_infer_case = caseloop.infer_case
_read_volume = pipeline.read_volume
_slide = pipeline.slide
_in_model: list[str] = []  # the case whose model step runs now (one at a time per process)
_write_label_map = pipeline.write_label_map


def _crash_if(step: str, name: str) -> None:
    """Crash this process natively if ``ITK_INFER_TEST_CRASH`` names ``step`` of ``name``."""
    wanted = os.environ.get("ITK_INFER_TEST_CRASH", "").split(":")
    if len(wanted) != 3 or wanted[0] != step or wanted[1] != name:
        return
    after = os.environ.get("ITK_INFER_TEST_CRASH_AFTER")
    deadline = time.monotonic() + 60
    while after and not os.path.exists(after) and time.monotonic() < deadline:
        time.sleep(0.01)
    if wanted[2] == "abort":
        os.abort()
    import ctypes

    ctypes.string_at(0)  # reads address 0: SIGSEGV inside C code


def _crashing_read_volume(path, *args, **kwargs):
    _crash_if("read", case_name(path.name) or path.name)
    return _read_volume(path, *args, **kwargs)


def _crashing_write_label_map(labels, geometry, path, *args, **kwargs):
    final = final_name(path) or path.name
    _crash_if("write", case_name(final) or final)
    return _write_label_map(labels, geometry, path, *args, **kwargs)


def _faulty_infer_case(loaded, model, *args, **kwargs):
    if os.environ.get("ITK_INFER_TEST_SHOW_THREADS"):
        import torch

        options = model.backend._session.get_session_options()
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
        print(f"threads torch={torch.get_num_threads()} "
              f"onnxruntime={options.intra_op_num_threads} spinning={spinning}",
              file=sys.stderr, flush=True)
    if loaded.case.name == os.environ.get("ITK_INFER_TEST_KILL_CASE"):
        os.kill(os.getpid(), signal.SIGKILL)
    if loaded.case.name == os.environ.get("ITK_INFER_TEST_HANG_CASE"):
        time.sleep(3600)
    time.sleep(float(os.environ.get("ITK_INFER_TEST_SLOW_S", "0")))
    _in_model[:] = [loaded.case.name]
    try:
        return _infer_case(loaded, model, *args, **kwargs)
    finally:
        _in_model.clear()


def _crashing_slide(*args, **kwargs):
    for name in _in_model:  # inside the real infer_case, as a crash in the backend would be
        _crash_if("model", name)
    return _slide(*args, **kwargs)


caseloop.infer_case = _faulty_infer_case
pipeline.read_volume = _crashing_read_volume
pipeline.slide = _crashing_slide
pipeline.write_label_map = _crashing_write_label_map

if __name__ == "__main__":
    from itk_infer.cli import main

    sys.exit(main(sys.argv[1:]))
