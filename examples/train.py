"""Train the demo U-Net on synthetic phantoms (CPU, a few minutes).

Every training sample is a fresh phantom (seeds ``FIRST_SEED`` and up, so the
demo and test seeds below 1000 are never seen) of random size, windowed with
``WL``/``WW``, randomly cropped to ``PATCH_ZYX`` and randomly flipped along
each axis (flips make the model indifferent to the axis directions an input
may have after reorientation). Loss: cross-entropy plus soft Dice; Adam with a
cosine learning-rate decay. All randomness is seeded, so a rerun reproduces
the weights (bitwise only on the same machine and torch build).

Writes a plain state dict (tensors only; loadable with
``torch.load(path, weights_only=True)``).

Run from the repository root::

    python examples/train.py                       # -> examples/demo/unet.pth
    python examples/train.py --steps 50 --out unet_quick.pth
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.phantoms import NUM_CLASSES, apply_window, make_phantom
from examples.unet import UNet3D

PATCH_ZYX: tuple[int, int, int] = (32, 64, 64)
FIRST_SEED: int = 1000
DEFAULT_OUT = Path(__file__).resolve().parent / "demo" / "unet.pth"

# Phantom sizes drawn per sample (inclusive ranges): varying the field of view
# varies organ sizes in voxels, since phantom shapes scale with it.
_SIZE_Z = (32, 48)
_SIZE_YX = (64, 112)


def sample_batch(
    rng: np.random.Generator, first_seed: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed patches ``(B, 1, *PATCH_ZYX)`` float32 and labels ``(B, *PATCH_ZYX)`` int64."""
    images, labels = [], []
    for b in range(batch_size):
        size = (
            int(rng.integers(_SIZE_Z[0], _SIZE_Z[1] + 1)),
            int(rng.integers(_SIZE_YX[0], _SIZE_YX[1] + 1)),
            int(rng.integers(_SIZE_YX[0], _SIZE_YX[1] + 1)),
        )
        image, label = make_phantom(first_seed + b, size_zyx=size)
        hu, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
        corner = [int(rng.integers(0, n - p + 1)) for n, p in zip(size, PATCH_ZYX, strict=True)]
        crop = tuple(slice(c, c + p) for c, p in zip(corner, PATCH_ZYX, strict=True))
        hu, lab = hu[crop], lab[crop]
        flip_axes = tuple(ax for ax in range(3) if rng.random() < 0.5)
        images.append(np.flip(apply_window(hu), flip_axes))
        labels.append(np.flip(lab, flip_axes))
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images)[:, None]))
    y = torch.from_numpy(np.ascontiguousarray(np.stack(labels))).long()
    return x, y


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, pooled over the batch."""
    probs = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].to(probs.dtype)
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


def train(steps: int = 400, batch_size: int = 4, lr: float = 3e-3, seed: int = 0) -> UNet3D:
    """Train a fresh ``UNet3D`` and return it (in eval mode)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = UNet3D(num_classes=NUM_CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.02)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        x, y = sample_batch(rng, FIRST_SEED + step * batch_size, batch_size)
        logits = model(x)
        loss = F.cross_entropy(logits, y) + soft_dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:4d}  loss {loss.item():.4f}  {elapsed:6.1f} s", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", type=Path, default=DEFAULT_OUT, help="state dict to write (default: %(default)s)")
    add("--steps", type=int, default=400, help="optimizer steps (default: %(default)s)")
    add("--batch-size", type=int, default=4, help="patches per step (default: %(default)s)")
    add("--lr", type=float, default=3e-3, help="initial Adam learning rate (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of init and sampling (default: %(default)s)")
    add("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = train(args.steps, args.batch_size, args.lr, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
