"""The base of gradops' optimizer wrappers: a real :class:`torch.optim.Optimizer` whose
``param_groups``, ``state`` and ``defaults`` *are* the inner optimizer's objects.

So LR schedulers (which patch ``step`` and read ``param_groups``), ``GradScaler``
(``scaler.unscale_(opt)``, ``scaler.step(opt)``), ``clip_grad_norm_`` over
``opt.param_groups``, and step hooks work on a wrapper exactly as on the inner optimizer.
"""
from __future__ import annotations

from collections import OrderedDict
from itertools import chain
from typing import Any

import torch

__all__ = ["OptimizerWrapper"]


class OptimizerWrapper(torch.optim.Optimizer):
    """Shares the inner optimizer's ``param_groups`` / ``state`` / ``defaults``; subclasses add
    their work around :meth:`step` and their own entries to :meth:`state_dict`."""

    def __init__(self, optimizer: torch.optim.Optimizer, who: str):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{who}: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        # what torch.optim.Optimizer.__init__ sets up, minus param_groups/state/defaults, which
        # are the inner optimizer's (see the properties below)
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} cannot be pickled; save state_dict() instead")

    def _params(self) -> list[torch.Tensor]:
        return list(chain.from_iterable(g["params"] for g in self.param_groups))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``.

        Args:
            set_to_none: set the gradients to None instead of zeroing them (torch's default).
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer.

        Args:
            param_group: the group, as for ``torch.optim.Optimizer.add_param_group``.
        """
        self.optimizer.add_param_group(param_group)
