"""``rjem server``: the one ``mlflow server`` of a cluster, started in its own session and stopped by its pid.

A cluster's runs outlive its head when the one `mlflow server` keeps them in a database server (PostgreSQL) and an
object store (s3://...): the server itself then holds nothing (docs/CLUSTER.md). `rjem server` checks the database
before it starts the server, so a wrong or unreachable URI is one line at `ray up`, not a traceback in a log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .stores import StoreError, check_database, is_database_uri

BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"  # mlflow server's own variables, read by `rjem server` too
ARTIFACTS_ENV = "MLFLOW_ARTIFACTS_DESTINATION"


def server_command(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1", port: int = 5000,
                   workers: int = 1) -> tuple[list[str], dict[str, str]]:
    """``(argv, environment)`` of the ``mlflow server`` of a stateless tracking server: runs in
    ``backend_store_uri``, artifacts uploaded and downloaded through the server (proxied: clients need no
    storage credentials) into ``artifacts_destination``. Both go in MLflow's own variables, not in argv, where
    any user of the machine would read the database's password (``ps``)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--host", host, "--port", str(port),
            "--workers", str(workers)]
    return argv, {**os.environ, BACKEND_ENV: backend_store_uri, ARTIFACTS_ENV: artifacts_destination}


def wait_for_server(url: str, proc=None, timeout_s: float = 120.0, log: str | Path | None = None) -> None:
    """Wait until ``url/health`` answers; a :class:`StoreError` with the log's last line when the server process
    ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StoreError(f"mlflow server exited with status {proc.returncode}: {_last_line(log)}")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise StoreError(f"mlflow server at {url} did not answer within {timeout_s:.0f} s: {_last_line(log)}")


def _last_line(log: str | Path | None) -> str:
    """The last line of a server log that says something (a traceback's last line is its error)."""
    try:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return "see its log"
    return lines[-1][:400] if lines else "its log is empty"


def start_server(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1", port: int = 5000,
                 workers: int = 1, log: str | Path = "mlflow-server.log", env: dict | None = None,
                 timeout_s: float = 120.0):
    """Check the database, then start ``mlflow server`` (:func:`server_command`) in its own session, so that it
    outlives the caller (``ray up``'s SSH command) and its process group can be ended alone; returns the
    ``Popen`` once ``/health`` answers. A bad store is a :class:`StoreError` before anything starts."""
    if is_database_uri(backend_store_uri):
        check_database(backend_store_uri)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv, server_env = server_command(backend_store_uri, artifacts_destination, host, port, workers)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env={**server_env, **(env or {})}, start_new_session=True)
    try:
        wait_for_server(f"http://{host}:{port}", proc, timeout_s, log)
    except BaseException:
        stop_server(proc.pid)
        raise
    return proc


def stop_server(pid: int, sig: int | None = None, timeout_s: float = 20.0) -> None:
    """End the server started as ``pid`` and its workers (its process group, :func:`start_server`), with
    ``sig`` (default SIGTERM, which MLflow's server passes to its workers), then SIGKILL after ``timeout_s``."""
    try:
        os.killpg(pid, sig or signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it when it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
