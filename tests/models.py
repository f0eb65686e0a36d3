"""Small ONNX models built in code (no training, no export) with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def pointwise_weights(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class slope and offset: class c wins where the windowed intensity is near c/(C-1)."""
    centres = np.linspace(0.0, 1.0, num_classes)
    # logit_c(x) = -(x - c_c)^2 * k, expanded: linear in x after dropping the x^2 term shared
    # by all classes, so argmax picks the nearest centre.
    slope = (2.0 * centres * 20.0).astype(np.float32)
    offset = (-(centres**2) * 20.0).astype(np.float32)
    return slope, offset


def pointwise_logits(x: np.ndarray, num_classes: int) -> np.ndarray:
    """Numpy reference of :func:`write_pointwise_model`: (C, *x.shape) float32."""
    slope, offset = pointwise_weights(num_classes)
    shape = (num_classes,) + (1,) * x.ndim
    return slope.reshape(shape) * x[None].astype(np.float32) + offset.reshape(shape)


def write_pointwise_model(
    path: Path,
    num_classes: int = 3,
    *,
    metadata: dict[str, str] | None = None,
    input_shape: list | None = None,
    output_shape: list | None = None,
    two_outputs: bool = False,
) -> Path:
    """A 1x1x1 Conv3d model: logits = slope_c * x + offset_c; exact under any blending."""
    slope, offset = pointwise_weights(num_classes)
    in_shape = input_shape or ["N", 1, "Z", "Y", "X"]
    out_shape = output_shape or ["N", num_classes, "Z", "Y", "X"]
    spatial = len(in_shape) - 2
    w = numpy_helper.from_array(slope.reshape(num_classes, 1, *([1] * spatial)), "w")
    b = numpy_helper.from_array(offset, "b")
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)]
    if two_outputs:
        nodes.append(helper.make_node("Identity", ["logits"], ["copy"]))
        outputs.append(helper.make_tensor_value_info("copy", TensorProto.FLOAT, out_shape))
    graph = helper.make_graph(
        nodes,
        "pointwise",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, in_shape)],
        outputs,
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def default_metadata(patch=(8, 16, 16), stride=(4, 8, 8), batch=2, wl=0.0, ww=2.0) -> dict:
    return {
        "window_level": str(wl),
        "window_width": str(ww),
        "inference_config": json.dumps(
            {"patch_size": list(patch), "patch_stride": list(stride),
             "forward_batch_windows": batch}
        ),
    }
