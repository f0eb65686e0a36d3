"""The ``itk_infer`` command: arguments → settings → runner; logging; exit codes.

Exit codes: 0 every case done or skipped, 1 some case failed, 2 usage error (bad arguments,
no inputs, unusable model), 130 interrupted (rerunning resumes).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from itk_infer import __version__
from itk_infer.errors import ItkInferError, UsageError

log = logging.getLogger("itk_infer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itk_infer",
        description=(
            "Run a 3-D segmentation model over every *.mha, *.nii and *.nii.gz image of a "
            "folder with sliding-window inference; write LPI label maps (and optionally "
            "logits and confidences). Rerunning skips finished cases."
        ),
        epilog="Exit codes: 0 ok, 1 some case failed, 2 usage error, 130 interrupted.",
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("-i", "--input-folder", required=True, type=Path,
                    help="folder with the input images (not searched recursively)")
    io.add_argument("-o", "--output", required=True, type=Path,
                    help="output folder; segmentations keep the input file names")
    io.add_argument("--save-logits", action="store_true",
                    help="also write <case>.zarr: blended logits (C, Z, Y, X), float16")
    io.add_argument("--save-conf", action="store_true",
                    help="also write confidences.xlsx: mean normalised-entropy confidence")
    io.add_argument("--overwrite", action="store_true",
                    help="redo cases that are already complete")
    io.add_argument("--report", type=Path, metavar="PATH",
                    help="write the run summary as JSON to PATH")

    model = parser.add_argument_group("model")
    model.add_argument("--backend", choices=("mmengine", "onnx"), default="onnx",
                       help="model format (default: onnx)")
    model.add_argument("--onnx", type=Path, metavar="MODEL.onnx", help="ONNX model file")
    model.add_argument("-cfg", "--cfg-path", type=Path, metavar="CONFIG.py",
                       help="MMEngine config file")
    model.add_argument("-ckpt", "--ckpt-path", type=Path, metavar="CHECKPOINT.pth",
                       help="MMEngine checkpoint file")
    model.add_argument("--trust-checkpoint", action="store_true",
                       help="load checkpoints that need arbitrary pickled objects (runs their "
                            "code: only for files you trust)")

    infer = parser.add_argument_group("inference")
    infer.add_argument("--wl", type=float, metavar="LEVEL",
                       help="window level (default: from the model)")
    infer.add_argument("--ww", type=float, metavar="WIDTH",
                       help="window width, > 0 (default: from the model)")
    infer.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"),
                       help="sliding-window patch (default: from the model)")
    infer.add_argument("--patch-stride", type=int, nargs=3, metavar=("Z", "Y", "X"),
                       help="distance between windows, 1..patch (default: model, else patch/2)")
    infer.add_argument("--blend", choices=("gaussian", "constant"), default="gaussian",
                       help="weighting of overlapping windows (default: gaussian)")
    infer.add_argument("--fp16", action="store_true",
                       help="half-precision model on CUDA (ignored on the CPU)")

    run = parser.add_argument_group("devices and processes")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto: CUDA when visible, else CPU")
    run.add_argument("--num-proc", type=int, default=1, metavar="N",
                     help="worker processes (default 1)")
    run.add_argument("--gpus", type=int, default=1, metavar="G",
                     help="GPUs to spread workers over (default 1)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--version", action="version", version=f"itk_infer {__version__}")
    return parser


def settings_from_args(args: argparse.Namespace):
    """Translate parsed arguments into :class:`itk_infer.config.RunSettings`."""
    from itk_infer.config import ModelSpec, OutputOptions, Overrides, RunSettings

    return RunSettings(
        input_folder=args.input_folder,
        output_folder=args.output,
        model=ModelSpec(
            backend=args.backend,
            onnx_path=args.onnx,
            cfg_path=args.cfg_path,
            ckpt_path=args.ckpt_path,
            trust_checkpoint=args.trust_checkpoint,
        ),
        overrides=Overrides(
            window_level=args.wl,
            window_width=args.ww,
            patch_size=args.patch_size,
            patch_stride=args.patch_stride,
            blend=args.blend,
        ),
        outputs=OutputOptions(save_logits=args.save_logits, save_conf=args.save_conf),
        device=args.device,
        fp16=args.fp16,
        overwrite=args.overwrite,
        num_proc=args.num_proc,
        gpus=args.gpus,
        report_path=args.report,
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def _configure_logging(verbosity: int) -> None:
    level = logging.INFO if verbosity <= 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("itk_infer")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Library chatter stays out of a normal run.
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (also used as the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        from itk_infer.runner import run_batch

        settings = settings_from_args(args)
        summary = run_batch(settings)
    except UsageError as error:
        print(f"itk_infer: error: {error}", file=sys.stderr)
        return error.exit_code
    except ItkInferError as error:
        print(f"itk_infer: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("itk_infer: interrupted; no partial output was kept. Rerun the same command "
              "to resume.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    for outcome in summary.failed:
        print(f"FAILED {outcome.case}: {outcome.reason}", file=sys.stderr)
    print(f"{summary.headline()} ({summary.wall_seconds:.1f} s) -> {settings.output_folder}")
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
