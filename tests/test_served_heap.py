"""The app `llm-proxy serve` builds (`app_from_env`) freezes its startup heap: the modules and the
app, alive as long as the process, are out of the garbage collector's sight, so a full collection
(~70 ms of CPU and a pause of every stream when it scanned them) only scans what came later."""

from __future__ import annotations

import subprocess
import sys

from tests.support.configs import config_dict
from tests.support.processes import write_config

PROBE = """
import gc, os, sys
os.environ["LLM_PROXY_CONFIG"] = sys.argv[1]
from proxy.app import app_from_env
app_from_env()
print(gc.get_freeze_count(), len(gc.get_objects()))
"""


def test_the_served_app_freezes_what_startup_built(tmp_path):
    path = write_config(tmp_path / "config.yaml", config_dict("http://127.0.0.1:9/v1"))
    probe = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    frozen, tracked = map(int, probe.stdout.split())
    assert frozen > 20_000, "the startup heap is scanned by every full collection"
    assert tracked < frozen / 10
