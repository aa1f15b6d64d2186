"""The trainer's options: :mod:`.schema` (:class:`~.schema.TrainConfig` and its checks),
:mod:`.cli_options` (the command-line flags), :mod:`.presets` (named paper setups),
:mod:`.errors` (:class:`~.errors.ConfigError`) and :mod:`.io_errors` (OS errors named by file).

First folder of the trainer: imports nothing else from :mod:`gradops.train`.
"""
