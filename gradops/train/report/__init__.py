"""The comparison report: :mod:`.data` (reading runs), :mod:`.build` (tables and
:func:`~.build.write_report`), :mod:`.published_stl` (published baselines), :mod:`.epochs`,
:mod:`.lr`, :mod:`.verdicts`, :mod:`.sweep`, :mod:`.plots` (matplotlib), :mod:`.delta_m`, and
:mod:`.recon_seeds` (Recon's claim over seeds).

Last folder of the trainer: may import from every other one.
"""
