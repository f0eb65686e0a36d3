"""The settings schema: the one place where each setting's name, type, default, validation,
help text, command-line flags, environment variable and part in the resume fingerprint are
written.

Everything else is derived from :class:`Settings`: the command line's options
(:func:`add_arguments`), the Dagster resource's fields and the ``ITK_INFER_*`` variables
(:func:`settings_from_env`), the ``settings`` stored in each record and compared on resume
(:meth:`Settings.fingerprint`), the ``-vv`` description (:func:`describe_settings`) and the
variable lists of the deployment files (checked by a test). Adding a setting is one field
below plus the code that uses it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from itk_infer.errors import UsageError

Triple = tuple[int, int, int]

# Command-line option groups, in the order --help shows them.
GROUPS = {
    "io": "input and output",
    "model": "model",
    "inference": "inference",
    "devices": "devices and processes",
    "dagster": "Dagster deployment (environment only)",
}

# ITK_INFER_* variables of the deployment files that are not settings of the program: they
# configure the containers around it (image tag, code server address, data volume).
DEPLOYMENT_VARIABLES = {
    "ITK_INFER_IMAGE": "image of the code server and of each run's container",
    "ITK_INFER_CODE_SERVER_HOST": "where the webserver and daemon reach the code server",
    "ITK_INFER_CODE_SERVER_PORT": "the code server's port",
    "ITK_INFER_DATA": "host folder mounted as /data (compose only)",
}


@dataclass(frozen=True)
class Spec:
    """How one setting is typed, checked and exposed."""

    kind: str  # path, text, choice, bool, float, int, triple, spacing
    help: str
    group: str
    flags: tuple[str, ...] = ()  # command-line spellings; none: not on the command line
    env: str | None = None  # environment variable; none: not configurable in a deployment
    fingerprint: bool = False  # decides the numbers: stored in records, compared on resume
    # A fingerprint setting added after records existed: stored only when not at its default,
    # so that outputs made before it was added stay "done" on resume.
    recorded_if_set: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # for numbers: the smallest allowed value
    positive: bool = False  # for floats: must be > 0
    metavar: str | None = None
    required: bool = False  # on the command line
    negated: bool = False  # a bool whose flag turns it off (--no-progress)

    @property
    def label(self) -> str:
        """How messages name the setting: its long flag, else its variable."""
        longs = [f for f in self.flags if f.startswith("--")]
        return longs[0] if longs else (self.env or "")


def setting(default: Any, kind: str, help: str, group: str, **spec: Any) -> Any:
    """A :class:`Settings` field with its :class:`Spec`."""
    return field(default=default, metadata={"spec": Spec(kind, help, group, **spec)})


@dataclass(frozen=True)
class Settings:
    """Every setting of a run. Values are checked and normalised when built (``Path`` for
    paths, ``(Z, Y, X)`` tuples for triples); a bad value raises :class:`UsageError`."""

    # --- input and output
    input_folder: Path | None = setting(
        None, "path", "folder with the input images (not searched recursively)", "io",
        flags=("-i", "--input-folder"), required=True)
    output_folder: Path | None = setting(
        None, "path", "output folder; segmentations keep the input file names", "io",
        flags=("-o", "--output"), required=True)
    save_logits: bool = setting(
        False, "bool", "also write <case>.zarr: blended logits (C, Z, Y, X), float16", "io",
        flags=("--save-logits",))
    save_conf: bool = setting(
        False, "bool", "also write confidences.xlsx: mean normalised-entropy confidence", "io",
        flags=("--save-conf",))
    overwrite: bool = setting(
        False, "bool", "redo cases that are already complete", "io", flags=("--overwrite",))
    report_path: Path | None = setting(
        None, "path", "write the run summary as JSON to PATH", "io", flags=("--report",),
        metavar="PATH")
    progress: bool = setting(
        True, "bool", "no progress bar", "io", flags=("--no-progress",), negated=True)

    # --- model
    backend: str = setting(
        "onnx", "choice", "model format (default: onnx)", "model", flags=("--backend",),
        env="ITK_INFER_BACKEND", fingerprint=True, choices=("onnx", "mmengine"))
    onnx_path: Path | None = setting(
        None, "path", "ONNX model file", "model", flags=("--onnx",), env="ITK_INFER_ONNX",
        metavar="MODEL.onnx")
    cfg_path: Path | None = setting(
        None, "path", "MMEngine config file", "model", flags=("-cfg", "--cfg-path"),
        env="ITK_INFER_CFG", metavar="CONFIG.py")
    ckpt_path: Path | None = setting(
        None, "path", "MMEngine checkpoint file", "model", flags=("-ckpt", "--ckpt-path"),
        env="ITK_INFER_CKPT", metavar="CHECKPOINT.pth")
    trust_checkpoint: bool = setting(
        False, "bool", "load checkpoints that need arbitrary pickled objects (runs their code: "
        "only for files you trust)", "model", flags=("--trust-checkpoint",),
        env="ITK_INFER_TRUST_CHECKPOINT")

    # --- inference (None: the model's default)
    window_level: float | None = setting(
        None, "float", "window level (default: from the model)", "inference", flags=("--wl",),
        env="ITK_INFER_WL", fingerprint=True, metavar="LEVEL")
    window_width: float | None = setting(
        None, "float", "window width, > 0 (default: from the model)", "inference",
        flags=("--ww",), env="ITK_INFER_WW", fingerprint=True, positive=True, metavar="WIDTH")
    patch_size: Triple | None = setting(
        None, "triple", "sliding-window patch (default: from the model)", "inference",
        flags=("--patch-size",), env="ITK_INFER_PATCH_SIZE", fingerprint=True)
    patch_stride: Triple | None = setting(
        None, "triple", "distance between windows, 1..patch (default: model, else patch/2)",
        "inference", flags=("--patch-stride",), env="ITK_INFER_PATCH_STRIDE", fingerprint=True)
    blend: str = setting(
        "gaussian", "choice", "weighting of overlapping windows (default: gaussian)",
        "inference", flags=("--blend",), env="ITK_INFER_BLEND", fingerprint=True,
        choices=("gaussian", "constant"))
    fp16: bool = setting(
        False, "bool", "half-precision model on CUDA (ignored on the CPU)", "inference",
        flags=("--fp16",), env="ITK_INFER_FP16", fingerprint=True)
    output_space: str = setting(
        "lpi", "choice", "grid of the label maps: lpi (the input reoriented to LPI, the "
        "default) or input (voxel-aligned with the input file: same size, spacing, origin, "
        "direction, array order); --save-logits follows it", "io", flags=("--output-space",),
        env="ITK_INFER_OUTPUT_SPACE", fingerprint=True, recorded_if_set=True,
        choices=("lpi", "input"))
    spacing: tuple[float, float, float] | None = setting(
        None, "spacing", "run the model at this voxel spacing in mm, Z Y X of the LPI volume "
        "(default: the model's 'spacing', else the image's own): the image is resampled "
        "linearly, the logits resampled back to the input's grid slab by slab",
        "inference", flags=("--spacing",), env="ITK_INFER_SPACING", fingerprint=True,
        recorded_if_set=True)
    tta: bool = setting(
        False, "bool", "test-time mirroring: average the logits over the 8 mirror images of "
        "each window (8x the model's work)", "inference", flags=("--tta",),
        env="ITK_INFER_TTA", fingerprint=True, recorded_if_set=True)
    resample_oblique: bool = setting(
        False, "bool", "resample oblique images onto an axis-aligned LPI grid covering them "
        "(linear; always done when a model spacing is set) instead of only permuting their "
        "axes to the nearest LPI order", "inference", flags=("--resample-oblique",),
        env="ITK_INFER_RESAMPLE_OBLIQUE", fingerprint=True, recorded_if_set=True)
    oblique_warn_deg: float = setting(
        1.0, "float", "warn about images whose axes are tilted more than this many degrees "
        "from the nearest world axes", "inference", flags=("--oblique-warn-deg",),
        env="ITK_INFER_OBLIQUE_WARN_DEG", minimum=0, metavar="DEGREES")
    nonfinite: str = setting(
        "fail", "choice", "input voxels that are NaN or infinite: fail the case (default), or "
        "replace them (NaN and -inf: the window's low end, +inf: its high end) with a warning",
        "inference", flags=("--nonfinite",), env="ITK_INFER_NONFINITE",
        choices=("fail", "replace"))

    # --- devices and processes
    device: str = setting(
        "auto", "choice", "auto: CUDA when visible, else CPU", "devices", flags=("--device",),
        env="ITK_INFER_DEVICE", choices=("auto", "cpu", "cuda"))
    num_proc: int = setting(
        1, "int", "worker processes (default 1)", "devices", flags=("--num-proc",),
        minimum=1, metavar="N")
    case_timeout: float | None = setting(
        None, "float", "fail a case that spends longer than this in one step (reading, the "
        "model, writing) and go on; cases then run in a worker process, which is killed",
        "devices", flags=("--case-timeout",), env="ITK_INFER_CASE_TIMEOUT", positive=True,
        metavar="SECONDS")
    in_process: bool = setting(
        False, "bool", "run the cases in this process rather than in one worker process that "
        "is replaced after a crash in a native library (that case fails, the others run); "
        "only with one worker and no --case-timeout (for debuggers and profilers)", "devices",
        flags=("--in-process",))
    cpu_fallback: bool = setting(
        True, "bool", "a case that runs out of GPU memory even with the slab on the host and "
        "one window per batch is not run on the CPU (it fails)", "devices",
        flags=("--no-cpu-fallback",), env="ITK_INFER_CPU_FALLBACK", negated=True)
    gpus: int = setting(
        0, "int", "how many of the visible GPUs to use (default 0: all of them); with CUDA the "
        "command line runs max(--num-proc, GPUs) workers", "devices", flags=("--gpus",),
        env="ITK_INFER_GPUS", minimum=0, metavar="G")

    # --- Dagster deployment
    watch_root: str = setting(
        "", "text", "folder the sensor watches; partition keys are image paths relative to "
        "it", "dagster", env="ITK_INFER_WATCH_ROOT")
    output_root: str = setting(
        "", "text", "outputs mirror the relative folders of the keys below this folder",
        "dagster", env="ITK_INFER_OUTPUT_ROOT")
    lease_dir: str = setting(
        "", "text", "folder of the GPU lease files (default: <tmp>/itk_infer-gpu-leases; "
        "must be shared by all steps on one host)", "dagster", env="ITK_INFER_LEASE_DIR")
    sensor_logits: bool = setting(
        False, "bool", "runs requested by the folder sensor also build the logits asset",
        "dagster", env="ITK_INFER_SENSOR_LOGITS")
    preview: bool = setting(
        True, "bool", "draw the PNG preview of each case in the asset's metadata", "dagster",
        env="ITK_INFER_PREVIEW")
    run_batch: int = setting(
        32, "int", "new images per run started by the folder sensor (one model load each)",
        "dagster", env="ITK_INFER_RUN_BATCH", minimum=1)
    qc_min_confidence: float | None = setting(
        None, "float", "QC check: a segmentation with a lower mean confidence needs review",
        "dagster", env="ITK_INFER_QC_MIN_CONFIDENCE", minimum=0)
    qc_volumes: str = setting(
        "", "text", 'QC check: expected labels and volume ranges as JSON, e.g. {"liver": '
        '{"min_ml": 800, "max_ml": 3500}} (default: the model\'s "qc" metadata)', "dagster",
        env="ITK_INFER_QC_VOLUMES")
    sensor_interval: float = setting(
        30.0, "float", "seconds between folder sensor ticks (read when the code location "
        "loads)", "dagster", env="ITK_INFER_SENSOR_INTERVAL", positive=True)
    sensor_settle: float = setting(
        5.0, "float", "a file modified this many seconds ago or less waits a tick", "dagster",
        env="ITK_INFER_SENSOR_SETTLE")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = _check(spec_of(f.name), getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        if self.patch_size is not None and self.patch_stride is not None:
            for p, s in zip(self.patch_size, self.patch_stride, strict=True):
                if s > p:
                    raise UsageError(
                        f"patch stride {list(self.patch_stride)} is larger than patch size "
                        f"{list(self.patch_size)}: windows would leave gaps"
                    )

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``, checked like a new one."""
        return replace(self, **changes)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the numbers, JSON-friendly: stored in each record and
        compared on resume."""
        out = {}
        for f in fields(self):
            spec, value = spec_of(f.name), getattr(self, f.name)
            if spec.fingerprint and not (spec.recorded_if_set and value == f.default):
                out[f.name] = _jsonable(value)
        return out

    def require_model(self) -> None:
        """Raise :class:`UsageError` unless the model files the backend needs are named."""
        if self.backend == "onnx" and self.onnx_path is None:
            raise UsageError("--backend onnx requires --onnx MODEL.onnx")
        if self.backend == "mmengine" and (self.cfg_path is None or self.ckpt_path is None):
            raise UsageError("--backend mmengine requires -cfg CONFIG.py and -ckpt CHECKPOINT.pth")

    @property
    def outputs(self) -> OutputOptions:
        return OutputOptions(save_logits=self.save_logits, save_conf=self.save_conf)

    @property
    def cases_in_process(self) -> bool:
        """``--in-process`` applies: not with ``--case-timeout`` (only a worker process can be
        stopped); the runner also needs a single worker for it."""
        return self.in_process and self.case_timeout is None


def spec_of(name: str) -> Spec:
    """The :class:`Spec` of setting ``name``."""
    return _SPECS[name]


def settings_fields(where: str = "all") -> Iterator[tuple[str, Spec, Any]]:
    """``(name, spec, default)`` of every setting; ``where``: ``"cli"`` (has flags), ``"env"``
    (has a variable) or ``"all"``."""
    for f in fields(Settings):
        spec = spec_of(f.name)
        if where == "all" or (where == "cli" and spec.flags) or (where == "env" and spec.env):
            yield f.name, spec, f.default


# --------------------------------------------------------------------------- checking


def as_triple(values: Sequence[int] | None, what: str) -> Triple | None:
    """Validate a (Z, Y, X) triple of positive integers; ``None`` passes through.

    Examples:
        >>> as_triple([32, 64, 64], "patch size")
        (32, 64, 64)
    """
    if values is None:
        return None
    values = tuple(values)
    if len(values) != 3:
        raise UsageError(f"{what} needs three values (Z Y X), got {list(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise UsageError(f"{what} must be positive integers (Z Y X), got {list(values)}")
        out.append(int(v))
    return (out[0], out[1], out[2])


def as_spacing(values: Sequence[float] | None, what: str) -> tuple[float, float, float] | None:
    """Validate a (Z, Y, X) spacing in mm: three finite numbers > 0; ``None`` passes."""
    if values is None:
        return None
    out = tuple(float(v) for v in values)
    if len(out) != 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise UsageError(f"{what} needs three spacings > 0 in mm (Z Y X), got {list(values)}")
    return (out[0], out[1], out[2])


def _check(spec: Spec, value: Any) -> Any:
    """``value`` normalised to the setting's type, or :class:`UsageError` naming it."""
    label = spec.label
    if spec.kind == "path":
        return Path(value) if value not in (None, "") else None
    if spec.kind == "triple":
        return as_triple(value, label)
    if spec.kind == "spacing":
        return as_spacing(value, label)
    if value is None:
        return None
    if spec.kind == "choice" and value not in spec.choices:
        raise UsageError(f"{label} must be one of {', '.join(spec.choices)}, got {value!r}")
    if spec.kind == "bool":
        return bool(value)
    if spec.kind == "int":
        if isinstance(value, bool) or int(value) != value:
            raise UsageError(f"{label} must be an integer, got {value!r}")
        if spec.minimum is not None and value < spec.minimum:
            raise UsageError(f"{label} must be >= {spec.minimum:g}, got {value}")
        return int(value)
    if spec.kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise UsageError(f"{label} must be a finite number, got {value}")
        if spec.positive and value <= 0:
            raise UsageError(f"{label} must be > 0, got {value}")
        if spec.minimum is not None and value < spec.minimum:
            raise UsageError(f"{label} must be >= {spec.minimum:g}, got {value}")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- faces


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add an option for every setting that has command-line flags, grouped."""
    groups: dict[str, Any] = {}
    for name, spec, default in settings_fields("cli"):
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(GROUPS[spec.group])
        kwargs: dict[str, Any] = {"dest": name, "help": spec.help, "default": default}
        if spec.kind == "bool":
            kwargs["action"] = "store_false" if spec.negated else "store_true"
        elif spec.kind in ("triple", "spacing"):
            kwargs.update(type=int if spec.kind == "triple" else float, nargs=3,
                          metavar=("Z", "Y", "X"))
        elif spec.kind == "choice":
            kwargs["choices"] = spec.choices
        else:
            kwargs["type"] = {"path": Path, "int": int, "float": float}.get(spec.kind, str)
        if spec.metavar:
            kwargs["metavar"] = spec.metavar
        if spec.required:
            kwargs["required"] = True
        groups[spec.group].add_argument(*spec.flags, **kwargs)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings of parsed arguments (those without flags keep their defaults)."""
    return Settings(**{name: getattr(args, name) for name, _spec, _d in settings_fields("cli")})


