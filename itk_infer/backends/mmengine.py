"""MMEngine backend: a model built from an MMEngine config, weights from a checkpoint.

Contract:

* Config (``Config.fromfile``; plain or pure-Python "lazy import" configs): ``model`` is built
  with ``MODELS.build(cfg.model)`` (under the config's ``default_scope`` if it has one).
  ``model.inference_config`` (``patch_size``, ``patch_stride``, ``forward_batch_windows``,
  ``accumulate_device``, ``forward_device``, ``argmax_batchsize``) gives the sliding-window
  defaults and is passed to the model's constructor only if the constructor names an
  ``inference_config`` parameter. Top-level ``wl``/``ww`` give the intensity window.
* Forward: a model with a ``backbone`` submodule and a ``num_classes`` attribute (the layout
  of the original tool's 3-D segmentors) runs as ``model.backbone(x)``; any other MMEngine
  ``BaseModel`` as ``model(x, mode='tensor')``; a plain ``nn.Module`` as ``model(x)``. The
  model's ``data_preprocessor`` is not applied: ``x`` is already the windowed [0, 1] image.
  The output must be ``(N, C, Z, Y, X)`` at the input's spatial size.
* Weights: see :mod:`itk_infer.backends.checkpoint` (safe loading); missing keys are an error,
  unexpected keys a warning.

Where ``custom_imports`` (and imports inside the config) are looked for: besides the normal
``sys.path``, for each imported top-level name that is not importable otherwise, the config's
folder and then each of its parent folders, nearest first, until one holds ``name.py`` or a
package ``name/__init__.py``. So a module next to the config is found, and so is a package
of a project that holds the config further down (``examples.mmengine_model`` for
``examples/demo/mmengine_config.py``), from whatever folder ``itk_infer`` is started. Those
folders are on ``sys.path`` only while the config is read and the model is built; installed
packages are never shadowed.

Everything the model config needs is imported before the model is built: the modules behind
its lazy imports, ``custom_imports`` and dotted type strings (``itkit.models.X``). A module
that is not installed (or fails to import) is a :class:`~itk_infer.errors.ModelError` that
names the missing module and the package to install, so the run stops with exit 2 before
any case. ``mmengine`` itself may come from ``mmengine`` or from ITKIT's ``onedl-mmengine``
(the same import package); :func:`require_mmengine` checks that one of them is there.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from itk_infer.backends.base import (
    ModelDefaults,
    clean_inference_config,
    fingerprint_files,
    parse_labels,
    parse_spacing,
    require_file,
)
from itk_infer.backends.checkpoint import extract_state_dict, load_checkpoint
from itk_infer.errors import ModelError

log = logging.getLogger(__name__)

_MAX_LISTED_KEYS = 10


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" (and {more} more)" if more > 0 else "")


def _imported_names(config_path: Path) -> set[str]:
    """Modules named by the config file itself: its import statements and ``custom_imports``."""
    try:
        tree = ast.parse(config_path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return set()  # Config.fromfile reports the problem properly
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "custom_imports" for t in node.targets
        ):
            names.update(
                c.value for c in ast.walk(node.value)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            )
    return names


# Where the package to install is not named like its top-level module, or comes in two
# flavours (OpenMMLab's releases and the OneDL forks that ITKIT installs).
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "itkit": ("itkit",),
    "mmseg": ("onedl-mmsegmentation", "mmsegmentation"),
    "mmcv": ("onedl-mmcv",),
    "monai": ("monai",),
    "mmengine": ("mmengine", "onedl-mmengine"),
}
_MIN_MMENGINE = (0, 10, 4)
_MMENGINE_DISTRIBUTIONS = ("mmengine", "onedl-mmengine")


def install_hint(module: str) -> str:
    """Which package provides ``module`` and how to install it."""
    top = module.split(".")[0]
    known = _DISTRIBUTIONS.get(top)
    if known is None:
        return (f"this config needs the package `{top}` (pip install {top}); if `{top}` is "
                f"your own code, put {top}.py or the package {top}/ next to the config or in "
                "a folder above it")
    names = " or ".join(f"`{name}`" for name in known)
    return f"this config needs the package {names} (pip install {known[0]})"


def _missing_module(error: BaseException) -> str | None:
    """The module a ModuleNotFoundError is about (MMEngine re-raises it without ``name``)."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        return error.name
    match = re.search(r"No module named '([^']+)'", str(error))
    return match.group(1) if match else None


