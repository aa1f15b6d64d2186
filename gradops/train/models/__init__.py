"""The networks: :mod:`.encoders` (encoders and heads), :mod:`.dense` (dense-prediction
backbones), :mod:`.branch` (Recon's branching of an encoder).

Imports only from :mod:`..config`, :mod:`..data` and :mod:`..tasks`.
"""