def parse_env_value(spec: Spec, text: str) -> Any:
    """The value of variable ``spec.env`` set to ``text``; :class:`UsageError` names it."""
    name = spec.env
    stripped = text.strip()
    if spec.kind == "bool":
        if stripped.lower() in ("1", "true", "yes", "on"):
            return True
        if stripped.lower() in ("0", "false", "no", "off", ""):
            return False
        raise UsageError(f"{name}={text!r}: expected 1/0, true/false, yes/no or on/off")
    if spec.kind in ("triple", "spacing"):
        number = int if spec.kind == "triple" else float
        what = "integers" if spec.kind == "triple" else "numbers"
        try:
            values = [number(p) for p in stripped.replace(",", " ").strip("[]").split()]
        except ValueError:
            raise UsageError(f"{name}={text!r}: expected three {what} 'Z Y X'") from None
        if len(values) != 3 or min(values) <= 0:
            raise UsageError(f"{name}={text!r}: expected three positive {what} 'Z Y X'")
        return values
    if spec.kind in ("int", "float"):
        try:
            return int(stripped) if spec.kind == "int" else float(stripped)
        except ValueError:
            kind = "an integer" if spec.kind == "int" else "a number"
            raise UsageError(f"{name}={text!r}: expected {kind}") from None
    return text


