"""The live deployment of test_server.py on PostgreSQL storage (dagster-postgres): the test
starts a throwaway PostgreSQL server on loopback from the installed binaries (Debian's
`postgresql`; `bash .ci/postgres.sh` installs it), builds a DAGSTER_HOME whose dagster.yaml
stores runs, event logs and schedules there, runs `dagster instance migrate`, then the same
webserver + daemon scenario; the outputs must equal the CLI's, and the runs must be rows of
the server's tables (read with psycopg2, not through Dagster).

The server binaries are looked for in ITK_INFER_TEST_PG_BIN (a folder), then under
/usr/lib/postgresql/<version>/bin (newest first), then on the PATH; without them the test
skips. The server runs as the `postgres` user when the tests run as root (PostgreSQL refuses
root), with trust authentication for 127.0.0.1 only and no Unix socket; it is stopped by its
PID and its data folder removed at the end."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psycopg2  # dagster-postgres' own driver (psycopg2-binary)
import pytest
import yaml

from itk_infer.cli import main as cli_main
from itk_infer_assets.partitions import IMAGES_PARTITIONS_NAME
from tests.assets import REPO, tree
from tests.assets.live import LiveResult, free_port, run_live_scenario, tail, webserver_available

PG_BIN_ENV = "ITK_INFER_TEST_PG_BIN"
DEBIAN_PG = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"  # the account Debian's package creates; the server runs as it as root
DB_NAME, DB_USER, DB_PASSWORD = "itk_infer_dagster", "itk_infer", "itk_infer"


def _has_server(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("initdb", "postgres"))


def find_pg_bin() -> Path | None:
    """The folder of `initdb` and `postgres`, or None when no PostgreSQL server is installed."""
    if os.environ.get(PG_BIN_ENV):
        return Path(os.environ[PG_BIN_ENV])  # explicit: used as given, checked by the caller
    versions = sorted(DEBIAN_PG.glob("*/bin"), reverse=True,
                      key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)])
    for folder in versions:
        if _has_server(folder):
            return folder
    initdb = shutil.which("initdb")  # other layouts; links (e.g. in /usr/local/bin) resolved
    if initdb and _has_server(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    return None


@dataclass
class PgServer:
    port: int
    pid: int
    data: Path

    def dsn(self, user: str = DB_USER, dbname: str = DB_NAME) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "user": user, "dbname": dbname,
                "password": DB_PASSWORD, "connect_timeout": 5}


def _connect(**dsn) -> contextlib.closing:
    """A connection that the ``with`` block closes (psycopg2's own only ends a transaction)."""
    return contextlib.closing(psycopg2.connect(**dsn))


@pytest.fixture
def postgres() -> Iterator[PgServer]:
    """A fresh server on 127.0.0.1 with the database and user of the Dagster instance."""
    bin_dir = find_pg_bin()
    if bin_dir is None or not _has_server(bin_dir):
        pytest.skip(f"no PostgreSQL server binaries (initdb, postgres) in ${PG_BIN_ENV}, "
                    f"{DEBIAN_PG}/*/bin or on the PATH; `bash .ci/postgres.sh` installs them")
    as_user: dict = {}
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.skip(f"running as root and there is no '{SERVER_USER}' user to run "
                        "PostgreSQL as (it refuses to run as root)")
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    # Not below pytest's tmp_path: that is private to the test's user, and the server user
    # must reach its data folder.
    base = Path(tempfile.mkdtemp(prefix="itk_infer-pg-"))
    data, log = base / "data", base / "server.log"
    if as_user:
        os.chown(base, as_user["user"], as_user["group"])
    run = {"cwd": base, "env": {**os.environ, "LC_ALL": "C"}, **as_user}
    server: subprocess.Popen | None = None
    try:
        initdb = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", SERVER_USER,
                                 "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"],
                                capture_output=True, text=True, timeout=120, **run)
        assert initdb.returncode == 0, f"initdb:\n{initdb.stdout}{initdb.stderr}"
        # Trust, for IPv4 loopback only: the server listens nowhere else either.
        (data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        port = free_port()
        with log.open("wb") as out:
            server = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                 # A throwaway server: durability buys nothing and costs time.
                 "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **run)
        pg = PgServer(port=port, pid=server.pid, data=data)
        _wait_and_create_database(pg, server, log)
        yield pg
    finally:
        if server is not None:
            _stop_server(server)
        shutil.rmtree(base, ignore_errors=True)


def _wait_and_create_database(pg: PgServer, server: subprocess.Popen, log: Path) -> None:
    started = time.monotonic()
    while True:
        try:
            admin = _connect(**pg.dsn(user=SERVER_USER, dbname="postgres"))
            break
        except psycopg2.OperationalError:
            assert server.poll() is None, f"postgres exited:\n{tail(log)}"
            assert time.monotonic() - started < 60, f"postgres not ready:\n{tail(log)}"
            time.sleep(0.5)
    with admin as conn:
        conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE ROLE {DB_USER} LOGIN PASSWORD %s", (DB_PASSWORD,))
            cursor.execute(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")


def _stop_server(server: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT: disconnect clients, then stop) by PID; kill if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            server.kill()
    server.wait(timeout=10)


def write_instance(home: Path, pg: PgServer) -> None:
    """The repository's dagster.yaml with the storage block of a Postgres deployment."""
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert "storage" not in config  # the repository's instance uses the SQLite default
    config["storage"] = {"postgres": {"postgres_db": {
        "hostname": "127.0.0.1", "port": pg.port, "username": DB_USER,
        "password": DB_PASSWORD, "db_name": DB_NAME,
        # SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3, which is not installed;
        # dagster-postgres brings psycopg2 (psycopg2-binary).
        "scheme": "postgresql+psycopg2"}}}
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def assert_outputs_equal_the_cli(result: LiveResult, cli_out: Path) -> None:
    """The CLI on the watched folders, with the sensor runs' model and settings, writes the
    same files: label maps and confidences byte for byte, records but their timings, the
    same rows in each confidences table (xlsx files carry timestamps)."""
    for folder in sorted({str(Path(key).parent) for key in result.inputs.keys}):
        code = cli_main(["-i", str(result.watch / folder), "-o", str(cli_out / folder),
                         "--onnx", str(result.inputs.model), "--device", "cpu",
                         "--no-progress", "--save-conf"])
        assert code == 0, folder
    ours, theirs = tree(result.out), tree(cli_out)
    assert sorted(ours) == sorted(theirs)
    for rel in ours:
        if rel.endswith("confidences.xlsx"):
            pd.testing.assert_frame_equal(
                pd.read_excel(result.out / rel, sheet_name="Confidences"),
                pd.read_excel(cli_out / rel, sheet_name="Confidences"))
        elif "/.itk_infer/" in f"/{rel}" and rel.endswith(".json"):
            mine, cli = (json.loads(data) for data in (ours[rel], theirs[rel]))
            mine.pop("timings_s")
            cli.pop("timings_s")
            assert mine == cli, rel
        else:
            assert ours[rel] == theirs[rel], rel


def assert_stored_in_postgres(result: LiveResult, pg: PgServer, home: Path) -> None:
    """Read the instance's tables straight from the server: the sensor's runs and the
    confidences run succeeded there, and every image's partition and materialisation is a
    row; no SQLite storage appeared in DAGSTER_HOME."""
    from dagster import AssetKey

    with _connect(**pg.dsn()) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT run_id, status FROM runs")
        statuses = dict(cursor.fetchall())
        cursor.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s",
                       (IMAGES_PARTITIONS_NAME,))
        partitions = sorted(row[0] for row in cursor.fetchall())
        cursor.execute("SELECT DISTINCT partition FROM event_logs WHERE dagster_event_type = "
                       "'ASSET_MATERIALIZATION' AND asset_key = %s",
                       (AssetKey("segmentation").to_string(),))
        materialised = sorted(row[0] for row in cursor.fetchall())
        cursor.execute("SELECT count(*) FROM alembic_version")
        (revisions,) = cursor.fetchone()
    for run in result.runs:
        assert statuses.get(run["runId"]) == "SUCCESS", run["runId"]
    assert statuses.get(result.confidences_run) == "SUCCESS", result.confidences_run
    assert partitions == materialised == sorted(result.inputs.keys)
    assert revisions == 1  # the schema is stamped: `dagster instance migrate` ran on it
    assert not [p.relative_to(home) for p in home.rglob("*.db")]


@pytest.mark.slow
def test_sensor_runs_succeed_on_postgres_storage(tmp_path, postgres):
    if not webserver_available():
        pytest.skip("dagster-webserver is not installed")
    home = tmp_path / "dagster_home"
    write_instance(home, postgres)
    result = run_live_scenario(tmp_path, home)
    assert_stored_in_postgres(result, postgres, home)
    assert_outputs_equal_the_cli(result, tmp_path / "cli")
