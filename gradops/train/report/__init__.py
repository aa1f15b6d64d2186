"""The comparison report: :mod:`.data` (reading runs), :mod:`.baseline` and
:mod:`.published_stl` (the baselines of Δm%), :mod:`.build` (tables and
:func:`~.build.write_report`), :mod:`.epochs`, :mod:`.lr`, :mod:`.verdicts`, :mod:`.sweep`,
:mod:`.plots` (matplotlib), :mod:`.delta_m`, :mod:`.compare` (``run_grid``: the grid, then the
report) and :mod:`.recon_seeds` (Recon's claim over seeds).

Last folder of the trainer: may import from every other one.
"""
