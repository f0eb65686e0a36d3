"""The settings schema drives every face: command line, environment, Dagster resource,
records and the -vv description. Checked against the schema's own field list, so a setting
added to it is covered without editing these tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itk_infer.cli import build_parser, main
from itk_infer.config import (
    Settings,
    describe_settings,
    settings_fields,
    settings_from_args,
    settings_from_env,
)
from itk_infer.errors import UsageError

# A value other than the default for each kind, as text for argv and env, and as parsed.
SAMPLES = {
    "path": ("/x/y", Path("/x/y")),
    "text": ("/x/y", "/x/y"),
    "float": ("7.5", 7.5),
    "int": ("3", 3),
    "triple": ("4 8 8", (4, 8, 8)),
    "spacing": ("1.5 2 2.5", (1.5, 2.0, 2.5)),
}


def _sample(name: str, spec) -> tuple[list[str], str, object]:
    """argv words, env text and the expected value for a non-default value of ``name``."""
    default = dict((n, d) for n, _s, d in settings_fields())[name]
    if spec.kind == "bool":
        return [], "0" if default else "1", not default
    if spec.kind == "choice":
        other = next(c for c in spec.choices if c != default)
        return [other], other, other
    text, value = SAMPLES[spec.kind]
    return text.split(), text, value


def test_every_flagged_setting_parses_from_the_command_line() -> None:
    argv: list[str] = []
    expected = {}
    for name, spec, _default in settings_fields("cli"):
        words, _text, value = _sample(name, spec)
        argv += [spec.flags[-1], *words]
        expected[name] = value
    settings = settings_from_args(build_parser().parse_args(argv))
    assert {name: getattr(settings, name) for name in expected} == expected


def test_every_variable_parses_from_the_environment() -> None:
    environ, expected = {}, {}
    for name, spec, _default in settings_fields("env"):
        _words, text, value = _sample(name, spec)
        environ[spec.env] = text
        expected[name] = value
    settings = settings_from_env(environ)
    assert {name: getattr(settings, name) for name in expected} == expected


def test_bad_environment_values_name_their_variable() -> None:
    for _name, spec, _default in settings_fields("env"):
        if spec.kind in ("text", "path", "choice"):
            continue
        with pytest.raises(UsageError, match=spec.env):
            settings_from_env({spec.env: "not a value"})
    with pytest.raises(UsageError, match="ITK_INFER_BLEND"):
        settings_from_env({"ITK_INFER_BLEND": "median"})


def test_resource_fields_are_the_configurable_settings() -> None:
    from itk_infer_assets.resources import ItkInferResource

    fields = ItkInferResource.model_fields
    expected = {name for name, _spec, _d in settings_fields("env")}
    assert set(fields) == expected
    resource = ItkInferResource()
    assert resource.settings() == Settings()


def test_record_settings_are_the_fingerprint_settings(tmp_path, pointwise_model) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    import numpy as np

    from tests.conftest import write_volume

    write_volume(inputs / "a.mha", np.zeros((8, 16, 16), np.float32))
    assert main(["-i", str(inputs), "-o", str(tmp_path / "out"), "--onnx", str(pointwise_model),
                 "--device", "cpu", "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / ".itk_infer" / "a.json").read_text())
    always = {name for name, spec, _d in settings_fields()
              if spec.fingerprint and not spec.recorded_if_set}
    assert set(record["settings"]) - {"device"} == always
    # Settings added later are recorded when set, so older outputs stay valid on resume.
    assert main(["-i", str(inputs), "-o", str(tmp_path / "tta"), "--onnx", str(pointwise_model),
                 "--device", "cpu", "--no-progress", "--tta"]) == 0
    record = json.loads((tmp_path / "tta" / ".itk_infer" / "a.json").read_text())
    assert record["settings"]["tta"] is True


def test_verbose_debug_describes_every_setting(tmp_path, pointwise_model, capsys) -> None:
    main(["-i", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--onnx",
          str(pointwise_model), "--ww", "3", "-vv"])
    err = capsys.readouterr().err
    for name, _spec, _default in settings_fields():
        assert f"setting {name} = " in err
    assert "window_width = 3.0 (set; --ww, ITK_INFER_WW)" in err
    assert len(describe_settings(Settings())) == len(list(settings_fields()))


def test_gpus_means_the_same_everywhere() -> None:
    from itk_infer_assets.resources import ItkInferResource

    cli_default = settings_from_args(build_parser().parse_args(["-i", "a", "-o", "b"])).gpus
    assert cli_default == ItkInferResource().gpus == 0  # 0: every visible GPU
    with pytest.raises(UsageError, match="--gpus"):
        Settings(gpus=-1)
