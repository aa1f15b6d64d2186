"""One training run's machinery: :mod:`.trainer` (the :class:`~.trainer.Trainer` and its
epoch loop), :mod:`.stats` (conflict statistics), :mod:`.probes`, :mod:`.selective`,
:mod:`.divergence`, :mod:`.checkpoint` and :mod:`.distributed` (torchrun).

Imports only from the folders before it (config, data, tasks, models).
"""
