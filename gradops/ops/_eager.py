"""Plain eager calls of gradops' ops on CPU tensors, run without the torch.library dispatcher.

A call through a custom op passes a few Python layers in the dispatcher (autograd, the kernel
wrapper; more for ops that mutate an argument) that cost ~30 us with warm caches and ~150 us with
the caches cold, as they are after a pass over a large J: ~4% of one read of a 128 MiB J on a
2-core CPU. In a plain eager call none of them does anything: no input requires grad, nothing is
traced or compiled, no dispatch or torch-function mode is active, no functorch transform, and the
tensors are plain ``torch.Tensor`` objects (no FakeTensor or other subclass). Such calls run the
op's implementation directly (the same function the custom op registers); any other call goes
through the op.
"""
from __future__ import annotations

import torch


def plain_eager_cpu(*tensors: torch.Tensor | None) -> bool:
    """Whether a call with these tensor arguments (``None`` ignored) may skip the dispatcher."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._is_torch_function_mode_enabled() or \
            torch._C._are_functorch_transforms_active():
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or t.requires_grad or
                              t.device.type != "cpu"):
            return False
    return True
