"""Build script for gradops' compiled extension ``gradops._C``.

The package itself is pure Python (metadata in ``pyproject.toml``); this file only adds the
extension, built with ``torch.utils.cpp_extension`` and ninja:

* C++ CPU kernels (OpenMP) are always built.
* CUDA kernels are built when a CUDA toolkit is found and torch is a CUDA build. The decision is
  made from the toolchain (``nvcc`` + ``torch.version.cuda``), never from a visible GPU.

Environment switches:

* ``GRADOPS_NO_EXT=1``   skip the extension entirely (every op then uses Triton / torch paths).
* ``GRADOPS_NO_CUDA=1``  build the CPU kernels only.
* ``CUDA_HOME``          toolkit root; otherwise found from the real path of ``nvcc``.
* ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0`` (A100, H100) when no GPU is visible.
* ``MAX_JOBS``           parallel compile jobs for ninja (default 2).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, from ``CUDA_HOME`` or from where ``nvcc`` really lives.

    The ``nvcc`` on PATH may be a wrapper script that execs the real compiler elsewhere
    (some CUDA installs put such a wrapper on PATH); the toolkit is the directory that has
    ``include/cuda_runtime.h``.
    """
    def is_toolkit(d: Path) -> bool:
        return (d / "include" / "cuda_runtime.h").is_file() and (d / "bin" / "nvcc").exists()

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and is_toolkit(Path(os.environ[var])):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(os.path.realpath(nvcc))
    if is_toolkit(real.parent.parent):
        return str(real.parent.parent)
    try:  # a wrapper script: look for the compiler it execs
        text = real.read_text(errors="ignore")[:4096]
    except OSError:
        text = ""
    for m in re.finditer(r"(/[^\s\"']*/bin/nvcc)\b", text):
        cand = Path(os.path.realpath(m.group(1))).parent.parent
        if is_toolkit(cand):
            return str(cand)
    for cand in (Path("/usr/local/cuda"),):
        if is_toolkit(cand):
            return str(cand)
    return None


def build_extensions():
    if _flag("GRADOPS_NO_EXT"):
        print("gradops: GRADOPS_NO_EXT set, skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", "2")
    # torch >= 2.10 headers need C++20 (bindings.cpp); the kernel files are plain C++17/CUDA
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    # sparse_adamw_cpu.cpp turns fp contraction off itself (a pragma: per-file flags are not
    # possible here, and the other kernels keep the default)
    # every C++ file in csrc/ (a new kernel file needs no edit here; docs/adding-an-op.md)
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    define_macros = []
    extra_link = ["-fopenmp"]

    cuda_home = None if _flag("GRADOPS_NO_CUDA") else find_cuda_home()
    with_cuda = cuda_home is not None and torch.version.cuda is not None
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # the helper caches its own guess at import time
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
        define_macros.append(("GRADOPS_WITH_CUDA", None))
        print(f"gradops: building CUDA kernels with CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')}",
              file=sys.stderr)
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]}
    else:
        why = "GRADOPS_NO_CUDA set" if _flag("GRADOPS_NO_CUDA") else (
            "no CUDA toolkit found" if cuda_home is None else "torch is a CPU-only build")
        print(f"gradops: building CPU kernels only ({why})", file=sys.stderr)
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}

    ext = ext_cls(
        name="gradops._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=extra_link,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = build_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
