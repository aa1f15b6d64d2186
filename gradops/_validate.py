"""Argument checks shared by the ops: clear errors that name the offending argument."""
from __future__ import annotations

import torch

#: The floating dtypes every op takes. float32, bfloat16 and float16 inputs accumulate in float32;
#: float64 inputs accumulate in float64 (on the torch path: no kernel computes in float64).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: What the error message lists as accepted.
FLOAT_NAMES = "float32, bfloat16, float16 or float64"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and floating result) dtype for inputs of ``dtype``: float64 for float64,
    float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_matrix(J: torch.Tensor, op: str, name: str = "J") -> None:
    """``J`` must be a 2-D ``[T, P]`` floating tensor (fp32 / bf16 / fp16 / fp64), ``T >= 1``."""
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"gradops.{op}: {name} must be a torch.Tensor, got {type(J).__name__}")
    if J.layout != torch.strided:
        raise TypeError(f"gradops.{op}: {name} must be a dense (strided) tensor, got layout "
                        f"{J.layout} (use {name}.to_dense())")
    if J.dim() != 2:
        raise ValueError(f"gradops.{op}: {name} must be 2-D [T, P] (one row per task), "
                         f"got shape {tuple(J.shape)}")
    if J.dtype not in FLOAT_DTYPES:
        raise TypeError(f"gradops.{op}: {name} must be {FLOAT_NAMES}, got {J.dtype}")
    if J.shape[0] < 1:
        raise ValueError(f"gradops.{op}: {name} must have at least one row (T >= 1), "
                         f"got shape {tuple(J.shape)}")


def check_offsets(offsets: torch.Tensor, P: int, op: str, J_device: torch.device,
                  name: str = "offsets") -> None:
    """A segment table: 1-D int64 ``[L+1]``, ``offsets[0] == 0``, non-decreasing, ending at ``P``.

    Values are checked only when ``offsets`` is on the CPU (reading device values would
    synchronise with the device); keep segment tables on the CPU, gradops moves them. While
    ``torch.compile`` traces, values are not read; the op checks them when it runs.
    """
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"gradops.{op}: {name} must be a torch.Tensor of int64, "
                        f"got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"gradops.{op}: {name} must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"gradops.{op}: {name} must be 1-D [L+1] with L >= 1 segments, "
                         f"got shape {tuple(offsets.shape)}")
    if offsets.device.type != "cpu" and offsets.device != J_device:
        raise ValueError(f"gradops.{op}: {name} must be on the CPU or on J's device ({J_device}), "
                         f"got {offsets.device}")
    if offsets.device.type != "cpu" or _is_fake(offsets) or torch.compiler.is_compiling():
        return
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise ValueError(f"gradops.{op}: {name}[0] must be 0, got {first}")
    if last != P:
        raise ValueError(f"gradops.{op}: {name} must end at P = {P} (the number of columns of J), "
                         f"got {name}[-1] = {last}: the segments must cover every column")
    decreasing = offsets[1:] < offsets[:-1]
    if bool(decreasing.any()):
        bad = int(torch.nonzero(decreasing)[0, 0])
        raise ValueError(f"gradops.{op}: {name} must be non-decreasing, got {name}[{bad}] = "
                         f"{int(offsets[bad])} > {name}[{bad + 1}] = {int(offsets[bad + 1])}")


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def same_device(a: torch.Tensor, b: torch.Tensor, op: str, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"gradops.{op}: {name_a} and {name_b} must be on the same device, "
                         f"got {a.device} and {b.device}")
