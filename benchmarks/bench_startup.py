"""Start-up cost of ``itk_infer``: ``--help``, what the imports cost, the time from process
start to the first model forward, and a 4-case run against the bare model forward.

1. ``--help``: wall time of ``python -m itk_infer --help``, median of ``--repeats`` runs.
2. Imports: ``python -X importtime -c "import itk_infer.cli"`` (the ``--help`` path) and
   ``... "import itk_infer.runner"`` (a run), cumulative milliseconds of the heavy modules.
3. First forward and whole run: ``--cases`` phantoms (``bench_runner.write_phantoms``, default
   4 of 96 x 160 x 160) and the demo model, stride = patch (27 windows a case in 15 forward
   calls of 2). Each repeat measures (b) the bare onnxruntime forward over exactly the
   engine's windows and batches (``bench_runner.bare_forward_seconds``) and then runs the
   command once per source tree; the ratio (a)/(b) is taken within the repeat, then the
   median over repeats. The first forward is seen from outside: a ``sitecustomize`` module
   put first on the path notes the wall clock at the first ``InferenceSession.run`` of each
   process (any thread; the worker processes too), so trees without start-up logging are
   measured the same way. CPU time: of the command and its workers (``RUSAGE_CHILDREN``), and
   of this process over the bare forwards; the run's CPU time over the cores is the least
   wall time it can take, whence the least ratio it allows.

``--tree NAME=PATH`` (repeatable) names source trees to compare, e.g. a clean
``git worktree`` of the last commit as ``before`` and ``.`` as ``after``; default: this tree.
``--variant NAME=ARGS`` (repeatable) runs each tree with more command-line arguments, e.g.
``--variant worker= --variant "in-process=--in-process"``; default: the plain command.
Run from the repository root: ``python benchmarks/bench_startup.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import DEMO_MODEL, bare_forward_seconds, machine, write_phantoms  # noqa: E402

HEAVY = ("itk_infer.cli", "itk_infer.runner", "torch", "onnxruntime", "SimpleITK", "numpy",
         "pandas", "zarr", "dagster")

# Imported by every Python process of a run (as ``sitecustomize``): prints the wall clock of
# the process's first model forward.
HOOK = '''
import importlib.abc, importlib.util, os, sys, threading, time

TARGET = "onnxruntime.capi.onnxruntime_inference_collection"
seen = threading.Lock()


class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            run = module.InferenceSession.run

            def first_run(self, *args, **kwargs):
                if seen.acquire(blocking=False):
                    os.write(2, f"FIRST_FORWARD {time.time():.6f}\\n".encode())
                return run(self, *args, **kwargs)

            module.InferenceSession.run = first_run

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Hook())
'''


def _env(tree: Path, hook: Path | None = None) -> dict[str, str]:
    """The environment that makes ``tree``'s ``itk_infer`` the imported one (and ``hook``'s
    ``sitecustomize``)."""
    path = str(tree) if hook is None else f"{hook}{os.pathsep}{tree}"
    return {**os.environ, "PYTHONPATH": path}


def help_seconds(tree: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "itk_infer", "--help"], cwd=tree, env=_env(tree),
                       capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def import_costs(tree: Path, module: str) -> dict[str, float]:
    """Cumulative import milliseconds of the ``HEAVY`` modules that ``import module`` loads."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                            cwd=tree, env=_env(tree), capture_output=True, text=True, check=True)
    costs = {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)$", line)
        if match and match[2] in HEAVY and match[2] not in costs:
            costs[match[2]] = int(match[1]) / 1000
    return costs


