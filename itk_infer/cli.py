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

from itk_infer import __version__, prestart
from itk_infer.config import Settings, add_arguments, describe_settings, settings_from_args
from itk_infer.errors import ItkInferError, UsageError
from itk_infer.spawn import skip_final_collection

log = logging.getLogger("itk_infer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itk_infer",
        description=(
            "Run a 3-D segmentation model over every *.mha, *.nii and *.nii.gz image of a "
            "folder with sliding-window inference; write LPI label maps (and optionally "
            "logits and confidences). Rerunning skips finished cases."
        ),
        epilog="Exit codes: 0 ok, 1 some case failed, 2 usage error, 130 interrupted. "
        "'itk_infer serve --help': the inference server for 3D Slicer.",
    )
    # Every setting's option comes from the schema (itk_infer.config.Settings).
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"itk_infer {__version__}")
    return parser


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


def _settings(args: argparse.Namespace) -> Settings:
    settings = settings_from_args(args)
    # A bar on a terminal only: log files get one line per case instead.
    settings = settings.replace(progress=settings.progress and sys.stderr.isatty())
    for line in describe_settings(settings):
        log.debug("setting %s", line)
    return settings


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (also used as the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the server has its own options (itk_infer.server.cli)
        from itk_infer.server.cli import main as serve

        return serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    warm = None
    try:
        settings = _settings(args)
        from itk_infer.warmstart import begin

        # The worker process (default) or, in this process, the model's first forwards start
        # while the runner's imports (torch) load.
        prestart.begin(settings)
        warm = begin(settings)
        from itk_infer.runner import run_batch  # after parsing: --help needs no torch

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
        if warm is not None:
            warm.close()
        prestart.close()  # a worker the run did not take
    for outcome in summary.failed:
        print(f"FAILED {outcome.case}: {outcome.reason}", file=sys.stderr)
    print(f"{summary.headline()} ({summary.wall_seconds:.1f} s) -> {settings.output_folder}")
    return summary.exit_code


def console() -> int:
    """The console script and ``python -m itk_infer``: :func:`main`, then an exit that skips
    the interpreter's last walk over every object (see ``spawn.skip_final_collection``)."""
    code = main()
    skip_final_collection()
    return code


if __name__ == "__main__":
    sys.exit(console())
