"""Write the bundled demo cases and their truth label maps.

One phantom per orientation and file format, from seeds that training never
uses (training starts at seed 1000):

==========================  ===========  ====
file                        orientation  seed
==========================  ===========  ====
``images/case_01.mha``      LPI          1
``images/case_02.nii.gz``   RAS          2
``images/case_03.nii``      oblique      3
==========================  ===========  ====

The label maps go to ``labels/`` under the same file names. Images are int16
HU, labels uint8 (see ``examples.phantoms.CLASS_NAMES``).

Run from the repository root::

    python examples/make_demo_data.py [--out-dir DIR]   # default: examples/demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.phantoms import make_phantom

DEMO_CASES: tuple[tuple[str, str, int], ...] = (
    ("case_01.mha", "LPI", 1),
    ("case_02.nii.gz", "RAS", 2),
    ("case_03.nii", "oblique", 3),
)


def write_demo_data(out_dir: Path) -> list[Path]:
    """Write every demo image and label map under ``out_dir``; return the paths written."""
    written = []
    for name, orientation, seed in DEMO_CASES:
        image, labels = make_phantom(seed, orientation=orientation)
        for sub, img in (("images", image), ("labels", labels)):
            path = out_dir / sub / name
            path.parent.mkdir(parents=True, exist_ok=True)
            # Compression applies to .mha (and is implied by .nii.gz); plain .nii ignores it.
            sitk.WriteImage(img, str(path), useCompression=True)
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "demo",
        help="default: %(default)s",
    )
    args = parser.parse_args()
    for path in write_demo_data(args.out_dir):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