def one_run(tree: Path, hook: Path, folder: Path, out: Path, model: Path,
            stride: list[int], extra: list[str]) -> tuple[float, float, float]:
    """Wall seconds of the whole command, seconds from its start to the first forward, and
    CPU seconds of the command's processes (its workers included: it waits for them)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "itk_infer", "-i", str(folder), "-o", str(out),
           "--onnx", str(model), "--device", "cpu", "--no-progress",
           "--patch-stride", *map(str, stride), *extra]
    started = time.time()
    c0 = _children_cpu()
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=tree, env=_env(tree, hook), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - c0
    if result.returncode != 0:
        raise SystemExit(f"itk_infer ({tree}) failed ({result.returncode}):\n{result.stderr}")
    firsts = [float(t) for t in re.findall(r"FIRST_FORWARD (\S+)", result.stderr)]
    if not firsts:
        raise SystemExit(f"no forward seen in the run of {tree}:\n{result.stderr}")
    return wall, min(firsts) - started, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=3, default=(96, 160, 160),
                        metavar=("Z", "Y", "X"))
    parser.add_argument("--patch-stride", type=int, nargs=3, default=(32, 64, 64),
                        metavar=("Z", "Y", "X"))
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS")
    args = parser.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree) or {"this tree": str(ROOT)}
    trees = {name: Path(path).resolve() for name, path in trees.items()}
    variants = {name: extra.split() for name, extra in
                (v.split("=", 1) for v in args.variant)} or {"": []}
    runs = {f"{tree} {variant}".strip(): (tree, extra) for tree in trees
            for variant, extra in variants.items()}
    stride = list(args.patch_stride)
    info = machine()

    print("| tree | --help, s | import itk_infer.cli, ms | import itk_infer.runner, ms "
          "| of which torch / onnxruntime / SimpleITK / numpy, ms |")
    print("|---|---|---|---|---|")
    for name, tree in trees.items():
        cli, run = import_costs(tree, "itk_infer.cli"), import_costs(tree, "itk_infer.runner")
        parts = " / ".join(f"{run.get(m, 0):.0f}" for m in ("torch", "onnxruntime",
                                                              "SimpleITK", "numpy"))
        extra = [m for m in ("pandas", "zarr", "dagster") if m in cli or m in run]
        print(f"| {name} | {help_seconds(tree, args.repeats):.2f} "
              f"| {cli.get('itk_infer.cli', 0):.0f} | {run.get('itk_infer.runner', 0):.0f} "
              f"| {parts}{' (also ' + ', '.join(extra) + ')' if extra else ''} |")

    walls: dict[str, list[float]] = {name: [] for name in runs}
    firsts: dict[str, list[float]] = {name: [] for name in runs}
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    bares, bare_cpus = [], []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        folder, hook = Path(tmp) / "in", Path(tmp) / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(HOOK)
        write_phantoms(folder, args.cases, tuple(args.size))
        for repeat in range(args.repeats):
            bare, bare_cpu, windows, calls = bare_forward_seconds(folder, args.model, stride,
                                                                   "cpu")
            bares.append(bare)
            bare_cpus.append(bare_cpu)
            for name, (tree, extra) in runs.items():
                wall, first, cpu = one_run(trees[tree], hook, folder, Path(tmp) / "out",
                                           args.model, stride, extra)
                walls[name].append(wall)
                cpus[name].append(cpu)
                firsts[name].append(first)
                ratios[name].append(wall / bare)
                print(f"repeat {repeat + 1}: {name}: run {wall:.2f} s, first forward "
                      f"{first:.2f} s, CPU {cpu:.2f} s, bare forward {bare:.2f} s "
                      f"(CPU {bare_cpu:.2f} s)", file=sys.stderr)

    print(f"\n`benchmarks/bench_startup.py` on {info['cpu']}, {info['nproc']} cores, "
          f"{info['date']}, load average {info['load']} at the start. {args.cases} phantoms of "
          f"{' x '.join(map(str, args.size))}, demo model, stride {' x '.join(map(str, stride))}"
          f" ({windows} windows in {calls} forward calls); medians of {args.repeats} "
          "repeats, the ratio taken within each repeat.\n")
    print("| tree | process start → first forward, s | whole run (a), s | bare forward (b), s "
          "| (a)/(b) | (a)/(b) min..max | CPU of (a), s | CPU of (b), s "
          "| (a)'s CPU / cores / (b) |")
    print("|---|---|---|---|---|---|---|---|---|")
    cores = os.cpu_count() or 1
    for name in runs:
        print(f"| {name} | {statistics.median(firsts[name]):.2f} "
              f"| {statistics.median(walls[name]):.2f} | {statistics.median(bares):.2f} "
              f"| {statistics.median(ratios[name]):.2f} "
              f"| {min(ratios[name]):.2f}..{max(ratios[name]):.2f} "
              f"| {statistics.median(cpus[name]):.1f} | {statistics.median(bare_cpus):.1f} "
              f"| {statistics.median(cpus[name]) / cores / statistics.median(bares):.2f} |")
    print(f"\nThe last column is the least (a)/(b) the run's CPU time allows on {cores} cores.")


if __name__ == "__main__":
    main()