def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """``setting → value`` for each ``ITK_INFER_*`` variable that is set. An empty variable
    keeps the default for all but text and path settings (compose files pass ``${X:-}``)."""
    values: dict[str, Any] = {}
    for name, spec, _default in settings_fields("env"):
        text = environ.get(spec.env or "")
        if text is None or (text.strip() == "" and spec.kind not in ("text", "path")):
            continue
        value = parse_env_value(spec, text)
        try:
            _check(spec, value)
        except UsageError as error:
            raise UsageError(f"{spec.env}={text!r}: {error}") from None
        values[name] = value
    return values


def settings_from_env(environ: Mapping[str, str], **base: Any) -> Settings:
    """Settings from the environment, over ``base`` values; a bad value names its variable."""
    values = {**base, **env_values(environ)}
    try:
        return Settings(**values)
    except UsageError as error:
        raise UsageError(f"{error} (from the ITK_INFER_* environment)") from None


def describe_settings(settings: Settings) -> list[str]:
    """One line per setting (``-vv``): value, and where it comes from when not the default."""
    lines = []
    for name, spec, default in settings_fields():
        value = getattr(settings, name)
        where = "default" if value == _check(spec, default) else "set"
        handles = ", ".join([*spec.flags, *([spec.env] if spec.env else [])])
        lines.append(f"{name} = {_jsonable(value)!r} ({where}; {handles or 'internal'})")
    return lines


