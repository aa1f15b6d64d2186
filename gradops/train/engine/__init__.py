"""One training run's machinery: :mod:`.trainer` (the :class:`~.trainer.Trainer`: its epoch
loop and its public step API), :mod:`.optimizers` (the inner optimizer and the MTLOptimizer
from a config), :mod:`.stats` (conflict statistics), :mod:`.probes`, :mod:`.selective`,
:mod:`.divergence`, :mod:`.checkpoint` and :mod:`.distributed` (torchrun).

Imports only from the folders before it (config, tasks, data, models).
"""
