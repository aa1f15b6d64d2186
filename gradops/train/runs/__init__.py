"""Run directories: :mod:`.run` (one run: ``gradops train``), :mod:`.rundir` (locks and the
manifest) and :mod:`.grid` (``gradops compare``'s grid of runs).

Imports only from the folders before it (config, data, tasks, models, engine, recon).
"""
