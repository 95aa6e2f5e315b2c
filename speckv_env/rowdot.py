"""The row-invariant float32 product for CPU (``csrc/rowdot.c``), compiled once per host.

:func:`linear` computes ``x @ w.T + b`` so that every output row is bit-identical whatever
the number of rows in the call (see the C file for why). The kernel is compiled with the
host's C compiler (``$CC``, else ``cc`` or ``gcc``) for this CPU (``-march=native``) the first
time it is needed, a second or two, into the cache folder (``$SPECKV_CACHE`` or
``~/.cache/speckv``), keyed by the source, the flags, the compiler and the CPU; the compiled
library is written atomically, so a crash mid-build leaves nothing half-written behind.

Without a working C compiler :func:`available` is False and callers use the fixed-width torch
path (:mod:`speckv_env.invariant`), which is row-invariant too, only slower on some CPUs.
``SPECKV_ROWDOT=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_state: dict[str, object] = {}


def _source() -> Path:
    return Path(str(resources.files("speckv_env") / "csrc" / "rowdot.c"))


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    from .models import cache_dir

    src = _source().read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()]))
    out = cache_dir() / "kernels" / f"rowdot-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(_source()), "-o", tmp], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise OSError(f"{cc} failed to compile {_source()}: {r.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load():
    if "fn" in _state:
        return _state["fn"]
    fn = None
    if os.environ.get("SPECKV_ROWDOT", "1") != "0":
        cc = _compiler()
        if cc is None:
            log.warning("no C compiler found ($CC, cc, gcc): row-invariant products use the slower torch path")
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
                fn = lib.speckv_rowdot_linear
                fn.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_int64,
                    ctypes.c_int64,
                    ctypes.c_void_p,
                    ctypes.c_int64,
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                ]
                fn.restype = None
            except OSError as e:
                log.warning("row-invariant CPU kernel unavailable (%s): using the slower torch path", e)
                fn = None
    _state["fn"] = fn
    return fn


def available() -> bool:
    """True when the compiled kernel can be used on this host."""
    return _load() is not None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + b`` for float32 CPU tensors, each output row independent of the others in bits.

    ``x``: [..., in]; ``w``: [out, in]; ``b``: [out] or None. Requires :func:`available`.
    """
    fn = _load()
    if fn is None:
        raise RuntimeError("the row-invariant CPU kernel is not available on this host (see speckv_env.rowdot)")
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in).contiguous()
    w = w.contiguous()
    y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.float32)
    bias = b.contiguous() if b is not None else None
    fn(
        x2.data_ptr(),
        x2.shape[0],
        n_in,
        w.data_ptr(),
        w.shape[0],
        bias.data_ptr() if bias is not None else None,
        y.data_ptr(),
    )
    return y.reshape(*x.shape[:-1], w.shape[0])
