"""The tasks' losses and metrics: :mod:`.types` (classification, binary, regression),
:mod:`.dense` (segmentation, depth, normals, attributes) and :mod:`.metrics` (metric
accumulation over batches and processes).

Imports nothing else from :mod:`gradops.train`: the data sets (:mod:`gradops.train.data`)
declare their tasks with these types, so this folder comes before ``data/``.
"""
