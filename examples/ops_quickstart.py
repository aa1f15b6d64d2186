"""Direct calls of gradops' ops on a toy multi-task problem: per-task gradients of a small shared
encoder, their Gram, per-layer Grams and the conflict statistics read off them.

    .venv/bin/python examples/ops_quickstart.py
"""
import torch

import gradops

torch.manual_seed(0)
encoder = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
heads = torch.nn.ModuleList(torch.nn.Linear(32, 1) for _ in range(4))
x, ys = torch.randn(128, 16), torch.randn(4, 128, 1)

shared = list(encoder.parameters())
features = encoder(x)
losses = [torch.nn.functional.mse_loss(h(features), y) for h, y in zip(heads, ys)]

# J: [T, P], row t = gradient of task t w.r.t. the shared parameters, flattened
J = torch.stack([torch.cat([g.flatten()
                            for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                 for loss in losses])
# one segment per layer (weight and bias together, Recon's convention)
layers = [m for m in encoder if list(m.parameters())]
offsets = gradops.offsets_from_numels(sum(p.numel() for p in m.parameters()) for m in layers)

G = gradops.gram(J)                                  # [T, T], one pass over J
Gl = gradops.segment_gram(J, offsets)                # [L, T, T], also one pass
counted = gradops.gram(J, return_sign_counts=True)   # + per-pair sign counts, same pass

print("cosine between task gradients:\n", gradops.metrics.cosine(G))
print("incidence of conflict:", gradops.metrics.conflict_incidence(G).item())
print("S-conflict score per layer (S=-0.02):", gradops.metrics.conflict_counts(Gl, -0.02).tolist())
print("sign-conflict ratio:\n", gradops.metrics.sign_conflict_ratio(counted.opposite,
                                                                   counted.both_nonzero))
print()
print(gradops.format_info())
