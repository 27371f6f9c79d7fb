"""Compile-only checks of the Gluon kernels for sm90, run in a child process: under TRITON_INTERPRET (which
the test session sets) Triton's library functions are interpreter objects that Gluon cannot compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def facts_in_child(module: str, func: str, *args, **kwargs) -> dict:
    """``module.func(*args, **kwargs)`` (a dict of JSON values) computed in a child Python without
    TRITON_INTERPRET; arguments are passed by their repr."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    call = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
    code = f"import json; from {module} import {func}; print(json.dumps({func}({call})))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
