"""The tasks' losses and metrics: :mod:`.types` (classification, binary, regression),
:mod:`.dense` (segmentation, depth, normals, attributes) and :mod:`.metrics` (metric
accumulation over batches and ranks).

Imports only from :mod:`..config` and :mod:`..data`.
"""
