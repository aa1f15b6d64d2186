"""Run directories: :mod:`.run` (one run: ``gradops train``), :mod:`.extra_files` (its Recon,
selective and probe files), :mod:`.rundir` (locks and the manifest), :mod:`.recon_search`
(``gradops recon search``'s directory) and :mod:`.grid` (``gradops compare``'s grid of runs).

Imports only from the folders before it (config, tasks, data, models, engine, recon).
"""
