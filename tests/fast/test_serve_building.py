"""Deploys built at once in one process (a gateway worker's deploy threads): Serve serializes a deployment's
request router between cloudpickle's process-wide register_pickle_by_value and unregister_pickle_by_value,
so two deployments built at the same moment failed one with "... is not registered for pickle by value"
(tests/test_faults.py saw it in a fresh gunicorn worker). ``serve_apps.bind_endpoint`` builds one at a time."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]

#: a fresh process (the first deployment is made there too), 16 threads building at once, 25 rounds; no Ray
#: cluster is needed to build a Serve application
PROBE = """
import threading
import gateway, providers
from gateway.config import Settings
from gateway.serve_apps import bind_endpoint

provider = providers.get("openai")
settings = Settings()
spec = provider.spec_class.model_validate({"chat_name": "probe", "model_name": "m", "api_key": "sk-probe"})
failures = []

def build():
    try:
        bind_endpoint(provider, spec, settings)
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")

for _ in range(25):
    threads = [threading.Thread(target=build) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print("FAILURES", len(failures), failures[:1])
"""


def test_deployments_built_at_once_in_one_process_all_build():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("FAILURES")]
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    assert line[0].startswith("FAILURES 0 "), line[0]
