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
- ``ITK_INFER_TEST_SHOW_THREADS=1``: print ``threads torch=<n> onnxruntime=<n>`` (the CPU
  threads the model runs with) to stderr before each model step.
"""

from __future__ import annotations

import os
import signal
import sys
import time

if __name__ == "__mp_main__" and os.environ.get("ITK_INFER_TEST_KILL_WORKERS_AT_START"):
    os.kill(os.getpid(), signal.SIGKILL)

from itk_infer import caseloop

_infer_case = caseloop.infer_case


def _faulty_infer_case(loaded, model, *args, **kwargs):
    if os.environ.get("ITK_INFER_TEST_SHOW_THREADS"):
        import torch

        ort_threads = model.backend._session.get_session_options().intra_op_num_threads
        print(f"threads torch={torch.get_num_threads()} onnxruntime={ort_threads}",
              file=sys.stderr, flush=True)
    if loaded.case.name == os.environ.get("ITK_INFER_TEST_KILL_CASE"):
        os.kill(os.getpid(), signal.SIGKILL)
    if loaded.case.name == os.environ.get("ITK_INFER_TEST_HANG_CASE"):
        time.sleep(3600)
    time.sleep(float(os.environ.get("ITK_INFER_TEST_SLOW_S", "0")))
    return _infer_case(loaded, model, *args, **kwargs)


caseloop.infer_case = _faulty_infer_case

if __name__ == "__main__":
    from itk_infer.cli import main

    sys.exit(main(sys.argv[1:]))
