"""Checks on where a command writes, made before any work, so that a bad output path fails at once.

`optimize`, `run` and `export` write atomically (a temporary entry beside the output, renamed into
place). These helpers let each of them refuse, in one line and before the slow part:

* an output location that cannot be written (a file on the way, a read-only or pseudo file system);
* an output that is, or lies inside, one of the command's own inputs (the context file, the artifact
  being read), which ``--overwrite`` would otherwise destroy;

and turn an ``OSError`` raised while writing (disk full, ...) into the same kind of one-line error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["check_writable", "refuse_input", "write_failure"]


def check_writable(path: str | Path, error: type[Exception]) -> None:
    """Raise ``error`` unless entries can be created where ``path`` will be written.

    The first existing ancestor of ``path`` must be a directory in which a file can be created. This
    is probed by creating and removing a temporary file: permission bits do not say it for root, nor
    for read-only or pseudo file systems (``/proc``, ``/sys``).
    """
    path = Path(path)
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise error(f"cannot write '{path}': '{anc}' is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".turbocompile-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise error(f"cannot write '{path}': cannot create files in '{anc}' ({exc.strerror or exc})") from None


def refuse_input(path: str | Path, inputs: dict[str, str | Path | None], error: type[Exception]) -> None:
    """Raise ``error`` if ``path`` is one of ``inputs`` (name -> path) or lies inside one of them."""
    out = Path(path).resolve()
    for what, p in inputs.items():
        if p is None:
            continue
        src = Path(p).resolve()
        if out == src or out.is_relative_to(src):
            where = "is" if out == src else "lies inside"
            raise error(f"output '{path}' {where} the {what} '{p}' this command reads; choose another output path")


def write_failure(path: str | Path, exc: BaseException, error: type[Exception]) -> Exception | None:
    """The one-line ``error`` for an I/O failure ``exc`` raised while writing ``path`` (None if not I/O).

    safetensors reports I/O failures as ``SafetensorError`` with an ``IoError`` message; its other
    errors are not about the output path and are left alone.
    """
    if isinstance(exc, OSError):
        return error(f"cannot write '{path}': {exc.strerror or exc}")
    if type(exc).__name__ == "SafetensorError" and "IoError" in str(exc):
        return error(f"cannot write '{path}': {str(exc).splitlines()[0][:200]}")
    return None
