"""Small C kernels for the CPU paths, built on first use with the system C compiler.

Why C and ctypes rather than a torch C++ extension: these kernels take raw
pointers and need no torch headers, so a build takes about a second instead of
a minute. The shared object is cached under ``$LLMOPT_CACHE_DIR`` (default
``~/.cache/llmopt``) keyed by the source, the compiler and this CPU's flags
(it is built with ``-march=native``). The compiler is ``$CC``, else ``cc`` or
``gcc`` on the PATH. Without one (or with ``$CC`` naming no program) :func:`load`
returns None and callers use their PyTorch path instead. Whether a compiled graph uses
these kernels at all is the ``kernels.native`` option (``LLMOPT_NATIVE=0`` is
its override, read when the options are built), decided per site by the passes.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

__all__ = ["function", "load"]

_log = logging.getLogger("llmopt")
_SOURCE_DIR = Path(__file__).resolve().parent
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno")
_lock = threading.Lock()
_loaded: dict[str, Optional[ctypes.CDLL]] = {}


def load(name: str) -> Optional[ctypes.CDLL]:
    """The compiled ``<name>.c`` of this folder as a ctypes library, or None if unavailable."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_open(name)
        return _loaded[name]


def function(name: str, symbol: str, argtypes: list, restype=ctypes.c_int):
    """``symbol`` of the compiled ``<name>.c`` with its ctypes signature set, or None if unavailable."""
    lib = load(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


def _build_and_open(name: str) -> Optional[ctypes.CDLL]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is not None and shutil.which(compiler) is None:
        compiler = None  # $CC names no program: the same as no compiler
    if compiler is None:
        _log.info("llmopt: no C compiler found; the CPU kernel %r falls back to PyTorch ops", name)
        return None
    # The key covers the shared headers too: a change there rebuilds every kernel.
    source = (_SOURCE_DIR / f"{name}.c").read_text() + "".join(
        header.read_text() for header in sorted(_SOURCE_DIR.glob("*.h")))
    target = _cache_dir() / f"{name}-{_build_key(compiler, source)}.so"
    if not target.exists():
        try:
            _compile(compiler, _SOURCE_DIR / f"{name}.c", target)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            _log.warning("llmopt: building the CPU kernel %r failed (%s); using PyTorch ops instead. %s",
                         name, error, detail.decode(errors="replace")[-2000:])
            return None
    return ctypes.CDLL(str(target))


def _cache_dir() -> Path:
    root = Path(os.environ.get("LLMOPT_CACHE_DIR") or Path.home() / ".cache" / "llmopt")
    path = root / "native"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_key(compiler: str, source: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (source, version, " ".join(_FLAGS), platform.machine(), _cpu_flags()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    # -march=native code is only valid on a CPU with the same instruction sets.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, source: Path, target: Path) -> None:
    # Build beside the target, then rename: concurrent processes never see half a file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([compiler, *_FLAGS, "-o", str(partial), str(source), "-lm"],
                       check=True, capture_output=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
