"""Export the trained demo U-Net to ONNX with its inference metadata.

Reads ``examples/demo/unet.pth`` (see ``train.py``) and writes
``examples/demo/model.onnx`` with one input ``image`` ``(N, 1, Z, Y, X)`` and
one output ``logits`` ``(N, C, Z, Y, X)``, float32, batch and spatial axes
dynamic (spatial sizes must be divisible by ``UNet3D.size_divisor``). The
model's custom metadata carries what an inference tool needs to know:

* ``window_level`` / ``window_width``: the HU window used in training;
* ``inference_config``: JSON with ``patch_size`` and ``patch_stride`` (Z, Y, X)
  for sliding-window inference and ``forward_batch_windows``;
* ``labels``: JSON ``{name: value}`` of the phantom's classes.

The export is then checked against torch with onnxruntime (CPU).

Run from the repository root::

    python examples/export_onnx.py [--weights PTH] [--out ONNX]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.phantoms import CLASS_NAMES, NUM_CLASSES, WL, WW
from examples.train import PATCH_ZYX
from examples.unet import UNet3D

DEMO_DIR = Path(__file__).resolve().parent / "demo"

# Half-patch stride: every voxel is covered by several windows to blend.
INFERENCE_CONFIG = {
    "patch_size": list(PATCH_ZYX),
    "patch_stride": [p // 2 for p in PATCH_ZYX],
    "forward_batch_windows": 2,
}


def export(weights: Path, out: Path) -> None:
    """Export ``weights`` to ``out`` and attach the metadata."""
    model = UNet3D(num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()

    # Symbolic sizes are multiples of the divisor, so the exporter can prove
    # that pooled-then-upsampled tensors line up with their skip connections.
    d = UNet3D.size_divisor
    dims = {
        0: torch.export.Dim("batch", min=1, max=1024),
        2: d * torch.export.Dim("z_blocks", min=1, max=1024),
        3: d * torch.export.Dim("y_blocks", min=1, max=1024),
        4: d * torch.export.Dim("x_blocks", min=1, max=1024),
    }
    example = torch.rand(2, 1, *PATCH_ZYX)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (example,),
        out,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": dims},
        external_data=False,
        dynamo=True,
    )

    proto = onnx.load(out)
    # The exporter annotates nodes and values with debug info (stack traces with
    # absolute source paths); drop it so the file does not depend on the machine.
    for items in (
        proto.graph.node,
        proto.graph.value_info,
        proto.graph.input,
        proto.graph.output,
        proto.graph.initializer,
    ):
        for item in items:
            del item.metadata_props[:]
    meta = {
        "window_level": f"{WL:g}",
        "window_width": f"{WW:g}",
        "inference_config": json.dumps(INFERENCE_CONFIG),
        "labels": json.dumps({name: value for value, name in enumerate(CLASS_NAMES)}),
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, out)


def verify(weights: Path, onnx_path: Path, shape: tuple[int, ...] = (1, 1, 24, 48, 80)) -> float:
    """Max |onnxruntime - torch| on a random input whose shape differs from the export example."""
    model = UNet3D(num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x})
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return float(np.abs(got - expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--weights", type=Path, default=DEMO_DIR / "unet.pth", help="default: %(default)s")
    add("--out", type=Path, default=DEMO_DIR / "model.onnx", help="default: %(default)s")
    args = parser.parse_args()

    torch.set_num_threads(2)
    export(args.weights, args.out)
    err = verify(args.weights, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    print(f"max |onnxruntime - torch| = {err:.2e}")
    if err > 1e-4:
        raise SystemExit("ONNX output does not match torch")


if __name__ == "__main__":
    main()
