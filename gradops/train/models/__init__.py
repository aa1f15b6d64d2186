"""The networks: :mod:`.encoders` (encoders and heads), :mod:`.dense` (dense-prediction
backbones), :mod:`.branch` (Recon's branching of an encoder) and :mod:`.build` (the trainer's
network for every backbone, branched with ``--recon``).

Imports only from the folders before it (config, tasks, data).
"""
