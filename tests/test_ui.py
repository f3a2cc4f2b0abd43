"""`rjem ui` serves MLflow's UI for the configured store on 127.0.0.1."""

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_configured_store(tmp_path):
    port = _free_port()
    exe = Path(sys.executable).with_name("rjem")
    proc = subprocess.Popen(
        [str(exe), "ui", "--port", str(port), "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
         "--set", f"tracking.artifact_location={tmp_path}/art"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline, body = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(1)
        assert body is not None and "OK" in body, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert (tmp_path / "m.db").is_file()  # the UI opened the configured sqlite store
    finally:
        import os

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