def import_failure(source: str, what: str, error: BaseException) -> ModelError:
    """The usage error for something the config needs that does not import."""
    missing = _missing_module(error)
    if missing is not None:
        return ModelError(f"{source}: {what}: no module named {missing!r}; "
                          f"{install_hint(missing)}")
    return ModelError(f"{source}: {what}: {type(error).__name__}: {error}")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def require_mmengine() -> str:
    """Check that some distribution provides a usable ``mmengine``; returns its version.

    ``mmengine`` and ``onedl-mmengine`` install the same ``mmengine`` folder, so either one
    serves. Having both means two packages own one folder: uninstalling either breaks the
    other, and the files are those of whichever was installed last, hence the warning.

    Raises:
        ModelError: no ``mmengine`` module, or one older than 0.10.4.
    """
    try:
        import mmengine
    except Exception as error:  # absent, or a folder that two installs left inconsistent
        raise ModelError(
            f"the MMEngine backend needs the module `mmengine` ({type(error).__name__}: "
            f"{error}): pip install 'itk_infer[mmengine]', or ITKIT's onedl-mmengine (pip "
            "install onedl-mmengine), which provides the same module"
        ) from None
    version = str(getattr(mmengine, "__version__", "0"))
    if _version_tuple(version) < _MIN_MMENGINE:
        raise ModelError(f"mmengine {version} is too old for the MMEngine backend; install "
                         "mmengine>=0.10.4 or onedl-mmengine")
    installed = {}
    for name in _MMENGINE_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            installed[name] = importlib.metadata.version(name)
    if len(installed) > 1:
        log.warning(
            "both %s are installed; they share the `mmengine` folder (now version %s), and "
            "uninstalling either breaks the other. Keep one: pip uninstall -y mmengine "
            "onedl-mmengine, then pip install the one you want",
            " and ".join(f"{name} {v}" for name, v in installed.items()), version)
    return version