def deployment_variables() -> set[str]:
    """The variables a deployment forwards to every run: one per configurable setting."""
    return {spec.env for _n, spec, _d in settings_fields("env") if spec.env}


def settings_table() -> str:
    """The README's table of every setting (``python -m itk_infer.config`` prints it)."""
    rows = ["| setting | command line | environment | default | in records | meaning |",
            "|---|---|---|---|---|---|"]
    for name, spec, default in settings_fields():
        flags = ", ".join(f"`{f}`" for f in spec.flags) or "-"
        shown = "-" if default is None or default == "" else f"`{_jsonable(default)}`"
        rows.append(f"| `{name}` | {flags} | {f'`{spec.env}`' if spec.env else '-'} | {shown} "
                    f"| {_recorded(spec)} | {spec.help} |")
    return "\n".join(rows)


def _recorded(spec: Spec) -> str:
    if not spec.fingerprint:
        return ""
    return "if set" if spec.recorded_if_set else "yes"


_SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in fields(Settings)}


# --------------------------------------------------------------------------- resolved views


@dataclass(frozen=True)
class OutputOptions:
    """Which optional outputs to write besides the label maps."""

    save_logits: bool = False
    save_conf: bool = False


@dataclass(frozen=True)
class WindowSettings:
    """Intensity window: clip to [level - width/2, level + width/2], scale to [0, 1].

    Examples:
        >>> WindowSettings(level=40, width=400).bounds
        (-160.0, 240.0)
    """

    level: float
    width: float

    @property
    def bounds(self) -> tuple[float, float]:
        """Lower and upper clip values."""
        half = float(self.width) / 2.0
        return (float(self.level) - half, float(self.level) + half)


