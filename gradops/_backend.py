"""Backend discovery and selection.

Every op has up to four implementations ("backends"):

========  ======================================================  ===========
name      what                                                    devices
========  ======================================================  ===========
triton    Triton kernels (``gradops/ops/*.py``)                   cuda (cpu only under
``TRITON_INTERPRET=1``)
cuda      CUDA C++ kernels in ``gradops._C`` (``csrc/*.cu``)      cuda
cpp       C++ CPU kernels in ``gradops._C`` (``csrc/*_cpu.cpp``)  cpu
torch     pure-torch reference (``gradops/reference.py``)         any
========  ======================================================  ===========

Default choice: CUDA tensors -> ``triton`` (then ``cuda``, then ``torch``); CPU tensors -> ``cpp``
(then ``torch``). Triton is never launched on CPU tensors unless ``TRITON_INTERPRET=1``.
The kernels of the Gram, combine, PCGrad and GradDrop ops take float32 / bfloat16 / float16
(:data:`KERNEL_DTYPES`, float32 accumulation); float64 inputs take the ``torch`` path on every
device, which accumulates in float64.

Forcing one backend (tests, benchmarks): the environment variable ``GRADOPS_BACKEND`` or the
context manager :func:`use_backend`. A forced backend that cannot serve a call raises
(no silent fallback).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("triton", "cuda", "cpp", "torch")
#: Input dtypes of the Triton, CUDA and C++ kernels of the ops that register them as their
#: limit (they accumulate in float32); other dtypes (float64) go to the torch path.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# --- the compiled extension -------------------------------------------------------------------
try:
    _C = importlib.import_module("gradops._C")
    EXT_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    EXT_ERROR = f"{type(e).__name__}: {e}"


def ext_available() -> bool:
    """Whether the compiled extension ``gradops._C`` could be imported."""
    return _C is not None


def cuda_ext_available() -> bool:
    """Whether ``gradops._C`` was compiled with the CUDA kernels."""
    return _C is not None and bool(_C.cuda_built())


# --- Triton -----------------------------------------------------------------------------------
def triton_interpret() -> bool:
    """Whether Triton runs in interpreter mode (kernels execute on CPU tensors via numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_output(out: torch.Tensor) -> torch.Tensor:
    """Where a Triton kernel should write ``out``: the interpreter narrows fp32 to bf16 by
    truncation (not round-to-nearest as on a GPU), so it writes bf16 results to an fp32 buffer
    that the caller then copies into ``out`` with torch's rounding."""
    if triton_interpret() and out.dtype == torch.bfloat16:
        return torch.empty(out.shape, dtype=torch.float32, device=out.device)
    return out


_triton_import: tuple[bool, str | None] | None = None


def triton_importable() -> tuple[bool, str | None]:
    global _triton_import
    if _triton_import is None:
        try:
            importlib.import_module("triton")
            _triton_import = (True, None)
        except Exception as e:  # ImportError, or a broken install
            _triton_import = (False, f"{type(e).__name__}: {e}")
    return _triton_import


def triton_available(device: torch.device) -> bool:
    """Triton can run on ``device``: a CUDA device, or a CPU device under the interpreter."""
    if not triton_importable()[0]:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and not triton_interpret()
    return device.type == "cpu" and triton_interpret()


# --- selection --------------------------------------------------------------------------------
_local = threading.local()


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every gradops op in this thread to use backend ``name`` (``None``: automatic).

    A context manager; the previous choice comes back on exit.

    Args:
        name: one of :data:`BACKENDS` (``"torch"``, ``"cpp"``, ``"triton"``...), or None.

    Raises:
        ValueError: for a name not in :data:`BACKENDS` (on entry). An op that cannot run on
            the forced backend raises when it is called.

    Example::

        with gradops.use_backend("torch"):
            G_ref = gradops.gram(J)
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``GRADOPS_BACKEND`` (``None``: automatic)."""
    name = getattr(_local, "forced", None)
    if name is None:
        name = os.environ.get("GRADOPS_BACKEND") or None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"GRADOPS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def backend_usable(name: str, device: torch.device, max_t: dict[str, int], T: int,
                   dtype: torch.dtype | None = None,
                   dtypes: dict[str, tuple[torch.dtype, ...]] | None = None) -> str | None:
    """``None`` if backend ``name`` can serve a call on ``device`` with ``T`` rows (and inputs of
    ``dtype``, when the op limits ``name`` to ``dtypes[name]``), else why not."""
    if name == "torch":
        return None
    if name in max_t and T > max_t[name]:
        return f"the {name} kernel supports T <= {max_t[name]}, got T = {T}"
    if dtype is not None and dtypes and name in dtypes and dtype not in dtypes[name]:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in dtypes[name])
        return (f"the {name} kernel takes {accepted} inputs, got {dtype} (use the torch "
                f"backend, or the automatic choice, for {dtype})")
    if name == "triton":
        ok, err = triton_importable()
        if not ok:
            return f"triton is not importable ({err})"
        if device.type == "cpu" and not triton_interpret():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type == "cuda" and triton_interpret():
            return "TRITON_INTERPRET=1 is set; interpreted kernels take CPU tensors"
        if device.type not in ("cpu", "cuda"):
            return f"no Triton kernels for device type {device.type!r}"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the CUDA C++ kernels take CUDA tensors, got a {device.type} tensor"
        if not cuda_ext_available():
            return "gradops._C was built without CUDA kernels" if _C is not None else (
                f"gradops._C is not available ({EXT_ERROR})")
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, got a {device.type} tensor"
        if _C is None:
            return f"gradops._C is not available ({EXT_ERROR})"
        return None
    return f"unknown backend {name!r}"


_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def auto_backend(device: torch.device, T: int, max_t: dict[str, int] | None = None,
                 backends: tuple[str, ...] = BACKENDS, dtype: torch.dtype | None = None,
                 dtypes: dict[str, tuple[torch.dtype, ...]] | None = None) -> str:
    """The backend chosen when none is forced: the first usable one in the device's order."""
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if name in backends and \
                backend_usable(name, device, max_t or {}, T, dtype, dtypes) is None:
            return name
    return "torch"


def select_backend(op: str, device: torch.device, T: int, dtype: torch.dtype | None = None
                   ) -> str:
    """Pick the backend for one call of registered op ``op`` on ``device`` with ``T`` rows and
    inputs of ``dtype`` (``None``: not checked).

    A forced backend (:func:`use_backend`, ``GRADOPS_BACKEND``) applies to the ops that implement
    it; an op without that backend (e.g. a ``T x T`` solver without a C++ version) makes its
    automatic choice. A forced backend that the op has but that cannot serve this call (wrong
    device, T too large, a dtype its kernel does not take, e.g. float64) raises
    ``RuntimeError``: no silent fallback.
    """
    backends, max_t = _OPS[op]
    dtypes = _OP_DTYPES.get(op)
    forced = forced_backend()
    if forced is not None and forced in backends:
        why = backend_usable(forced, device, max_t, T, dtype, dtypes)
        if why is not None:
            raise RuntimeError(f"gradops.{op}: forced backend {forced!r} cannot run this call: "
                               f"{why}")
        return forced
    return auto_backend(device, T, max_t, backends, dtype, dtypes)


# --- op registry and the `info` report -----------------------------------------------------------
_OPS: dict[str, tuple[tuple[str, ...], dict[str, int]]] = {}
_OP_DTYPES: dict[str, dict[str, tuple[torch.dtype, ...]]] = {}


def register_op(name: str, backends: tuple[str, ...], max_t: dict[str, int] | None = None,
                dtypes: dict[str, tuple[torch.dtype, ...]] | None = None) -> None:
    """Declare which backends implement op ``name`` (and their limits on T), for :func:`info`.

    ``dtypes``: per backend, the input dtypes its kernel takes (a backend not named takes every
    dtype the op accepts); :func:`select_backend` routes other dtypes elsewhere.
    """
    _OPS[name] = (backends, dict(max_t or {}))
    _OP_DTYPES[name] = dict(dtypes or {})


def info() -> dict:
    """Which backends are live for each op and device, and why the others are not.

    Returns a dict::

        {"torch": ..., "triton": ..., "extension": ..., "cuda_available": ...,
         "forced_backend": ..., "ops": {op: {device_type: {"default": name,
                                                             "default_float64": name,
                                                             "live": [names],
                                                             "unavailable": {name: why}}}}}
    """
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    ok, err = triton_importable()
    tri_version = None
    if ok:
        tri_version = importlib.import_module("triton").__version__
    report: dict = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": tri_version if ok else f"unavailable ({err})",
        "triton_interpret": triton_interpret(),
        "extension": ("built (CPU + CUDA kernels)" if cuda_ext_available() else
                      "built (CPU kernels)" if _C is not None else f"unavailable ({EXT_ERROR})"),
        "openmp_threads": _C.openmp_max_threads() if _C is not None else None,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "forced_backend": forced_backend(),
        "ops": {},
    }
    for op, (backends, max_t) in _OPS.items():
        per_dev = {}
        for dev in devices:
            live, why_not = [], {}
            for b in backends:
                # T = 1 here: limits on T are listed separately
                why = backend_usable(b, dev, {}, 1)
                (live.append(b) if why is None else why_not.__setitem__(b, why))
            f64 = auto_backend(dev, 1, max_t, backends, torch.float64, _OP_DTYPES.get(op))
            per_dev[dev.type] = {"default": auto_backend(dev, 1, max_t, backends),
                                 "default_float64": f64, "live": live,
                                 "unavailable": why_not,
                                 "max_T": {b: t for b, t in max_t.items() if b in live}}
        report["ops"][op] = per_dev
    return report


