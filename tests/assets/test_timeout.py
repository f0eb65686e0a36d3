"""``case_timeout`` in a Dagster run: an input that hangs its read (a FIFO nobody writes to:
opening it blocks in the kernel, as a dead network mount does) fails its own partition with
"timed out after S s"; the run's other partitions are materialised, with outputs equal to a
run without the limit."""

from __future__ import annotations

import os
import time

from itk_infer_assets.assets import SEGMENTATION
from itk_infer_assets.partitions import case_for_key, layout_for_key
from itk_infer_assets.resources import ItkInferResource
from tests.assets import make_demo_inputs
from tests.assets.test_assets import instance_with, resource, run_range

LIMIT_S = 20  # far above one step of a demo case, even on a loaded machine


def test_a_hung_case_fails_its_partition_and_the_others_materialise(tmp_path):
    inputs = make_demo_inputs(tmp_path)
    hung = "2026-11-26/hung.nii.gz"
    os.mkfifo(inputs.root / hung)
    keys = sorted([*inputs.keys, hung])
    instance = instance_with(keys)
    out = tmp_path / "out"
    limited = ItkInferResource(watch_root=str(inputs.root), output_root=str(out),
                               onnx_path=str(inputs.model), device="cpu",
                               case_timeout=LIMIT_S)
    started = time.monotonic()
    result = run_range(instance, limited, keys, [SEGMENTATION], raise_on_error=False)
    assert time.monotonic() - started < 10 * LIMIT_S
    assert not result.success
    failures = result.get_step_failure_events()
    assert len(failures) == 1
    failure = failures[0].step_failure_data.user_failure_data
    assert failure.metadata["failed"].data == {hung: f"timed out after {LIMIT_S} s"}
    assert instance.get_materialized_partitions(SEGMENTATION) == set(inputs.keys)

    # The same cases without a limit (in the step's own process): identical label maps.
    reference = tmp_path / "reference"
    plain = run_range(instance_with(inputs.keys), resource(inputs, reference), inputs.keys,
                      [SEGMENTATION])
    assert plain.success
    for key in inputs.keys:
        case = case_for_key(inputs.root, key)
        ours = layout_for_key(out, key).labels(case)
        theirs = layout_for_key(reference, key).labels(case)
        assert ours.read_bytes() == theirs.read_bytes(), key
    assert not layout_for_key(out, hung).labels(case_for_key(inputs.root, hung)).exists()