@dataclass(frozen=True)
class SlidingWindowSettings:
    """How a volume is cut into windows and the windows blended back.

    ``patch_size`` ``None`` means one forward pass over the whole volume. ``patch_stride``
    ``None`` means half the patch. ``accumulate_device`` ``"cpu"`` keeps the blending slab on
    the host (a key of the original tool's ``inference_config``).
    """

    patch_size: Triple | None = None
    patch_stride: Triple | None = None
    batch_size: int = 1
    blend: str = "gaussian"
    accumulate_device: str | None = None

    def resolved(self, shape_zyx: Triple) -> tuple[Triple, Triple]:
        """Patch and stride for a volume of ``shape_zyx`` (patch ``None`` → whole volume)."""
        patch = self.patch_size or shape_zyx
        stride = self.patch_stride or (
            patch if self.patch_size is None else tuple(max(1, p // 2) for p in patch)
        )
        return patch, stride  # type: ignore[return-value]


@dataclass(frozen=True)
class InferenceSettings:
    """The user's settings with the model's defaults filled in (window, patch, stride, fp16
    where the model can), plus what only the model says (batch, accumulation device)."""

    settings: Settings
    batch_size: int = 1
    accumulate_device: str | None = None

    @property
    def window(self) -> WindowSettings:
        level, width = self.settings.window_level, self.settings.window_width
        if level is None or width is None:
            raise UsageError("no intensity window resolved")  # resolve_inference_settings checks
        return WindowSettings(level, width)

    @property
    def sliding(self) -> SlidingWindowSettings:
        s = self.settings
        return SlidingWindowSettings(s.patch_size, s.patch_stride, self.batch_size, s.blend,
                                     self.accumulate_device)

    @property
    def fp16(self) -> bool:
        return self.settings.fp16

    def describe(self) -> dict[str, Any]:
        """The settings stored in records and compared on resume."""
        return self.settings.fingerprint()


if __name__ == "__main__":
    print(settings_table())
