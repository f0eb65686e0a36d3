"""Package the demo U-Net weights as an MMEngine checkpoint, laid out like a training run's.

Reads ``examples/demo/unet.pth`` (a plain ``UNet3D`` state dict, see ``train.py``) and writes
``examples/demo/mmengine_checkpoint.pth`` for ``examples/demo/mmengine_config.py``, with the
same keys and kinds of objects that MMEngine's ``Runner.save_checkpoint`` (called by
``CheckpointHook``) writes:

* ``meta``: ``epoch``, ``iter``, ``cfg`` (the config text), ``seed``, ``experiment_name``,
  ``time``, ``mmengine_version``, ``dataset_meta`` (class names, and numpy values: nominal
  CT numbers per class, the intensity window);
* ``state_dict``: the ``DemoSegmentor`` weights (``backbone.`` + the U-Net's names), the
  tensors of ``unet.pth`` unchanged;
* ``message_hub``: ``MessageHub.state_dict()``: logged scalars (``HistoryBuffer`` objects
  holding numpy arrays) and runtime info with numpy scalars (``eta``, ``best_score``: the
  mean foreground Dice on a validation phantom);
* ``optimizer``: AdamW state after one training step, taken on a copy of the model so
  the saved weights stay those of ``unet.pth``;
* ``param_schedulers``: MMEngine ``LinearLR`` + ``CosineAnnealingLR`` states.

It is saved with ``mmengine.runner.checkpoint.save_checkpoint`` (what the Runner uses), then
read back with itk_infer's safe loader and checked against the U-Net. Bookkeeping values
(iteration, time stamp) are fixed so that a rerun gives the same content.

Run from the repository root::

    python examples/make_mmengine_checkpoint.py [--weights PTH] [--config PY] [--out PTH]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mmengine
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.optim import CosineAnnealingLR, LinearLR
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu

from examples.dice import dice_per_label
from examples.phantoms import CLASS_HU, CLASS_NAMES, NUM_CLASSES, WL, WW, make_phantom
from examples.unet import UNet3D

DEMO_DIR = Path(__file__).resolve().parent / "demo"
VALIDATION_SEED = 999  # below train.py's FIRST_SEED, so never seen in training
EXPERIMENT = "demo_unet"
TIMESTAMP = "20250101_000000"


def windowed(image: sitk.Image) -> torch.Tensor:
    """HU image -> (1, 1, Z, Y, X) float32 in [0, 1] with the demo window."""
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    low = WL - WW / 2
    return torch.from_numpy(np.clip((hu - low) / WW, 0.0, 1.0))[None, None]


def validation_dice(model: torch.nn.Module) -> np.float64:
    """Mean foreground Dice of ``model`` on one phantom exactly one training patch big."""
    image, truth = make_phantom(VALIDATION_SEED, size_zyx=(32, 64, 64))
    model.eval()
    with torch.inference_mode():
        pred = model(windowed(image), mode="predict")[0].numpy()
    scores = dice_per_label(pred, sitk.GetArrayFromImage(truth), range(1, NUM_CLASSES))
    return np.mean(list(scores.values()))


def optimizer_state(model: torch.nn.Module, hub: MessageHub) -> tuple[dict, list[dict]]:
    """AdamW and scheduler states after one step on a copy of ``model``; logs it in ``hub``."""
    trainee = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-3, weight_decay=1e-4)
    schedulers = [
        LinearLR(optimizer, start_factor=0.1, by_epoch=False, begin=0, end=50),
        CosineAnnealingLR(optimizer, T_max=950, by_epoch=False, begin=50, end=1000),
    ]
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((2, 1, 32, 64, 64), generator=generator)
    labels = (x[:, 0] * NUM_CLASSES).long().clamp_(max=NUM_CLASSES - 1)
    loss = trainee(x, labels, mode="loss")["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for scheduler in schedulers:
        scheduler.step()
    hub.update_scalar("train/lr", optimizer.param_groups[0]["lr"])
    hub.update_scalar("train/loss", loss.item())
    return optimizer.state_dict(), [s.state_dict() for s in schedulers]


def build_checkpoint(weights: Path, config: Path) -> tuple[dict, torch.nn.Module]:
    cfg = Config.fromfile(str(config))  # imports examples.mmengine_model (custom_imports)
    model = MODELS.build(cfg.model)
    unet = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(OrderedDict((f"backbone.{k}", v) for k, v in unet.items()))

    meta = {
        "epoch": 0,
        "iter": 1,
        "cfg": cfg.pretty_text,
        "seed": 0,
        "experiment_name": f"{EXPERIMENT}_{TIMESTAMP}",
        "time": TIMESTAMP,
        "mmengine_version": mmengine.__version__,
        # What the training dataset's ``metainfo`` holds (the Runner stores it as is).
        "dataset_meta": {
            "classes": CLASS_NAMES,
            "class_hu": np.asarray(CLASS_HU, dtype=np.int16),
            "window": (np.float32(WL), np.float32(WW)),
        },
    }
    hub = MessageHub.get_instance("make_mmengine_checkpoint")
    for key in ("cfg", "seed", "experiment_name", "mmengine_version"):
        hub.update_info(key, meta[key])
    optimizer, schedulers = optimizer_state(model, hub)
    best = validation_dice(model)
    hub.update_scalar("val/mDice", float(best))
    hub.update_info("iter", 1)
    hub.update_info("epoch", 0)
    hub.update_info("eta", np.float64(0.0))
    hub.update_info("best_score", best)
    hub.update_info("best_ckpt", "mmengine_checkpoint.pth")
    checkpoint = {
        "meta": meta,
        "state_dict": weights_to_cpu(get_state_dict(model)),
        "message_hub": hub.state_dict(),
        "optimizer": optimizer,
        "param_schedulers": schedulers,
    }
    return checkpoint, model


def verify(out: Path, weights: Path, config: Path) -> float:
    """Load ``out`` the way itk_infer does; max |segmentor - UNet3D| on a random input."""
    from itk_infer.backends.mmengine import MMEngineBackend

    backend = MMEngineBackend(config, out, device=torch.device("cpu"))
    unet = UNet3D(num_classes=NUM_CLASSES)
    unet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    unet.eval()
    x = torch.rand((1, 1, 24, 48, 80), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = unet(x)
    return float((backend.forward(x) - expected).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--weights", type=Path, default=DEMO_DIR / "unet.pth", help="default: %(default)s")
    add("--config", type=Path, default=DEMO_DIR / "mmengine_config.py",
        help="default: %(default)s")
    add("--out", type=Path, default=DEMO_DIR / "mmengine_checkpoint.pth",
        help="default: %(default)s")
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    checkpoint, _ = build_checkpoint(args.weights, args.config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, str(args.out))
    err = verify(args.out, args.weights, args.config)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    best = float(checkpoint["message_hub"]["runtime_info"]["best_score"])
    print(f"validation mean Dice {best:.3f}")
    print(f"max |mmengine backend - UNet3D| = {err:.2e}")
    if err > 1e-6:
        raise SystemExit("the MMEngine checkpoint does not reproduce the U-Net")


if __name__ == "__main__":
    main()
