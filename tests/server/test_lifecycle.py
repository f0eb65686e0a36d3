"""The server's life: what it refuses to start with, uploads expiring and evicted, and
nothing left on disk after it stops."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.server.conftest import needs_live
from tests.server.live import DEMO_IMAGES, DEMO_MODEL, REPO, start_server


def serve(*options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itk_infer", "serve", "--onnx",
                           str(DEMO_MODEL), *options], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)


def test_refuses_to_start_in_unsafe_or_wrong_ways(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "ITK_INFER_SERVE_TOKEN"}
    public = serve("--host", "0.0.0.0", env=env)
    assert public.returncode == 2 and "token" in public.stderr
    short = tmp_path / "token"
    short.write_text("too-short\n")
    weak = serve("--token-file", str(short), env=env)
    assert weak.returncode == 2 and "at least 16" in weak.stderr
    batch = serve("-i", str(DEMO_IMAGES), env=env)
    assert batch.returncode == 2 and "batch command" in batch.stderr
    assert "Traceback" not in public.stderr + weak.stderr + batch.stderr


def test_serve_help_imports_nothing_heavy():
    code = ("import sys; import itk_infer.cli as c, itk_infer.server.cli as s; "
            "s.build_parser().format_help(); "
            "heavy = {'torch', 'SimpleITK', 'fastapi', 'uvicorn'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@needs_live
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")
def test_uploads_expire_are_capped_and_are_removed_on_shutdown(tmp_path):
    from monailabel.client import MONAILabelClient

    server = start_server(tmp_path, "--upload-ttl", "2", "--max-uploads", "2")
    try:
        c = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        for name in ("case_01.mha", "case_02.nii.gz", "case_03.nii"):
            c.upload_image(str(DEMO_IMAGES / name), name)
        uploads = [p for p in server.scratch_files() if "uploads" in p.parts]
        assert len(uploads) == 2  # the least recently used went first
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in uploads)
        # named by the server: no client id or file name in any path
        assert all(re.fullmatch(r"[0-9a-f]{32}\.(nii\.gz|nii)", p.name) for p in uploads)
        (root,) = server.scratch.iterdir()
        assert root.stat().st_mode & 0o777 == 0o700
        with pytest.raises(Exception, match="404"):
            c.infer("model", "case_01.mha", {})
        deadline = time.monotonic() + 15
        while server.scratch_files() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.scratch_files() == []  # expired after the TTL
        assert c.info()["datastore"]["total"] == 0
        c.upload_image(str(DEMO_IMAGES / "case_01.mha"), "kept until shutdown")
        assert server.scratch_files()
    finally:
        code = server.stop()
    assert code == 0
    assert list(server.scratch.iterdir()) == []  # the scratch folder itself is gone