def _importable(top: str) -> bool:
    if top in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def import_roots(config_path: Path, modules: Iterable[str]) -> list[str]:
    """Folders to put on ``sys.path`` so that ``modules`` import (see the module docstring)."""
    roots: list[str] = []
    start = Path(config_path).resolve().parent
    for name in modules:
        top = str(name).split(".")[0]
        if not top.isidentifier() or _importable(top):
            continue
        for folder in (start, *start.parents):
            if (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file():
                if str(folder) not in sys.path and str(folder) not in roots:
                    roots.append(str(folder))
                break
    return roots


def _import_module(name: str, source: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as error:  # missing packages, and modules that fail while importing
        raise import_failure(source, what, error) from None


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf under ``value``, without building MMEngine's lazy objects."""
    if isinstance(value, dict):  # dict.items: ConfigDict.items() would import lazy values
        for key, item in dict.items(value):
            yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")
    else:
        yield path, value


def _check_lazy(value: Any, source: str, where: str) -> None:
    """Import what a lazy import of the config stands for (MMEngine's own error would lose
    the name of the missing module)."""
    from mmengine.config.lazy import LazyAttr

    root = value
    while isinstance(root, LazyAttr):
        root = root.source
    modules = [root._module] if isinstance(root._module, str) else list(root._module)
    for module in modules:
        _import_module(module, source, f"{where}: cannot import {module!r} (imported by the "
                                       "config)")
    try:
        value.build()
    except Exception as error:  # the module imports but lacks the imported name
        raise ModelError(f"{source}: {where}: {error}; is the installed package the version "
                         "the config was written for?") from None


def _check_dotted_type(type_name: str, source: str, where: str) -> None:
    """The modules of a dotted type string (``itkit.models.X``, or a scope ``mmseg.X``) must
    import; whether the name itself exists is left to the registry."""
    parts = type_name.split(".")
    what = f"{where} {type_name!r}: cannot import module"
    target = _import_module(parts[0], source, f"{what} {parts[0]!r}")
    for index in range(1, len(parts) - 1):
        attribute = getattr(target, parts[index], None)
        if attribute is not None and not inspect.ismodule(attribute):
            return  # the rest are attributes of an object
        name = ".".join(parts[: index + 1])
        try:
            target = importlib.import_module(name)
        except Exception as error:
            if _missing_module(error) == name:
                return  # no such submodule: a registered name, not a module path
            raise import_failure(source, f"{what} {name!r}", error) from None
    if len(parts) > 2 and not hasattr(target, parts[-1]):  # 'scope.Name' has two parts
        raise ModelError(f"{source}: {where} {type_name!r}: module "
                         f"{'.'.join(parts[:-1])!r} has no {parts[-1]!r}")


def check_model_imports(model_cfg: Mapping[str, Any], source: str) -> None:
    """Import every module the model config needs: its lazy imports and dotted type strings.

    Raises:
        ModelError: one does not import; names the missing module and the package.
    """
    from mmengine.config.lazy import LazyAttr, LazyObject

    for where, value in _walk(model_cfg, "model"):
        if isinstance(value, LazyObject | LazyAttr):
            _check_lazy(value, source, where)
        elif where.endswith(".type") and isinstance(value, str) and "." in value:
            _check_dotted_type(value, source, where)


@contextlib.contextmanager
def _module_search_path(roots: list[str]) -> Iterator[None]:
    sys.path[:0] = roots
    try:
        yield
    finally:
        for root in roots:
            with contextlib.suppress(ValueError):
                sys.path.remove(root)


def _as_float(value: Any, key: str, source: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelError(f"{source}: {key} must be a number, got {value!r}")
    return float(value)


def _names_parameter(target: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get(name)
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _type_name(model_type: Any) -> str:
    return model_type if isinstance(model_type, str) else getattr(
        model_type, "__qualname__", repr(model_type))


def _unregistered(model_type: str, registry: Any) -> ModelError:
    return ModelError(
        f"model type {model_type!r} is not registered in MMEngine's {registry.name!r} registry "
        f"(scope {registry.scope!r}). Import the module that registers it from the config, "
        f"e.g. custom_imports = dict(imports=['my_package.my_model']); modules next to the "
        "config or in a package above it are found automatically"
    )


def _plain(value: Any) -> Any:
    """A config value as plain Python (lists in configs may be tuples or ConfigList)."""
    return list(value) if isinstance(value, list | tuple) else value


class MMEngineBackend:
    """A segmentation model built by MMEngine from ``cfg_path`` with weights from
    ``ckpt_path`` (loaded safely unless ``trust_checkpoint``)."""

    name = "mmengine"

    def __init__(
        self,
        cfg_path: Path,
        ckpt_path: Path,
        device: torch.device,
        fp16: bool = False,
        trust_checkpoint: bool = False,
    ) -> None:
        self.cfg_path = require_file(cfg_path, "MMEngine config (-cfg)")
        self.ckpt_path = require_file(ckpt_path, "MMEngine checkpoint (-ckpt)")
        self.device = device
        self.fp16 = bool(fp16) and device.type == "cuda"
        source = self.cfg_path.name
        require_mmengine()

        # The checkpoint first: a refused file stops the run before any model code runs.
        weights = extract_state_dict(
            load_checkpoint(self.ckpt_path, trust_checkpoint), self.ckpt_path.name
        )
        with _module_search_path(import_roots(self.cfg_path, _imported_names(self.cfg_path))):
            cfg = self._read_config()
            model = self._build_model(cfg)
        self._load_weights(model, weights)
        del weights
        model.eval()
        model.requires_grad_(False)
        self.model = model.to(device)

        model_cfg = cfg.get("model")
        inference_config = model_cfg.get("inference_config") if model_cfg else None
        self.defaults = ModelDefaults(
            window_level=_as_float(cfg.get("wl"), "wl", source),
            window_width=_as_float(cfg.get("ww"), "ww", source),
            inference_config=clean_inference_config(
                dict(inference_config) if isinstance(inference_config, Mapping)
                else inference_config,
                f"{source}: model.inference_config",
            ),
            spacing=parse_spacing(_plain(cfg.get("spacing")), source),
            # ``classes`` (names by value) is what OpenMMLab dataset configs call them.
            labels=parse_labels(_plain(cfg.get("labels", cfg.get("classes"))), source),
        )
        self.fingerprint = fingerprint_files([self.ckpt_path, self.cfg_path])
        self.static_patch_size = None
        self.static_batch_size = None
        self._call, self.convention = self._forward_convention(model)
        num_classes = getattr(model, "num_classes", None)
        self.num_classes = (
            int(num_classes) if isinstance(num_classes, int) and not isinstance(num_classes, bool)
            else None
        )
        if self.defaults.labels and self.num_classes:  # the range is known only now
            self.defaults = dataclasses.replace(self.defaults, labels=parse_labels(
                self.defaults.labels, source, self.num_classes))

    def _read_config(self) -> Any:
        from mmengine.config import Config

        path = self.cfg_path
        try:
            cfg = Config.fromfile(str(path), import_custom_modules=False)
        except ImportError as error:  # a plain config that imports a missing package
            raise import_failure(path.name, "cannot read the config", error) from None
        except Exception as error:  # mmengine raises many types for broken configs
            raise ModelError(
                f"cannot read config {path}: {type(error).__name__}: {error}"
            ) from None
        custom = cfg.get("custom_imports") or {}
        if not isinstance(custom, Mapping):
            custom = {"imports": custom}
        modules = custom.get("imports") or []
        modules = [modules] if isinstance(modules, str) else list(modules)
        allow_failed = bool(custom.get("allow_failed_imports", False))
        # custom_imports may come from a _base_ file that the scan of the config did not read.
        with _module_search_path(import_roots(path, modules)):
            for module in modules:
                self._import_custom(module, allow_failed)
        return cfg

    def _import_custom(self, module: str, allow_failed: bool) -> None:
        try:
            importlib.import_module(module)
        except ImportError as error:
            if allow_failed:
                log.warning("%s: custom_imports: cannot import %r (allowed to fail): %s",
                            self.cfg_path.name, module, error)
                return
            if _missing_module(error) is None:  # the module is there but lacks a name
                raise ModelError(f"{self.cfg_path.name}: custom_imports cannot import "
                                 f"{module!r}: {error}") from None
            raise import_failure(self.cfg_path.name, f"custom_imports cannot import {module!r}",
                                 error) from None
        except Exception as error:  # the module itself failed (syntax, registry clash, ...)
            raise ModelError(
                f"{self.cfg_path.name}: custom_imports module {module!r} failed to import: "
                f"{type(error).__name__}: {error}"
            ) from None

    def _build_model(self, cfg: Any) -> nn.Module:
        from mmengine.registry import MODELS, DefaultScope

        source = self.cfg_path.name
        model_cfg = cfg.get("model")
        if not isinstance(model_cfg, Mapping) or "type" not in model_cfg:
            raise ModelError(f"{source}: needs model = dict(type=..., ...)")
        # Before building: an import failure inside the build would lose the module's name.
        check_model_imports(model_cfg, source)
        build_cfg = dict(model_cfg)
        model_type = build_cfg["type"]
        with DefaultScope.overwrite_default_scope(cfg.get("default_scope")), \
                MODELS.switch_scope_and_registry(None) as registry:
            try:
                target = registry.get(model_type) if isinstance(model_type, str) else model_type
                if target is None:
                    raise _unregistered(model_type, registry)
                if "inference_config" in build_cfg and not _names_parameter(
                        target, "inference_config"):
                    # The tool reads it; a model that does not take it must not receive it.
                    del build_cfg["inference_config"]
                model = registry.build(build_cfg)
            except ModelError:
                raise
            except KeyError as error:
                missing = re.match(r"[\"']?(\S+) is not in the ", str(error.args[0]) if
                                   error.args else "")
                if missing:
                    raise _unregistered(missing.group(1), registry) from None
                raise ModelError(
                    f"{source}: cannot build model {_type_name(model_type)!r}: KeyError: {error}"
                ) from None
            except ImportError as error:  # imports made by the model's own constructor
                raise import_failure(
                    source, f"cannot build model {_type_name(model_type)!r}", error) from None
            except Exception as error:
                raise ModelError(
                    f"{source}: cannot build model {_type_name(model_type)!r}: "
                    f"{type(error).__name__}: {error}"
                ) from None
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"{source}: model {_type_name(model_type)!r} built a {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        return model

    def _load_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        source = self.ckpt_path.name
        try:
            result = model.load_state_dict(weights, strict=False)
        except RuntimeError as error:  # shape mismatches
            raise ModelError(f"{source} does not fit the model of {self.cfg_path.name}: "
                             f"{error}") from None
        if result.missing_keys:
            raise ModelError(
                f"{source} lacks {len(result.missing_keys)} weight(s) of the model built from "
                f"{self.cfg_path.name}: {_listed(list(result.missing_keys))}. A partly loaded "
                "model would give wrong results; check that config and checkpoint belong "
                "together"
            )
        if result.unexpected_keys:
            log.warning(
                "%s: ignoring %d checkpoint entr%s the model does not have: %s",
                source, len(result.unexpected_keys),
                "y" if len(result.unexpected_keys) == 1 else "ies",
                _listed(list(result.unexpected_keys)),
            )

    @staticmethod
    def _forward_convention(model: nn.Module) -> tuple[Callable[[torch.Tensor], Any], str]:
        from mmengine.model import BaseModel

        backbone = getattr(model, "backbone", None)
        if isinstance(backbone, nn.Module) and hasattr(model, "num_classes"):
            return backbone, "model.backbone(x)"
        if isinstance(model, BaseModel):
            return (lambda x: model(x, mode="tensor")), "model(x, mode='tensor')"
        return model, "model(x)"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Run (N, 1, Z, Y, X) windows; returns float32 (N, C, Z, Y, X) logits on the device.

        Raises:
            ModelError: the model's output is not a tensor of that shape.
        """
        x = batch.to(self.device, torch.float32)
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.float16)
            if self.fp16 else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = self._call(x)
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"{self.convention} returned {type(out).__name__} for input {list(x.shape)}; "
                "expected a tensor (N, C, Z, Y, X)"
            )
        if out.ndim != 5 or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            raise ModelError(
                f"{self.convention} returned shape {list(out.shape)} for input "
                f"{list(x.shape)}; expected (N, C, Z, Y, X) = "
                f"[{x.shape[0]}, C, {', '.join(str(s) for s in x.shape[2:])}]"
            )
        return out.float()
