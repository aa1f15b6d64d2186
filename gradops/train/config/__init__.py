"""The trainer's options: :mod:`.schema` (:class:`~.schema.TrainConfig` and its checks),
:mod:`.cli_options` (the command-line flags), :mod:`.presets` (named paper setups),
:mod:`.extras` (Recon rankings and ``--probe`` values), :mod:`.backbones` (``--backbone``
names), :mod:`.datasets` (the registry of ``--data`` names), :mod:`.errors`
(:class:`~.errors.ConfigError`), :mod:`.io_errors` (OS errors named by file) and :mod:`.atomic`
(atomic file writes).

First folder of the trainer: imports nothing else from :mod:`gradops.train`.
"""