def format_info(report: dict | None = None) -> str:
    """:func:`info` as a human-readable table.

    Args:
        report: a dict returned by :func:`info`; None calls :func:`info`.

    Returns:
        The table, lines joined by newlines.
    """
    r = report or info()
    lines = [f"gradops backends (torch {r['torch']}, CUDA build {r['torch_cuda']}, "
             f"triton {r['triton']}{', TRITON_INTERPRET=1' if r['triton_interpret'] else ''})",
             f"  extension gradops._C: {r['extension']}"
             + (f", OpenMP threads: {r['openmp_threads']}" if r["openmp_threads"] else ""),
             f"  CUDA device: {r['cuda_device'] or 'none visible'}",
             f"  forced backend: {r['forced_backend'] or 'none (automatic)'}", ""]
    width = max(len(op) for op in r["ops"]) if r["ops"] else 4
    lines.append(f"  {'op':<{width}}  device  default  live backends (T limits)")
    for op, per_dev in r["ops"].items():
        for dev, d in per_dev.items():
            live = ", ".join(b + (f" (T<={d['max_T'][b]})" if b in d["max_T"] else "")
                             for b in d["live"])
            f64 = d.get("default_float64", d["default"])
            lines.append(f"  {op:<{width}}  {dev:<6}  {d['default']:<7}  {live}"
                         + (f"; float64: {f64}" if f64 != d["default"] else ""))
    missing = {(dev, b): why for per_dev in r["ops"].values() for dev, d in per_dev.items()
               for b, why in d["unavailable"].items()}
    if missing:
        lines += ["", "  not live:"]
        lines += [f"    {b} on {dev}: {why}" for (dev, b), why in sorted(missing.items())]
    return "\n".join(lines)
