"""The container's deployment files load with Dagster's own schemas and agree with the code.

No Docker needed: the Docker-based checks live in .ci/docker.sh.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

POSTGRES_ENV = {
    "DAGSTER_POSTGRES_HOST": "postgres",
    "DAGSTER_POSTGRES_USER": "dagster",
    "DAGSTER_POSTGRES_PASSWORD": "secret",
    "DAGSTER_POSTGRES_DB": "dagster",
}


def _instance_config(tmp_path: Path, yaml_text: str) -> dict:
    from dagster._core.instance.config import dagster_instance_config

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml_text)
    config, _ = dagster_instance_config(str(home))
    return config


def _launcher(config: dict):
    """Build the DockerRunLauncher exactly as the instance would (schema, then constructor)."""
    from dagster._config import process_config
    from dagster_docker import DockerRunLauncher

    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    processed = process_config(DockerRunLauncher.config_type(), launcher["config"])
    assert processed.success, processed.errors
    return DockerRunLauncher.from_config_value(None, processed.value)


def test_gpu_instance_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import docker.types

    for name, value in {**POSTGRES_ENV, "ITK_INFER_IMAGE": "itk_infer:latest"}.items():
        monkeypatch.setenv(name, value)
    config = _instance_config(tmp_path, (DEPLOY / "dagster.docker.yaml").read_text())
    assert "postgres" in config["storage"]
    launcher = _launcher(config)
    assert launcher.image == "itk_infer:latest"
    assert launcher.networks == ["itk_infer"]
    # docker-py turns each entry into a DeviceRequest: the keys must be its arguments.
    requests = [docker.types.DeviceRequest(**r)
                for r in launcher.container_kwargs["device_requests"]]
    assert requests and requests[0]["Driver"] == "nvidia"
    assert requests[0]["Capabilities"] == [["gpu"]] and requests[0]["Count"] == -1
    assert config["concurrency"]["pools"]["granularity"] == "op"


def test_ci_instance_config_builds_an_instance(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster import DagsterInstance
    from dagster._core.run_coordinator import DefaultRunCoordinator
    from dagster_docker import DockerRunLauncher

    monkeypatch.setenv("ITK_INFER_IMAGE", "itk_infer:ci")
    text = (DEPLOY / "dagster.ci.yaml").read_text()
    placeholders = set(re.findall(r"@[A-Z_]+@", text))
    # what docker.sh fills in
    assert placeholders == {"@DAGSTER_HOME@", "@DATA@", "@CI_LABEL@", "@RUN_USER@"}
    home = tmp_path / "home"
    text = (text.replace("@DAGSTER_HOME@", str(home)).replace("@DATA@", str(tmp_path / "data"))
            .replace("@CI_LABEL@", "test").replace("@RUN_USER@", "0:0"))
    _instance_config(tmp_path, text)
    with DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_coordinator, DefaultRunCoordinator)
        launcher = instance.run_launcher
        assert isinstance(launcher, DockerRunLauncher)
        assert launcher.networks == ["host"]
        assert "device_requests" not in launcher.container_kwargs
        assert f"{home}:{home}" in launcher.container_kwargs["volumes"]


def _forwarded(name: str) -> set[str]:
    config = yaml.safe_load((DEPLOY / name).read_text())
    return {v for v in config["run_launcher"]["config"]["env_vars"] if v.startswith("ITK_INFER_")}


def test_deployment_variables_are_the_schema_settings() -> None:
    """The GPU deployment forwards exactly one variable per configurable setting of the schema
    (a misspelt or forgotten name would silently leave runs with the default), and every
    ITK_INFER_* name in deploy/ is a setting or a documented container variable."""
    from itk_infer.config import DEPLOYMENT_VARIABLES, deployment_variables

    settings = deployment_variables()
    assert _forwarded("dagster.docker.yaml") == settings
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    shared = {k for k in compose["x-itk-infer-env"] if k.startswith("ITK_INFER_")}
    assert shared - set(DEPLOYMENT_VARIABLES) == settings
    assert _forwarded("dagster.ci.yaml") <= settings  # CI sets only what its runs need
    mentioned = set()
    for path in (p for p in DEPLOY.iterdir() if p.is_file()):
        mentioned |= set(re.findall(r"ITK_INFER_[A-Z0-9_]+", path.read_text()))
    assert mentioned - settings - set(DEPLOYMENT_VARIABLES) == set()


def test_deployment_check_sees_a_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is not vacuous: a setting added to the schema without its variable in
    deploy/ breaks it."""
    from itk_infer import config

    monkeypatch.setattr(config, "deployment_variables",
                        lambda: {*_forwarded("dagster.docker.yaml"), "ITK_INFER_NEW"})
    with pytest.raises(AssertionError):
        test_deployment_variables_are_the_schema_settings()


def test_workspace_points_at_the_code_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._core.workspace.config_schema import process_workspace_config

    monkeypatch.setenv("ITK_INFER_CODE_SERVER_HOST", "code")
    monkeypatch.setenv("ITK_INFER_CODE_SERVER_PORT", "4000")
    raw = yaml.safe_load((DEPLOY / "workspace.docker.yaml").read_text())
    processed = process_workspace_config(raw)
    assert processed.success, processed.errors
    (entry,) = processed.value["load_from"]
    server = entry["grpc_server"]
    assert (server["host"], server["port"], server["location_name"]) == ("code", 4000, "itk_infer")


def test_compose_wires_the_same_names() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    instance = yaml.safe_load((DEPLOY / "dagster.docker.yaml").read_text())
    launcher = instance["run_launcher"]["config"]
    assert launcher["network"] in {n["name"] for n in compose["networks"].values()}
    volume_names = {v["name"] for v in compose["volumes"].values()}
    for volume in launcher["container_kwargs"]["volumes"]:
        assert volume.split(":")[0] in volume_names, volume
    env = compose["x-itk-infer-env"]
    # The launcher copies these from the daemon's environment and fails on a missing one.
    assert set(launcher["env_vars"]) <= set(env), sorted(set(launcher["env_vars"]) - set(env))
    for service in ("webserver", "daemon"):
        mounts = compose["services"][service]["volumes"]
        assert any(m.startswith("./dagster.docker.yaml:") for m in mounts)
        assert any(m.startswith("./workspace.docker.yaml:") for m in mounts)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m.group(0).lstrip().startswith("#")]


def test_dockerfile_command_serves_the_definitions() -> None:
    """The default command's module is the code location, and it holds the definitions."""
    from dagster import Definitions

    (cmd,) = [args for op, args in _dockerfile_instructions() if op == "CMD"]
    argv = json.loads(cmd)
    assert argv[:3] == ["dagster", "code-server", "start"]
    module = argv[argv.index("-m") + 1]
    imported = __import__(module, fromlist=["defs"])
    assert isinstance(imported.defs, Definitions)
    assert argv[argv.index("-p") + 1] == "4000"


def test_dockerfile_copies_only_what_the_context_has() -> None:
    """Each COPY source exists and is not excluded by .dockerignore (an allow-list)."""
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    sources = []
    for op, args in _dockerfile_instructions():
        if op == "COPY":
            sources += args.split()[:-1]
    sources = [s.replace("${WHEEL_DIR}", "deploy/wheels").rstrip("/") for s in sources]
    assert "pyproject.toml" in sources and "itk_infer" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == a or source.startswith(a + "/") for a in allowed), source


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_script_parses() -> None:
    import subprocess

    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "docker.sh")], check=True)
