"""The models the suites time: ViT-B/16's encoder (timm, random init, or a stand-in of the same
shapes) and the multi-task networks of the mtl suite (an MLP or a small CNN encoder, T heads)."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


# --- per-neuron top-K masks (sparse training, docs/methods.md#sparse-training)
# ------------------------------------------
# The selection of the ST paper (Zhang et al., Sec. 3.4) is computed for every Linear/Conv weight
# of the shared encoder once before training; the suite times it for all weights of ViT-B/16.
VIT_B16_SHAPES: tuple[tuple[int, ...], ...] = (
    ((768, 3, 16, 16),)                                           # patch_embed.proj (conv)
    + ((2304, 768), (768, 768), (3072, 768), (768, 3072)) * 12)   # qkv, proj, fc1, fc2 per block


def vit_b16_weights(device: torch.device, dtype: torch.dtype = torch.float32
                    ) -> tuple[list[torch.Tensor], str]:
    """The Linear/Conv weights of ViT-B/16's encoder (the classifier head left out), and where
    they came from: timm's ``vit_base_patch16_224`` (random init, no download) when timm is
    importable, else random tensors of the same shapes (:data:`VIT_B16_SHAPES`)."""
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None:
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        ws = [m.weight.detach() for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not name.startswith("head")]
        source = f"timm {timm.__version__} vit_base_patch16_224 (random init)"
    else:
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(s, generator=g) * 0.02 for s in VIT_B16_SHAPES]
        source = "synthetic tensors of ViT-B/16's shapes (timm not importable)"
    return [w.to(device=device, dtype=dtype).contiguous() for w in ws], source


# --- sparse training optimizers (docs/methods.md#sparse-training)
# ---------------------------------------------------------
class _ViTB16Encoder(torch.nn.Module):
    """A stand-in with the parameters of timm's ViT-B/16 encoder (same names and shapes), used
    when timm is not importable. Parameters only: it is never run forward."""

    def __init__(self, depth: int = 12, dim: int = 768, hidden: int = 3072, tokens: int = 197):
        super().__init__()
        nn = torch.nn
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            self.blocks.append(b)
        self.norm = nn.LayerNorm(dim)


def vit_b16_encoder(device: torch.device) -> tuple[torch.nn.Module, str]:
    """ViT-B/16's encoder (no classifier head; 85.8M parameters) on ``device``: timm's
    ``vit_base_patch16_224`` with ``num_classes=0`` (random init, no download) when timm is
    importable, else :class:`_ViTB16Encoder` (the same parameter names and shapes)."""
    torch.manual_seed(0)
    try:
        import timm
    except ImportError:
        return _ViTB16Encoder().to(device), "ViT-B/16-shaped stand-in (timm not importable)"
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    return model.to(device), f"timm {timm.__version__} vit_base_patch16_224 encoder (random init)"


# --- the model ----------------------------------------------------------------------------------
class MTLNet(nn.Module):
    """``depth`` x (``Linear(width, width)`` + ReLU) shared encoder, ``T`` heads
    ``Linear(width, head_out)``."""

    def __init__(self, T: int, width: int = 1024, depth: int = 4, head_out: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, head_out) for _ in range(T))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.encoder(x)
        return f, [h(f) for h in self.heads]


CNN_CHANNELS = (32, 64, 128, 256)
"""The mtl suite's CNN encoder: conv3x3 (stride 2) + BatchNorm + ReLU per entry on
``3 x 32 x 32`` inputs (feature maps 16, 8, 4, 2 pixels wide), then a global average pool:
387,936 conv weights + 960 BatchNorm parameters shared, ~0.12 G multiply-adds per forward at
batch 32 (few per parameter: the per-task buffer's cost weighs more than in a wide CNN)."""


class MTLConvNet(nn.Module):
    """A small CNN encoder (:data:`CNN_CHANNELS`, conv3x3 + BatchNorm + ReLU, global average
    pool) and ``T`` heads ``Linear(channels[-1], head_out)``. With ``linear_gram="off"`` every
    shared parameter takes the J path; as shipped, the factored engine takes the last
    convolution (a 2 x 2 output map: 128 rows at batch 32) from ``T = 8`` on, the rest stays in
    ``J``."""

    def __init__(self, T: int, channels: Sequence[int] = CNN_CHANNELS, head_out: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(c_in, head_out) for _ in range(T))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.encoder(x)
        return f, [h(f) for h in self.heads]


ENCODERS = ("mlp", "cnn")


@dataclasses.dataclass
class MTLSetup:
    """A model, its fixed batch, and the constructor arguments of the contenders."""
    T: int
    width: int
    depth: int
    batch: int
    head_out: int
    device: torch.device
    model: MTLNet
    x: torch.Tensor
    y: torch.Tensor           # [T, batch, head_out]
    lr: float = 1e-4
    encoder: str = "mlp"      # "mlp" (MTLNet) or "cnn" (MTLConvNet)

    def describe(self) -> str:
        """The model in words (for the suite's header)."""
        if self.encoder == "cnn":
            return (f"CNN encoder 4 x (conv3x3 stride 2 + BatchNorm + ReLU), channels "
                    f"{CNN_CHANNELS}, 3 x 32 x 32 inputs ({self.shared_params:,} shared "
                    f"parameters), batch {self.batch}")
        return (f"MLP encoder {self.depth} x Linear({self.width}, {self.width}) "
                f"({self.shared_params:,} shared parameters), batch {self.batch}")

    @property
    def shared_params(self) -> int:
        return sum(p.numel() for p in self.model.encoder.parameters())

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def fresh(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A copy of the model (same initial weights) and a fresh SGD over all its parameters."""
        m = copy.deepcopy(self.model)
        return m, torch.optim.SGD(m.parameters(), lr=self.lr)

    def losses(self, outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [F.mse_loss(o, self.y[t]) for t, o in enumerate(outs)]


def make_setup(T: int, device: torch.device | str = "cpu", width: int = 1024, depth: int = 4,
               batch: int | None = None, head_out: int = 16, seed: int = 0,
               encoder: str = "mlp") -> MTLSetup:
    """The mtl suite's model and fixed batch: ``encoder="mlp"`` (:class:`MTLNet`, batch 64 by
    default) or ``"cnn"`` (:class:`MTLConvNet` on ``3 x 32 x 32`` images, batch 32 by default;
    ``width`` / ``depth`` unused)."""
    if encoder not in ENCODERS:
        raise ValueError(f"make_setup: encoder must be one of {ENCODERS}, got {encoder!r}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    batch = batch or (32 if encoder == "cnn" else 64)
    model = (MTLConvNet(T, head_out=head_out) if encoder == "cnn" else
             MTLNet(T, width, depth, head_out)).to(dev)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (batch, 3, 32, 32) if encoder == "cnn" else (batch, width)
    x = torch.randn(shape, generator=g).to(dev)
    y = torch.randn(T, batch, head_out, generator=g).to(dev)
    return MTLSetup(T, width, depth, batch, head_out, dev, model, x, y, encoder=encoder)
