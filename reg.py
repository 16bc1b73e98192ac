"""
REG: Representation Entanglement for Generation, in one file.

Papers:  REG   Wu et al., NeurIPS 2025          https://arxiv.org/abs/2507.01467
         REPA  Yu et al., ICLR 2025             https://arxiv.org/abs/2410.06940
         SiT   Ma et al., ECCV 2024             https://arxiv.org/abs/2401.08740 (on DiT's adaLN-Zero blocks, 2212.09748)

A SiT transformer predicts the velocity v of a noised image x_t. REPA aligns the hidden states of an early block with the
patch features of a frozen DINOv2. REG prepends ONE token to the patch tokens: the DINOv2 class token `cls` of the same
image, noised with the same t, and predicts its velocity `v_cls` too (REG Sec. 3):

    L = |v_hat - v|^2  +  beta * |v_cls_hat - v_cls|^2  +  lambda * mean_n -cos(h_phi(h_n), z_n)    (n over all 1+T tokens)

Time convention (used everywhere below): t = 0 is data, t = 1 is noise;  x_t = alpha_t x + sigma_t eps.
Shape legend: B batch, C channels, H W image side, p patch, T = HW/p^2 patch tokens, D width, E encoder width.
Names: `cond` the adaLN conditioning (time + label), `cls` / `cls_t` / `v_cls` the REG token / noised / its velocity,
`feats` the frozen encoder's output (class token, patch tokens), `x_t` / `v` the noised image / its velocity.
Markers: a line ending in `# [REPA]` is what REPA adds to SiT, `# [REG]` what the REG paper adds to SiT+REPA (grep it
to read the paper's delta, the joint loss included), `# [ours]` what this file adds (token_dim: the token on its top-K
principal directions; the too-wide warning).
Inputs are checked once, at the entry points (reg_loss, sample): the layers below them never check.

Part A (sections 1-7) is the method: copy it on its own, it never uses Part B. A copier's round trip:
    model = make_model("SiT-B/2", "reg", input_size=32, in_channels=3, num_classes=10)   or  load_model("file.pt")
    loss = reg_loss(model, x, y, encoder(images))["loss"];  ema_update(ema, model)
    images, tokens = sample(ema, noise, y, token_noise);  save_model("file.pt", ema)
Part B (sections 8-9) is the training kit the scripts share: run folders, devices, speed, FD, plots, diagnostics.
"""

import argparse
import functools
import hashlib
import json
import math
import os
import random
import signal
import socket
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# ======================================================================================================================
# PART A. THE METHOD
# ======================================================================================================================

# 1. Building blocks (SiT Sec. 3 / DiT Sec. 3.2) -----------------------------------------------------------------------


def modulate(h, shift, scale):
    return h * (1 + scale) + shift


def unpatchify(x, p, grid):
    """(B, T, p*p*C) -> (B, C, H, W); each token is laid out (row in patch, column in patch, channel), channel fastest."""
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, p=p, q=p)


def sincos_1d(dim, positions):
    """Positions (T,) -> (T, dim) as [sin | cos] of position * 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angle = positions.flatten().double()[:, None] * omega  # (T, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=1)  # (T, dim)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos positions (MAE recipe): the first half of the channels encodes the column, the second the row."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    column_part = sincos_1d(dim // 2, cols)  # (T, D/2)
    row_part = sincos_1d(dim // 2, rows)  # (T, D/2)
    return torch.cat([column_part, row_part], dim=1).float()  # (T, D)


def timestep_embedding(t, dim=256):
    """t in [0, 1] -> (B, 256) sinusoid of t itself (not 1000 t), cos first; an MLP follows in TimestepEmbedder."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))  # (128,)
    angle = t.float()[:, None] * freqs[None]  # (B, 128)
    return torch.cat([angle.cos(), angle.sin()], dim=-1)  # (B, 256)


class PatchEmbed(nn.Module):
    """p x p patches -> tokens: one strided convolution, i.e. one linear map per patch."""

    def __init__(self, in_channels, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x):  # x (B, C, H, W)
        h = self.proj(x)  # (B, D, H/p, W/p)
        return rearrange(h, "b d h w -> b (h w) d")  # (B, T, D)


class TimestepEmbedder(nn.Module):
    """t -> (B, D): a sinusoid of t through a two-layer MLP (DiT)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t (B,)
        return self.mlp(timestep_embedding(t))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> (B, D); the extra row K is the null label of classifier-free guidance (dropped in reg_loss)."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):  # y (B,)
        return self.embedding_table(y)  # (B, D)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens, written out on fused SDPA."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h):  # h (B, N, D)
        qkv = self.qkv(h)  # (B, N, 3D)
        qkv = rearrange(qkv, "b n (three k d) -> three b k n d", three=3, k=self.heads)  # (3, B, heads, N, D/heads)
        q, k, v = qkv.unbind(0)  # 3 x (B, heads, N, D/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        h = rearrange(h, "b k n d -> b n (k d)")  # (B, N, D)
        return self.proj(h)  # (B, N, D)


class SiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning `cond` (adaLN-Zero, DiT Sec. 3.2)."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        fc1 = nn.Linear(dim, hidden)
        fc2 = nn.Linear(hidden, dim)
        self.mlp = nn.Sequential(OrderedDict(fc1=fc1, act=nn.GELU(approximate="tanh"), fc2=fc2))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, h, cond):  # h (B, N, D), cond (B, D)
        modulation = self.adaLN_modulation(cond)[:, None]  # (B, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)  # 6 x (B, 1, D)
        h = h + gate1 * self.attn(modulate(self.norm1(h), shift1, scale1))  # (B, N, D)
        h = h + gate2 * self.mlp(modulate(self.norm2(h), shift2, scale2))  # (B, N, D)
        return h


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then one head per kind of token: patches -> p*p*C velocities, the REG token -> E velocities."""

    def __init__(self, dim, patch, channels, token_width=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.linear_cls = nn.Linear(dim, token_width) if token_width else None  # [REG] the token's velocity head
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h, cond):  # h (B, N, D), cond (B, D)
        shift, scale = self.adaLN_modulation(cond)[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        h = modulate(self.norm_final(h), shift, scale)  # (B, N, D)
        slots = int(self.linear_cls is not None)  # [REG] 1 when a token sits before the patches
        v_patches = self.linear(h[:, slots:])  # (B, T, p*p*C)
        v_cls = self.linear_cls(h[:, 0]) if slots else None  # [REG] (B, E) from the token slot
        return v_patches, v_cls


# 2. The model: SiT + REPA projector + REG token (REG Sec. 3) ----------------------------------------------------------

# name -> switches of one model and one loss (REG Sec. 4: the baselines and REG without REPA)
METHODS = {
    "sit": dict(repa=False, token_kind="none"),  # plain SiT
    "repa": dict(repa=True, token_kind="none"),  # SiT + REPA
    "reg": dict(repa=True, token_kind="cls"),  # SiT + REPA + REG (the paper's method)
    "reg-noalign": dict(repa=False, token_kind="cls"),  # class token without the alignment loss ("REG w/o REPA")
}


@dataclass
class SiTConfig:
    input_size: int = 32  # side of the input: 32 = SD-VAE latents of 256px images, or CIFAR pixels
    in_channels: int = 4  # 4 for SD-VAE latents, 3 for pixels
    patch_size: int = 2  # p: tokens are p x p patches, T = (input_size / p)^2
    depth: int = 28  # number of SiT blocks
    hidden_size: int = 1152  # D
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # K; label K is the null label for CFG
    repa: bool = True  # REPA projector after block `encoder_depth` (a training-only head)
    token_kind: str = "cls"  # the extra token: 'cls' (REG: the encoder's class token) or 'none' (SiT, REPA)
    encoder_dim: int = 768  # E: width of the frozen encoder (DINOv2 ViT-B/14)
    encoder_depth: int = 8  # REPA/REG: 1-based block whose output is aligned (4 for B, 8 for L/XL)
    projector_dim: int = 2048  # REPA projector MLP width
    token_dim: int = 0  # K, the token's width: 0 = E (the paper); ours: K < E keeps its top-K principal directions

    @property
    def token_width(self):  # [ours] the width of the token the model denoises: K with token_dim, else E (the paper)
        return self.token_dim or self.encoder_dim

    @property
    def grid(self):  # patch tokens per side
        return self.input_size // self.patch_size

    @property
    def entangled(self):  # [REG] the encoder's class token sits before the patch tokens, noised and denoised with them
        return self.token_kind == "cls"

    @property
    def needs_encoder(self):  # training reads the frozen encoder (alignment target or token)
        return self.repa or self.entangled


class SiT(nn.Module):
    """SiT with adaLN-Zero; REPA's projector and REG's entangled token exist only when the config asks for them."""

    def __init__(self, cfg: SiTConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        D = cfg.hidden_size
        E = cfg.encoder_dim
        slots = int(cfg.entangled)  # [REG]
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        if cfg.entangled:  # [REG]
            self.token_embedder = nn.Linear(cfg.token_width, D)  # [REG] W_cls: E -> D
            self.token_norm = nn.LayerNorm(D, eps=1e-6)  # [REG] LayerNorm with affine
        pos = torch.cat([torch.zeros(slots, D), sincos_pos_embed(D, cfg.grid)])  # [REG] a zero row for the token slot
        self.pos_embed = nn.Parameter(pos[None], requires_grad=False)  # (1, slots+T, D)
        self.blocks = nn.ModuleList(SiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        if cfg.repa:  # [REPA]
            P = cfg.projector_dim  # [REPA]
            mlp = [nn.Linear(D, P), nn.SiLU(), nn.Linear(P, P), nn.SiLU(), nn.Linear(P, E)]  # [REPA] D -> P -> P -> E
            self.projector = nn.Sequential(*mlp)  # [REPA] h_phi
        self.basis_fitted = not (cfg.entangled and cfg.token_dim)  # [ours] reg_loss refuses a basis never fitted
        if cfg.entangled and cfg.token_dim:  # [ours] the token on its top-K principal directions
            self.register_buffer("token_mean", torch.zeros(E))  # [ours] (E,) set by set_token_basis
            self.register_buffer("token_basis", torch.zeros(E, cfg.token_dim))  # [ours] (E, K) orthonormal columns
            self.register_load_state_dict_post_hook(basis_loaded)  # [ours] loaded weights bring their basis
        token_width = cfg.token_width if cfg.entangled else None  # [REG]
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels, token_width)  # [REG] both heads
        self.initialize_weights()
        if cfg.entangled and cfg.token_width > D:  # [ours]
            why = f"REG token {cfg.token_width} wide, model {D}: its velocity cannot be learned"  # [ours]
            warnings.warn(f"{why}. Use a wider --model or token_dim <= {D} (--token-dim)", stacklevel=2)  # [ours]

    def project_token(self, cls):  # [ours]
        """An encoder token (B, E) -> the token this model denoises: (cls - mean) @ basis (B, K) with token_dim, in fp32
        under autocast too (bf16 would round the directions), as in sampling."""
        if not self.cfg.token_dim:  # [ours] the paper: the whole token
            return cls  # [ours]
        with torch.autocast(cls.device.type, enabled=False):  # [ours] fp32 under autocast too, as in sampling
            return (cls.float() - self.token_mean) @ self.token_basis  # [ours] (B, K)

    def set_token_basis(self, tokens):  # [ours]
        """Fit the projection of token_dim to encoder tokens (N, E), N > K: their mean and top principal directions."""
        if not hasattr(self, "token_basis"):  # [ours]
            raise ValueError(
                "this model has no token basis: build it with token_dim=K and a method with an encoder token"
            )
        mean, basis = principal_directions(tokens, self.cfg.token_dim)  # [ours]
        self.token_mean.copy_(mean)  # [ours]
        self.token_basis.copy_(basis)  # [ours]
        self.basis_fitted = True  # [ours]

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv as a matrix
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]  # adaLN-Zero: the net starts at v = 0
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.cfg.entangled:  # [REG]
            zero += [self.final_layer.linear_cls]  # [REG]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y, cls=None):
        """x (B, C, H, W), t (B,), y (B,), cls (B, E) the noised token -> (v (B, C, H, W), v_cls (B, E), z_hat (B, N, E)).
        v_cls is None without an entangled token; z_hat is None outside training or without REPA. It checks nothing:
        the entry points (reg_loss, sample) check their inputs once, with check_batch."""
        cfg = self.cfg
        h = self.x_embedder(x)  # (B, T, D)
        if cfg.entangled:  # [REG]
            cls_token = self.token_norm(self.token_embedder(cls))  # [REG] (B, D)
            h = torch.cat([cls_token[:, None], h], dim=1)  # [REG] (B, 1+T, D)
        h = h + self.pos_embed  # (B, N, D), N = slots+T
        cond = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        z_hat = None  # [REPA]
        for i, block in enumerate(self.blocks):
            h = block(h, cond)  # (B, N, D)
            if cfg.repa and self.training and i + 1 == cfg.encoder_depth:  # [REPA]
                z_hat = self.projector(h)  # [REPA] (B, N, E)
        v_patches, v_cls = self.final_layer(h, cond)  # (B, T, p*p*C), [REG] (B, E) or None
        v = unpatchify(v_patches, cfg.patch_size, cfg.grid)  # (B, C, H, W)
        return v, v_cls, z_hat


def basis_loaded(model, incompatible_keys):  # [ours]
    """After load_state_dict: loaded weights bring the basis they were trained with."""
    model.basis_fitted = True  # [ours]


def check_config(cfg):
    """Refuse a config that cannot build a model, with the reason in words."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kinds = (int, float) if f.type is float else f.type  # mlp_ratio may be written 4
        if not isinstance(value, kinds) or (f.type in (int, float) and f.name != "token_dim" and value <= 0):
            raise ValueError(f"SiTConfig.{f.name} must be a positive {f.type.__name__}, got {value!r}")
    if cfg.token_kind not in ("cls", "none"):
        raise ValueError(f"unknown token kind {cfg.token_kind!r}: use 'cls' (REG) or 'none'")
    if cfg.input_size % cfg.patch_size:
        raise ValueError(f"input_size {cfg.input_size} is not a multiple of patch_size {cfg.patch_size}: resize")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"num_heads {cfg.num_heads} does not divide hidden_size {cfg.hidden_size}")
    if not 0 <= cfg.token_dim <= cfg.encoder_dim:
        raise ValueError(f"token_dim {cfg.token_dim} must lie in 0..encoder_dim ({cfg.encoder_dim}): lower it")
    if cfg.repa and not 1 <= cfg.encoder_depth <= cfg.depth:
        raise ValueError(f"encoder_depth {cfg.encoder_depth} must lie in 1..depth ({cfg.depth})")


def shape_of(value):
    """A tensor's shape, or the name of what was passed instead (a list, None), for the refusals' messages."""
    return tuple(value.shape) if torch.is_tensor(value) else type(value).__name__


def check_number(name, value, low=-math.inf, high=math.inf):
    """Refuse an argument that is no finite real number from low to high (NaN, inf, a string, a tensor)."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number from {low} to {high}, got {value!r}")


def check_batch(net, x, y, cls=None, feats=None, loss=False):
    """The one check of what a caller passes to the entry points, reg_loss (`feats`, loss=True) and sample (`cls`): each
    refusal names the problem and the fix, where a layer would fail in torch's words or, worse, run on. It reads no
    tensor value on a GPU (that would wait for the device): labels are range-checked where they live on the CPU."""
    cfg = net.cfg
    weight = next(net.parameters(), x)  # the model's dtype (a stand-in without weights: x's)
    expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if not torch.is_tensor(x) or tuple(x.shape[1:]) != expected:
        raise ValueError(f"the model takes x (B, C, H, W) = (B, *{expected}), got {shape_of(x)}: resize or rebuild")
    B = len(x)
    if shape_of(y) != (B,) or y.dtype not in (torch.int64, torch.int32):
        got = f"{y.dtype} {shape_of(y)}" if torch.is_tensor(y) else shape_of(y)
        raise TypeError(f"labels y must be an integer tensor (B,) = ({B},), got {got}: pass torch.tensor(labels)")
    if y.device.type == "cpu" and B and not 0 <= int(y.min()) <= int(y.max()) <= cfg.num_classes:
        got = f"{int(y.min())}..{int(y.max())}"
        raise ValueError(
            f"labels must lie in 0..{cfg.num_classes - 1} ({cfg.num_classes} = the null label of CFG), got {got}: "
            "build the model with num_classes to match the data"
        )
    if loss and cfg.needs_encoder and not (isinstance(feats, (tuple, list)) and len(feats) == 2):
        raise ValueError("this method needs the frozen encoder's features: pass feats=(cls, patches)")
    needs_cls = loss and cfg.entangled
    needs_patches = loss and cfg.repa
    if needs_patches and feats[1] is None:
        raise ValueError("this method aligns the patch tokens: pass feats=(cls, patches), not (cls, None)")
    if needs_cls and shape_of(feats[0]) != (B, cfg.encoder_dim):
        raise ValueError(f"class token {shape_of(feats[0])}, not (B, E) = ({B}, {cfg.encoder_dim}): set encoder_dim")
    if needs_patches and shape_of(feats[1]) != (B, cfg.grid**2, cfg.encoder_dim):
        need = (B, cfg.grid**2, cfg.encoder_dim)
        raise ValueError(f"patch tokens {shape_of(feats[1])}, the SiT grid needs (B, T, E) = {need}: set the grid")
    if not loss and cfg.entangled and shape_of(cls) != (B, cfg.token_width):
        raise ValueError(f"the REG token must be (B, E) = ({B}, {cfg.token_width}), got {shape_of(cls)}")
    if not loss and not cfg.entangled and cls is not None:
        raise ValueError(f"a token {shape_of(cls)} for a model without one ({cfg.token_kind!r}): pass cls=None")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x is {x.dtype}, the model {weight.dtype}: pass x.to({weight.dtype}) (or use reg.autocast)")
    if loss and not net.basis_fitted:  # [ours]
        raise ValueError("token_dim without a basis: the token would be 0. Call model.set_token_basis(encoder tokens)")
    eval_mode = loss and cfg.repa and not net.training
    if eval_mode and torch.is_grad_enabled() and any(p.requires_grad for p in net.parameters()):
        raise ValueError(
            "the model is in eval mode (as load_model returns it): REPA's projection is off and align would be 0. "
            "Call model.train() to train it; compute a validation loss under torch.no_grad()"
        )


# 3. Frozen encoder (REPA Sec. 3): class token and patch tokens on the SiT token grid ----------------------------------

# short name -> timm architecture (the weights: hf.co/timm/<architecture>)
ENCODERS = {
    "dinov2-s": "vit_small_patch14_dinov2.lvd142m",
    "dinov2-b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2-l": "vit_large_patch14_dinov2.lvd142m",
    "dinov2-g": "vit_giant_patch14_dinov2.lvd142m",
}


class FrozenEncoder(nn.Module):
    """A frozen timm model that maps uint8 images (as read from files: no value range to guess) to feats = (class token
    (B, E), patches (B, grid^2, E)). A ViT sees images resized so that its patch grid is the SiT grid; a CNN `size` px
    (default: its own), its map resampled to the grid and its pooled vector playing the class token. Patches are in row-major grid order, as the
    SiT's tokens: an own feature map (B, E, g, g) fits as rearrange(f, "b e h w -> b (h w) e")."""

    def __init__(self, net, grid, size=None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.grid = grid
        self.dim = net.num_features
        self.vit = hasattr(net, "patch_embed")
        pretrained_cfg = net.pretrained_cfg
        mean = torch.tensor(pretrained_cfg["mean"]).view(1, 3, 1, 1)  # normalised as it was trained
        std = torch.tensor(pretrained_cfg["std"]).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        if self.vit:
            self.size = grid * net.patch_embed.patch_size[0]
            net.set_input_size(img_size=(self.size, self.size))  # resamples the position embedding once
        else:
            self.size = size or pretrained_cfg["input_size"][-1]

    def train(self, mode=True):
        """Frozen: stays in eval mode (BatchNorm statistics fixed) whatever a parent module's .train() asks."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):  # images (B, 3, H, W) uint8
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            fix = "from [-1, 1]: (x * 127.5 + 127.5).round().to(torch.uint8)"
            raise ValueError(f"the encoder takes uint8 (B, 3, H, W), got {images.dtype} {shape_of(images)}: {fix}")
        x = images.float() / 255  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        f = self.net.forward_features(x)
        if self.vit:  # after the final norm; register tokens dropped
            cls = f[:, 0].float()  # (B, E)
            patches = f[:, self.net.num_prefix_tokens :].float()  # (B, T, E)
            return cls, patches
        pooled = self.net.forward_head(f, pre_logits=True).float()  # (B, E)
        fmap = F.interpolate(f.float(), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return pooled, rearrange(fmap, "b e h w -> b (h w) e")  # (B, E), (B, T, E)


def load_encoder(name="dinov2-b", grid=16, weights=None, device="cpu", flag="--encoder-weights", size=None):
    """DINOv2 (`dinov2-{s,b,l,g}`) or any timm model by name (the register variants: vit_*_patch14_reg4_dinov2.lvd142m).
    `weights`: a local file (offline), None to fetch from the Hugging Face hub, or 'random' for an untrained copy of the
    architecture (tests). Weights load strictly: a file of another architecture is an error, never a random encoder.
    `size`: a CNN's input side (default its own)."""
    import timm

    arch = ENCODERS.get(name, name)
    if not timm.is_model(arch):
        raise ValueError(f"unknown encoder {name!r}: use one of {sorted(ENCODERS)} or a timm model name")
    local_file = weights not in (None, "random")
    if local_file and not os.path.isfile(weights):
        raise ValueError(f"encoder weights file {weights!r} does not exist")
    overlay = dict(file=weights) if local_file else None
    hub = timm.models.get_pretrained_cfg(arch).hf_hub_id
    url = f"https://huggingface.co/{hub or arch}/resolve/main/model.safetensors"
    fix = f"download {url} and pass its path as {flag} (load_encoder(weights=...))."
    if weights is None and hub and not hub_reachable(hub):  # timm would retry for a minute before failing
        raise RuntimeError(
            f"could not load weights for encoder {arch} (no hub from here, nor its weights in the cache). Offline?: {fix}"
        )
    try:  # with the checkpoint's own head timm loads strictly; the head is dropped after
        net = timm.create_model(arch, pretrained=weights != "random", pretrained_cfg_overlay=overlay)
    except Exception as e:
        why = f"Another model's file? Name that model as the encoder, or get {arch}'s" if local_file else "Offline?"
        raise RuntimeError(
            f"could not load weights for encoder {arch} ({type(e).__name__}: {str(e)[:200]}). {why}: {fix}"
        ) from None
    net.reset_classifier(0)
    return FrozenEncoder(net, grid, size).to(device)


def hub_reachable(repo_id):
    """Whether timm can get a hub model's weights: they are in the Hugging Face cache, or the hub is neither switched
    off (HF_HUB_OFFLINE) nor unknown to the name server."""
    import huggingface_hub

    files = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in this order
    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, name), str) for name in files):
        return True
    switched_off = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if switched_off or huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


def principal_directions(tokens, k):  # [ours]
    """Tokens (N, E) -> (mean (E,), the top-k eigenvectors of their covariance (E, k), by decreasing variance). N tokens
    span at most N - 1 directions with variance: fewer than k + 1 would leave directions that carry nothing."""
    if not torch.is_tensor(tokens) or tokens.dim() != 2 or not 1 <= k < len(tokens):  # [ours]
        raise ValueError(f"tokens (N, E) with N > k = {k}, got {shape_of(tokens)}: more images, or a smaller token_dim")
    tokens = tokens.double()  # [ours]
    mean = tokens.mean(0)  # [ours] (E,)
    variances, vectors = torch.linalg.eigh(torch.cov(tokens.T))  # [ours] ascending
    basis = vectors.flip(1)[:, :k]  # [ours] (E, k), largest variance first
    signs = basis.gather(0, basis.abs().argmax(0, keepdim=True)).sign()  # [ours] (1, k) largest entry positive
    return mean.float(), (basis * signs).float()  # [ours]


# 4. Interpolant (SiT Sec. 2): the linear path from data to noise, the same t for image and token ---------------------


def interpolant(x, noise, t):
    """The linear path (the paper's): x_t = (1 - t) x + t noise from data (t = 0) to noise (t = 1), and the velocity
    along it, v = d x_t / dt = noise - x. t broadcasts against x: (B, 1, 1, 1) for images, (B, 1) for tokens."""
    return (1 - t) * x + t * noise, noise - x


# 5. Joint loss (REG Sec. 3): velocity of the image + beta x velocity of the token + lambda x alignment ----------------


def unwrap(model):
    """The SiT inside DDP and torch.compile wrappers, in either order."""
    for wrapper in ("module", "_orig_mod", "module"):  # DDP keeps it as .module, torch.compile as ._orig_mod
        model = getattr(model, wrapper, model)
    return model


def reg_loss(model, x, y, feats=None, beta=0.03, lam=0.5, label_dropout=0.1, t=None, noise=None):
    """x (B, C, H, W) clean input, y (B,) labels, feats = (class token (B, E), patch tokens (B, T, E), row-major over
    the SiT grid) of the frozen encoder; reg-noalign needs only the class token: (cls, None). Returns a dict of
    scalars: loss (what to backpropagate), denoise, denoise_cls, align. `t` (B,) and `noise` = (eps, eps_cls) fix the
    draws (loss_per_t_bin). The features' targets are detached: no gradient reaches an encoder, frozen or not. A model
    in eval mode has no REPA projection, so align is 0: a validation loss, under torch.no_grad() (else refused)."""
    net = unwrap(model)  # the SiT inside DDP or torch.compile; the call below goes through `model`
    cfg = net.cfg
    check_batch(net, x, y, feats=feats, loss=True)
    check_number("beta", beta, 0)
    check_number("lam", lam, 0)
    check_number("label_dropout", label_dropout, 0, 1)
    B = x.shape[0]
    if t is None:
        t = torch.rand(B, device=x.device)  # (B,) uniform on [0, 1], as the paper
    eps, eps_cls = noise or (torch.randn_like(x), None)  # (B, C, H, W)
    x_t, v = interpolant(x, eps, t.view(B, 1, 1, 1))  # (B, C, H, W) each
    cls_t = None  # [REG]
    if cfg.entangled:  # [REG]
        cls = feats[0].detach()  # [REG] the encoder's class token (B, E)
        cls = net.project_token(cls)  # [ours] on its top-K directions with token_dim (B, K)
        eps_cls = torch.randn_like(cls) if eps_cls is None else eps_cls  # [REG] its own noise, the same t
        cls_t, v_cls = interpolant(cls, eps_cls, t[:, None])  # [REG] (B, K or E) each, the same path
    drop = torch.rand(B, device=y.device) < label_dropout
    y = torch.where(drop, cfg.num_classes, y)  # CFG: drop labels to the null label
    v_hat, v_cls_hat, z_hat = model(x_t, t, y, cls_t)
    denoise = (v_hat.float() - v).pow(2).mean()
    denoise_cls = x.new_zeros(())
    align = x.new_zeros(())
    if v_cls_hat is not None:  # [REG]
        denoise_cls = (v_cls_hat.float() - v_cls).pow(2).mean()  # [REG]
    if z_hat is not None:  # [REPA] training mode
        z = alignment_target(cfg, feats).detach()  # [REPA] (B, N, E)
        similarity = F.normalize(z_hat.float(), dim=-1) * F.normalize(z.float(), dim=-1)  # [REPA] (B, N, E)
        align = -similarity.sum(-1).mean()  # [REPA] mean over tokens of -cos
    loss = denoise + beta * denoise_cls + lam * align  # [REG] the joint loss: REPA's, plus beta x the token's
    return dict(loss=loss, denoise=denoise, denoise_cls=denoise_cls, align=align)


def alignment_target(cfg, feats):  # [REPA]
    """The encoder tokens the projected hidden states are aligned with: the patches, and the token slot (B, N, E)."""
    enc_cls, enc_patches = feats  # [REPA] (B, E), (B, T, E)
    if cfg.entangled:  # [REG] the token slot is aligned with the class token too
        return torch.cat([enc_cls[:, None], enc_patches], dim=1)  # [REG] (B, 1+T, E)
    return enc_patches  # [REPA] (B, T, E)


@torch.no_grad()
def ema_update(ema, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model over what `model` trains, every step (the release's EMA). `model` may be
    wrapped (DDP, torch.compile): a wrapper's parameters are its model's."""
    check_number("decay", decay, 0, 1)
    pairs = [(e, m) for e, m in zip(ema.parameters(), model.parameters()) if m.requires_grad]
    if not pairs or any(e.shape != m.shape for e, m in pairs):
        raise ValueError(
            "ema_update(ema, model): pass a copy of the model (copy.deepcopy) first, then the trained model"
        )
    ema_params = [e for e, _ in pairs]
    model_params = [m for _, m in pairs]
    torch._foreach_lerp_(ema_params, model_params, 1 - decay)


# 6. Samplers (SiT Sec. 2; REG Sec. 3): one loop moves the pair (x, cls) from t = 1 to t = 0 ---------------------------


def score_from_velocity(v, x_t, t):
    """The score grad log p_t(x_t) = -noise / t that a velocity implies (SiT Sec. 2; REPA's get_score_from_velocity):
    x_t = (1 - t) x + t noise and v = noise - x give noise = x_t + (1 - t) v."""
    return ((t - 1) * v - x_t) / t


def clean_estimate(v, x_t, t):
    """The model's estimate of the clean input at time t: x_t = (1 - t) x + t noise and v = noise - x give x."""
    return x_t - t * v


def guided_velocity(model, x, cls, t, y, null_label, cfg_scale, cls_cfg_scale, guide, dtype):
    """One network evaluation at time t (a 0-d tensor on the device) -> (v, v_cls) in the state's dtype. With `guide`
    the batch runs twice (labels y and the null label, the same x and cls) and each velocity is v_uncond + scale
    (v_cond - v_uncond): scale 1 is the conditional velocity, 0 the unconditional one, for the image and the token
    alike. A token of width 0 stands for a model without one."""
    has_token = cls.shape[1] > 0  # [REG]
    if guide:
        x = torch.cat([x, x])  # (2B, C, H, W)
        cls = torch.cat([cls, cls])  # [REG] (2B, E)
        y = torch.cat([y, torch.full_like(y, null_label)])  # (2B,)
    t_dtype = torch.promote_types(dtype, torch.float32)  # t never rounded to bf16 (~0.004 near t = 1)
    t_batch = t.to(t_dtype).expand(len(y))  # (B,) or (2B,)
    cls_in = cls.to(dtype) if has_token else None  # [REG]
    v, v_cls, *_ = model(x.to(dtype), t_batch, y, cls_in)  # (B or 2B, C, H, W), [REG] (B or 2B, E) or None
    v = v.to(x.dtype)
    v_cls = v_cls.to(cls.dtype) if has_token else torch.zeros_like(cls)  # [REG]
    if not guide:
        return v, v_cls
    v_cond, v_uncond = v.chunk(2)
    v = v_uncond + cfg_scale * (v_cond - v_uncond)
    v_cls_cond, v_cls_uncond = v_cls.chunk(2)  # [REG]
    v_cls = v_cls_uncond + cls_cfg_scale * (v_cls_cond - v_cls_uncond)  # [REG]
    return v, v_cls


def sampling_times(steps, mode):
    """The time grid: the ODE runs linspace(1, 0, steps + 1); the SDE linspace(1, 0.04, steps), then one last step to 0
    (the release's sampler; the score is singular at t = 0)."""
    if mode not in ("sde", "euler") or steps < 1:
        raise ValueError(f"sampler mode must be 'sde' or 'euler' and steps >= 1, got {mode!r}, {steps}")
    if mode == "sde":
        return torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def sampling_inputs(model, x, y, cls, null_label, cfg_scale, cls_cfg_scale, interval):
    """The sampler's inputs, checked once before its loop -> (y, cls, null_label, (cfg_scale, cls_cfg_scale)). The null
    label is a SiT's num_classes unless given; a SiT's x, y and cls pass check_batch (any other callable's are not
    checked); cls None becomes a token of width 0, so one loop serves models without one;
    cls_cfg_scale defaults to cfg_scale; the scales are finite, the guidance interval lies within [0, 1]."""
    net = unwrap(model)
    if hasattr(net, "cfg"):  # a SiT
        null_label = net.cfg.num_classes if null_label is None else null_label
        check_batch(net, x, y, cls)
    if cls is None:
        cls = x.new_zeros(x.shape[0], 0)
    cls_cfg_scale = cfg_scale if cls_cfg_scale is None else cls_cfg_scale
    check_number("cfg_scale", cfg_scale)
    check_number("cls_cfg_scale", cls_cfg_scale)
    check_number("the guidance interval's low end", interval[0], 0, interval[1])
    check_number("the guidance interval's high end", interval[1], interval[0], 1)
    return y, cls, null_label, (cfg_scale, cls_cfg_scale)


@torch.no_grad()
def sample(
    model,
    x,
    y,
    cls=None,
    steps=250,
    mode="sde",
    cfg_scale=1.0,
    cls_cfg_scale=None,
    interval=(0.0, 1.0),
    null_label=None,
    state_dtype=None,
    noise=torch.randn_like,
    trace=None,
):
    """x (B, C, H, W) and cls (B, E) start as N(0, I) at t = 1; returns (x, cls) at t = 0 (cls None without a token).
    mode 'sde': Euler-Maruyama with diffusion w_t = 2t, so drift = v - t score; 'euler': the probability-flow
    ODE dx/dt = v. CFG where low <= t <= high (interval) and a scale differs from 1: each velocity is v_uncond + scale
    (v_cond - v_uncond), so 1 is conditional and 0 unconditional. `model`: any callable (x, t, y, cls) -> (v, v_cls,
    ...); `noise(u)` draws the SDE's noise; `trace` receives (t, clean estimate) per step. The loop never waits for the
    device: the time grid is copied there once."""
    has_token = cls is not None  # [REG]
    y, cls, null_label, scales = sampling_inputs(model, x, y, cls, null_label, cfg_scale, cls_cfg_scale, interval)
    dtype = x.dtype  # the model's input dtype
    state_dtype = state_dtype or (torch.float64 if x.device.type == "cpu" else torch.float32)  # float64: slow on GPUs
    x = x.to(state_dtype)  # (B, C, H, W)
    cls = cls.to(state_dtype)  # [REG] (B, E)
    grid = sampling_times(steps, mode)  # checks mode and steps first
    times = grid.tolist()  # the loop's control flow, on the host
    times_on_device = grid.to(x.device)  # the model's t, copied once
    guided = scales != (1.0, 1.0)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t  # < 0: from noise to data
        last = i == steps - 1
        guide = guided and interval[0] <= t <= interval[1]
        t_state = times_on_device[i].to(state_dtype)
        v, v_cls = guided_velocity(model, x, cls, t_state, y, null_label, *scales, guide, dtype)
        if trace is not None:
            trace.append((t, clean_estimate(v, x, t_state).to(dtype)))
        drift = v  # the ODE moves along v
        drift_cls = v_cls  # [REG]
        if mode == "sde":  # the SDE's drift: v - (w_t / 2) score, w_t = 2t
            drift = v - t * score_from_velocity(v, x, t_state)
            drift_cls = v_cls - t * score_from_velocity(v_cls, cls, t_state)  # [REG]
        x = x + dt * drift  # Euler step
        cls = cls + dt * drift_cls  # [REG] the same step for the token
        if mode == "sde" and not last:  # Euler-Maruyama: + sqrt(w_t |dt|) n
            x = x + math.sqrt(2 * t * abs(dt)) * noise(x)
            cls = cls + math.sqrt(2 * t * abs(dt)) * noise(cls)  # [REG]
    return x.to(dtype), cls.to(dtype) if has_token else None


# 7. Presets and checkpoints (the official release's layout, and our own weights_only files) ---------------------------

# DiT's sizes with SiT's names; Ti (tiny) is ours, for CPU work. encoder_depth: REPA's block, 4 for S/B, 8 for L/XL.
SIZES = {
    "Ti": dict(depth=4, hidden_size=128, num_heads=2, encoder_depth=2, projector_dim=256),
    "S": dict(depth=12, hidden_size=384, num_heads=6, encoder_depth=4, projector_dim=2048),
    "B": dict(depth=12, hidden_size=768, num_heads=12, encoder_depth=4, projector_dim=2048),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, encoder_depth=8, projector_dim=2048),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8, projector_dim=2048),
}
# "SiT-B/2": size B on 2 x 2 patches; every size with patches of 2, 4 and 8
PRESETS = {f"SiT-{size}/{p}": dict(SIZES[size], patch_size=p) for size in SIZES for p in (2, 4, 8)}


def make_model(preset="SiT-XL/2", method="reg", **overrides):
    """A model from a preset name ('SiT-B/2', ..., 'SiT-Ti/2' tiny) and a method name of METHODS."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    settings = {**PRESETS[preset], **METHODS[method], **overrides}
    return SiT(SiTConfig(**settings))


def config_from_dict(stored):
    """The SiTConfig a checkpoint stores (asdict). Every field that shapes the function must be there (a default would
    be a guess); token_dim came later and means 0 when absent."""
    known = {f.name for f in fields(SiTConfig)}
    unknown = sorted(set(stored) - known)
    missing = sorted(known - set(stored) - {"token_dim"})
    if unknown or missing:
        raise ValueError(f"a stored config with unknown fields {unknown}, lacking {missing}: build SiTConfig yourself")
    return SiTConfig(**stored)


# the release's parameter names -> ours (everything else has the same name)
OFFICIAL_NAMES = {"cls_projectors2.": "token_embedder.", "wg_norm.": "token_norm.", "projectors.0.": "projector."}


def rename_official(key):
    """The release's name of a parameter -> ours (`cls_projectors2.weight` -> `token_embedder.weight`)."""
    for old, new in OFFICIAL_NAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def our_names(sd):
    """A state dict (ours, the release's, DDP's or torch.compile's) under our names; what is not one is refused in
    words (a whole checkpoint: take its ['ema'])."""
    if not isinstance(sd, dict):
        raise TypeError(f"expected a state dict (a dict of tensors), got {type(sd).__name__}")
    inner = [k for k in ("ema", "model") if isinstance(sd.get(k), dict)]
    if inner:
        raise ValueError(f"this is a whole checkpoint (keys {sorted(map(str, sd))[:6]}): pass its [{inner[0]!r}]")
    sd = {rename_official(k.removeprefix("module.").removeprefix("_orig_mod.")): v for k, v in sd.items()}
    if not torch.is_tensor(sd.get("x_embedder.proj.weight")):
        raise ValueError(f"not a SiT state dict (no x_embedder.proj.weight among {len(sd)} keys): pass a SiT's weights")
    return sd


def config_from_state_dict(sd):
    """Read a SiTConfig off a state dict (ours or the release's): widths, depth, patch, grid, classes, token parts.
    Heads and the REPA block are not stored: they come from the preset of the same depth, width and patch; with no
    such preset this is an error (a guessed head count would compute another function)."""
    sd = our_names(sd)
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    matching = [v for v in PRESETS.values() if (v["depth"], v["hidden_size"], v["patch_size"]) == (depth, D, p)]
    if not matching:
        raise ValueError(
            f"no preset has depth {depth}, width {D}, patch {p}, and the head count is not stored: build "
            "SiTConfig(num_heads=...) yourself and use load_weights, or save with save_model"
        )
    entangled = "token_embedder.weight" in sd  # the REG token's weights
    T = sd["pos_embed"].shape[1] - int(entangled)
    # E: the token's mean (with token_dim), else the token's head, else the projector's output; DINOv2-B's if none
    widths = [sd[k].shape[0] for k in ("token_mean", "final_layer.linear_cls.weight", "projector.4.weight") if k in sd]
    repa = "projector.0.weight" in sd
    settings = dict(
        matching[0],  # depth, width, heads, patch, REPA's block
        input_size=math.isqrt(T) * p,
        in_channels=C,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        repa=repa,
        token_kind="cls" if entangled else "none",
        encoder_dim=widths[0] if widths else 768,
        projector_dim=sd["projector.0.weight"].shape[0] if repa else 2048,
        token_dim=sd["token_basis"].shape[1] if "token_basis" in sd else 0,
    )
    return SiTConfig(**settings)


def load_weights(model, sd):
    """Load our or the release's state dict strictly; a mismatch raises a ValueError that says what differs."""
    sd = our_names(sd)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    differ = [k for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in differ]
    if missing or unexpected or shapes:
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        problems = "".join(f"\n  {what} ({len(keys)}): {', '.join(keys[:6])}" for what, keys in found if keys)
        raise ValueError(f"checkpoint does not fit the model:{problems}\nload it with load_model (its own config)")
    on_meta = next(model.parameters()).is_meta  # a model built on 'meta' takes the tensors without a copy
    model.load_state_dict(sd, strict=True, assign=on_meta)
    return model


def load_checkpoint(path):
    """A .pt checkpoint's contents, loaded safely (weights_only; the release's pickled argparse.Namespace is allowed as
    data)."""
    path = os.fspath(path)  # a str or a pathlib.Path
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist (or is a folder): pass a file, e.g. a run's NNNNNNN.pt")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # lazily: look twice cheaply
    except Exception as e:
        raise ValueError(f"{path} is no readable checkpoint ({type(e).__name__}): damaged, or not a .pt") from None


def load_model(path, weights="ema"):
    """A SiT from a .pt file, in eval mode on the CPU: ours (save_model's, or a training checkpoint), the release's, or
    a bare state dict. `weights`: 'ema' (what the paper samples) or 'model'."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint: pass a SiT checkpoint")
    bare = all(torch.is_tensor(v) for v in checkpoint.values())
    sd = checkpoint if bare else checkpoint.get(weights)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} has no {weights!r} weights ({sorted(map(str, checkpoint))[:8]}): pass a SiT's")
    config = None if bare else checkpoint.get("config")
    cfg = config_from_dict(config) if config else config_from_state_dict(sd)
    release_args = None if bare else checkpoint.get("args")  # the release's Namespace: its REPA block
    cfg.encoder_depth = getattr(release_args, "encoder_depth", cfg.encoder_depth)
    return load_weights(SiT(cfg), sd).eval()


def save_model(path, model):
    """Weights with their config in one .pt file, atomically: dict(ema=weights, config), what load_model reads."""
    path = os.fspath(path)  # a str or a pathlib.Path
    if not path.endswith(".pt"):  # torch.load reads a .safetensors name as safetensors: a .pt under it is unreadable
        raise ValueError(f"save_model writes a .pt file: name it NAME.pt, not {os.path.basename(path)!r}")
    net = unwrap(model)
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    config = asdict(net.cfg)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(dict(ema=weights, config=config), path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


# ======================================================================================================================
# PART B. THE TRAINING KIT (what train_cifar.py, train_imagenet.py and sample.py share; Part A never uses it)
# ======================================================================================================================

# 8. Run folders, stopping, devices, command-line numbers, speed, FD, the VAE ------------------------------------------


def save_checkpoint(path, state):
    """Atomic: write a temporary file, then rename, so a kill or a Ctrl-C never leaves half a checkpoint
    (clean_run_folder removes a killed writer's temporary file); a full disk or a read-only folder is an error in
    words, and the temporary file is removed."""
    tmp = f"{path}.{os.getpid()}.tmp"  # this process's: two writers of one file never share a temporary file
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        message = f"could not write {path} ({str(e)[:160]}): free disk space or pick a writable folder"
        raise ValueError(f"{message}; the files written before are intact") from None


def checkpoints(folder):
    """A run folder's checkpoints (NNNNNNN.pt, named by step), oldest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(os.path.join(folder, f) for f in names if f.endswith(".pt") and f[:-3].isdigit())


def save_training_state(folder, step, model, ema, opt, scaler, args, keep=3, **extra):
    """The checkpoint NNNNNNN.pt: one dict (model, EMA, optimiser, scaler (or None), step, RNG states, the run's
    settings and the script's extras), the same shape as nanoGPT's; the newest `keep` are kept (0: all)."""
    rng = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()  # this process's GPU only: a resume may run on fewer GPUs
    trained = dict(model=unwrap(model).state_dict(), ema=ema.state_dict(), opt=opt.state_dict())
    scaler_state = scaler.state_dict() if scaler else None
    state = dict(trained, scaler=scaler_state, step=step, rng=rng, args=args, config=asdict(ema.cfg), **extra)
    save_checkpoint(os.path.join(folder, f"{step:07d}.pt"), state)
    for old in checkpoints(folder)[:-keep] if keep else []:
        os.remove(old)


def newest_checkpoint(folder, args, must_match):
    """The newest checkpoint of `folder` (path, dict) if it continues this run: every setting in `must_match` (args is
    a dict) must equal the checkpoint's, else a ValueError lists what differs. Cheap (read lazily): call it before
    any costly preparation, so that a refused resume costs nothing."""
    path = checkpoints(folder)[-1]
    state = load_checkpoint(path)
    old = state["args"]
    differ = [f"{k}: checkpoint {old.get(k)!r}, now {args.get(k)!r}" for k in must_match if old.get(k) != args.get(k)]
    fix = "resume with the original settings, or start a run in another folder (*_key: the data's or encoder's content)"
    if differ:
        raise ValueError(f"{path} comes from another experiment ({'; '.join(differ)}): {fix}")
    if args["steps"] < state["step"]:
        raise ValueError(f"{path} is at step {state['step']}, past --steps {args['steps']}: raise --steps to continue")
    return path, state


def resume(folder, args, must_match, model, ema, opt, scaler):
    """Load the newest checkpoint of `folder` into the objects and return its dict (newest_checkpoint's checks); the
    settings outside `must_match` may change and are printed and logged."""
    path, state = newest_checkpoint(folder, args, must_match)
    old = state["args"]
    changed = {k: [old.get(k), v] for k, v in args.items() if k not in must_match and old.get(k) != v}
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one record and one line
        log(folder, step=state["step"], resumed=True, changed=changed)
        print(f"resume from {path}; changed: {changed or 'nothing'}")
        if state["step"] == args["steps"]:
            print(f"{folder} already finished at step {state['step']}: raise --steps to train on")
    load_weights(unwrap(model), state["model"])
    load_weights(ema, state["ema"])
    opt.load_state_dict(state["opt"])
    for group in opt.param_groups:  # a changed learning rate wins over the saved one
        group["lr"] = args.get("lr", group["lr"])
    if state["scaler"] and scaler is not None and scaler.is_enabled():  # bf16's is empty; fp16 may start on resume
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state


def optimizer_step(model, ema, opt, scaler=None, clip=1.0, decay=0.9999):
    """After the backward passes: clip the gradient norm (the paper's 1.0), step AdamW, clear the gradients, update the
    EMA. With an enabled GradScaler (fp16) the step goes through it: it skips a step whose gradient overflowed. Under
    bf16 or fp32 (scaler None or disabled) AdamW steps directly. -> (grad norm, skipped): an fp16 skip's norm is 0 and
    `skipped` 1, so the log's means stay finite."""
    fp16 = scaler is not None and scaler.is_enabled()
    if fp16:
        scaler.unscale_(opt)  # the true gradients, to clip them
    grad_norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), clip)
    if fp16:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    ema_update(ema, model, decay)
    skipped = torch.isfinite(grad_norm).logical_not() & fp16  # elsewhere a NaN norm stops the run
    return grad_norm.where(~skipped, 0.0), skipped


def add_to(sums, values, weight):
    """sums[k] += weight * values[k]: tensors on their device (no host sync), numbers (a time) on the host."""
    for k, v in values.items():
        v = v.detach().float() if torch.is_tensor(v) else v
        sums[k] = sums.get(k, 0.0) + weight * v


def log_interval(folder, step, sums, last, images_per_step, flops_per_image, device):
    """One log record from the running sums since the last one (`last` = its step and time): the mean of each value (a
    loss, the data wait) over the steps (and, under torchrun, the processes: one all_reduce, with the .tolist() the
    loop's only sync), the grad norm over the steps fp16's scaler did not skip and their count, images/s, MFU and peak
    memory of this process. A non-finite value stops the run before any checkpoint of this step. Empties `sums`;
    -> (step, time)."""
    from tqdm import tqdm  # Part B only

    steps = step - last[0]
    keys = sorted(sums)
    values = torch.stack([torch.as_tensor(sums.pop(k), device=device).float() for k in keys])
    world = 1
    if torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        torch.distributed.all_reduce(values)  # every process has its own losses; DDP made the grad norms equal
    totals = dict(zip(keys, (values / world).tolist()))
    skipped = round(totals.pop("skipped", 0))
    record = {k: v / steps for k, v in totals.items()}
    record.update(grad_norm=totals.get("grad_norm", 0) / max(steps - skipped, 1), skipped=skipped)
    now = time.perf_counter()
    record.update(speed(steps * images_per_step, now - last[1], flops_per_image, device))
    check_finite(record, step, folder)
    if int(os.environ.get("RANK", 0)) == 0:
        log(folder, step=step, **record)
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))  # above a progress bar
    return step, now


def lock_folder(folder):
    """One process per run folder: an exclusive lock on <folder>/lock, for a `with` block (the kernel frees it on any
    exit, kill -9 included); another process gets an error that says so. Once held, clean_run_folder."""
    import fcntl  # Unix; Part B only, so Part A copies anywhere

    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, "lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"another process is writing to {folder}: wait for it, or pass another --out") from None
    clean_run_folder(folder)
    return lock


def clean_run_folder(folder):
    """Remove what killed runs left in `folder`: the temporary files (NAME.<pid>.tmp) of writers that no longer run,
    and the log of a run killed before its first checkpoint. (A resume logs a `resumed` record at its step, which
    hides the records past it: read_log.)"""
    for name in os.listdir(folder):
        pid = name.split(".")[-2] if name.endswith(".tmp") and name.count(".") >= 2 else ""
        if pid.isdigit() and not process_exists(int(pid)):
            os.remove(os.path.join(folder, name))
    if not checkpoints(folder) and os.path.isfile(os.path.join(folder, "log.jsonl")):
        os.remove(os.path.join(folder, "log.jsonl"))


def process_exists(pid):
    """Whether a process with this id runs (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except OSError as e:
        return not isinstance(e, ProcessLookupError)  # PermissionError: another user's
    return True


def log(folder, **record):
    """Append one record to <folder>/log.jsonl (append-only: a resume adds a `resumed` record, see read_log)."""
    with open(os.path.join(folder, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path):
    """The records of a log.jsonl as one run saw them: a torn line (a kill in mid-write) is skipped wherever it is,
    and a `resumed` record at step s drops the records past s written before it (the steps redone after the resume)."""
    records = []
    lines = open(path).read().splitlines() if os.path.isfile(path) else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("resumed"):
            records = [r for r in records if r["step"] <= record["step"]]
        records.append(record)
    return records


class GracefulStop:
    """Ctrl-C or SIGTERM (what schedulers send before a kill): the loop finishes its step, saves and stops; a second one
    stops at once, in one line. Use as `with GracefulStop() as stop:` in the main thread and test `stop.requested`
    after each step."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}  # restored
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise SystemExit("stopped at once: run again to continue from the last checkpoint")
        self.requested = True
        print("\nstopping after this step's checkpoint (run again to continue); Ctrl-C again: at once", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_finite(record, step, folder):
    """Stop a run whose loss went non-finite, pointing at the last good checkpoint and the fix."""
    bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        last = checkpoints(folder)[-1] if checkpoints(folder) else "none yet"
        raise RuntimeError(f"non-finite {bad} at step {step}, not saved; from {last} run again with a lower --lr")


def pick_device(name=None):
    """--device default: cuda (under torchrun this process's GPU, cuda:LOCAL_RANK), then mps, then cpu."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)  # a name that is no device: torch's RuntimeError lists the device types
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    fix = "use --device cpu, or leave --device out to take the best there is"
    if not available.get(device.type, True):
        raise ValueError(f"--device {name}: this machine (or this torch) has no {device.type.upper()} GPU: {fix}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def autocast(device, precision="bf16"):
    """One mixed-precision context for every device: bf16 (default) or fp16 on GPUs, plain fp32 elsewhere."""
    if precision == "fp32" or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def number(text, kind, low, high, allowed):
    """An argparse type: `text` as an int or a float within [low, high] (finite), else an error that says what is
    allowed (argparse adds the flag's name), so a bad value fails when the command line is read, before any work."""
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):  # NaN and inf fail too
        raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
    return value


# the argparse types of the scripts' numbers
positive_int = functools.partial(number, kind=int, low=1, high=math.inf, allowed="an integer >= 1")
nonneg_int = functools.partial(number, kind=int, low=0, high=math.inf, allowed="an integer >= 0")
unit_float = functools.partial(number, kind=float, low=0.0, high=1.0, allowed="a number from 0 to 1")
nonneg_float = functools.partial(number, kind=float, low=0.0, high=math.inf, allowed="a finite number >= 0")
positive_float = functools.partial(number, kind=float, low=1e-300, high=math.inf, allowed="a finite number > 0")
finite_float = functools.partial(number, kind=float, low=-math.inf, high=math.inf, allowed="a finite number")


# dense bf16 peak TFLOP/s of common GPUs, for the MFU (nanoGPT's estimate_mfu, per PaLM appendix B)
PEAK_TFLOPS = {"H200": 989, "H100": 989, "B200": 2250, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165}


def model_flops(cfg, train=True):
    """Forward FLOPs of one input through the SiT: 2 per multiply-add of every matmul and conv, attention's QK^T and AV
    included; norms, softmax, elementwise ops and the frozen encoder not counted. A training step costs 3x (backward
    2x)."""
    D = cfg.hidden_size
    E = cfg.encoder_dim
    P = cfg.projector_dim
    p = cfg.patch_size
    C = cfg.in_channels
    M = int(cfg.hidden_size * cfg.mlp_ratio)
    T = cfg.grid**2
    N = T + int(cfg.entangled)
    block = 2 * N * (4 * D * D + 2 * D * M) + 4 * N * N * D + 12 * D * D  # qkv+proj, MLP, attention, adaLN
    io = 4 * T * p * p * C * D + 4 * D * D + 2 * (256 * D + D * D)  # (un)patchify, final adaLN, t-MLP
    repa = 2 * N * (D * P + P * P + P * E) if cfg.repa and train else 0  # the REPA projector (training only)
    token = 4 * cfg.token_width * D if cfg.entangled else 0  # the REG token in and out
    return cfg.depth * block + io + repa + token


def speed(images, seconds, flops_per_image, device):
    """The figures every log record carries: images/s, MFU (the GPU's peak from PEAK_TFLOPS by name; absent
    elsewhere) and peak memory in GiB (the GPU's, or the process's on a CPU). To split a step into phases, wrap a
    few steps in torch.profiler.profile() and print key_averages().table()."""
    images_per_s = images / max(seconds, 1e-9)
    record = dict(img_per_s=round(images_per_s, 1))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), 0)
        if peak:
            record["mfu"] = round(flops_per_image * images_per_s / (peak * 1e12), 4)
        record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        import resource  # Unix; Part B only

        record["peak_mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux: KiB
    return record


def fingerprint(*items):
    """A short hex digest of tensors (by their bytes, any dtype), strings and other values: what makes data, weights
    or a cache the same, whatever its name."""
    digest = hashlib.sha256()
    for item in items:
        if torch.is_tensor(item):
            digest.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), the trace of the root taken through symmetric eigenvalues."""
    mu1, s1 = a
    mu2, s2 = b
    w, V = torch.linalg.eigh(s1)
    root1 = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T  # S_a^1/2
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()  # tr (S_a^1/2 S_b S_a^1/2)^1/2
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


def plot_log(path, png, panels):
    """A PNG with a panel per {key: title} of `panels` over the steps of one log.jsonl, every record a point (a short
    run has few); a key whose values are lists (the loss per t bin) draws a curve per t bin. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(path)
    panels = {key: title for key, title in panels.items() if any(key in r for r in records)}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels.items()):
        rows = [r for r in records if key in r]
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64).view(len(rows), -1)  # (steps, curves)
        bins = rows[0].get("bin_t", []) if values.shape[1] > 1 else []  # t bins: which curve is which
        labels = [f"t = {t:.2f}" for t in bins] or None
        ax.plot([r["step"] for r in rows], values.numpy(), marker="o", markersize=3, label=labels)
        ax.set(title=title, xlabel="step")
        if labels:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # the files the scripts read as images


def read_image(path):
    """One image file -> uint8 (H, W, 3): 16-bit files scaled to 8 bits (PIL's convert would clip them to white); a
    file that cannot be read is an error that names it."""
    import numpy as np  # Part B only: Part A needs neither numpy nor PIL
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16-bit greyscale: 65535 -> 255
                image = Image.fromarray((np.asarray(image) / 257).round().astype(np.uint8))
            return np.asarray(image.convert("RGB"))
    except Exception as e:  # truncated, corrupt, not an image
        raise ValueError(f"image {path} cannot be read ({e}): replace or delete it and rerun") from None


# the SD-VAE of latent diffusion: latents are scaled by 0.18215 to unit variance (LDM); REG and REPA use 'ema'
LATENT_SCALE = 0.18215
VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(name="ema", device="cpu"):
    """The SD-VAE (diffusers AutoencoderKL): 'ema' / 'mse' (fetched from the hub), a hub name, or a local folder with
    config.json and the weights."""
    from diffusers import AutoencoderKL

    try:
        # low_cpu_mem_usage=False: the VAE is small; it loads without `accelerate` (and without a warning about it)
        vae = AutoencoderKL.from_pretrained(VAES.get(name, name), low_cpu_mem_usage=False)
    except Exception as e:
        files = f"config.json and diffusion_pytorch_model.safetensors of hf.co/{VAES['ema']}"
        problem = f"no SD-VAE from {name!r} ({type(e).__name__}): no folder with config.json, nor on the hub"
        raise ValueError(f"{problem}. Put the {files} in a folder, pass it as --vae") from None
    return vae.to(device).eval().requires_grad_(False)


# 9. Teaching diagnostics: where in t the token helps, how a sample forms, pictures that say what they show ------------


@torch.no_grad()
def loss_per_t_bin(model, x, y, feats=None, bins=10, seed=0):
    """The image and token velocity losses of `model` on a fixed batch at the centre of each of `bins` equal t bins
    (minRF's diagnostic): reg_loss with a fixed t, fixed noise from `seed` and no label dropout, so calls at different
    steps compare like with like. -> dict(t=[bins], denoise=[bins], denoise_cls=[bins]) (0 without a token)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()  # no REPA projection, no dropout of labels
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(x.shape, generator=generator).to(x.device)  # (B, C, H, W)
    eps_cls = None
    if net.cfg.entangled:
        eps_cls = torch.randn((len(x), net.cfg.token_width), generator=generator).to(x.device)  # (B, K)
    centres = ((torch.arange(bins, dtype=torch.float64) + 0.5) / bins).tolist()
    result = dict(t=centres, denoise=[], denoise_cls=[])
    for centre in centres:
        t = torch.full((len(x),), centre, device=x.device)  # (B,)
        losses = reg_loss(net, x, y, feats, label_dropout=0.0, t=t, noise=(eps, eps_cls))
        result["denoise"].append(float(losses["denoise"]))
        result["denoise_cls"].append(float(losses["denoise_cls"]))
    net.train(was_training)
    return result


def strip_frames(trace, frames=8):
    """From sample(..., trace=list): the clean-image estimates at `frames` steps evenly spaced from the first (t = 1) to
    the last -> ((B, frames, C, H, W), the frames' times), one row of a sampling strip per sample."""
    picks = torch.linspace(0, len(trace) - 1, frames).round().long().tolist()
    chosen = [trace[i][1].float().cpu() for i in picks]
    return torch.stack(chosen, dim=1), [trace[i][0] for i in picks]


def save_grid(path, images, rows, columns=(), title=""):
    """A picture that says what it shows: images (R, K, 3, H, W) in [0, 1] as R rows of K tiles with a gap between
    tiles, each row named on its left (`rows`), each column on top (`columns`, optional), a `title` above. Tiles
    smaller than 64 px are enlarged (nearest neighbour) so that a name fits beside them. Needs PIL."""
    from PIL import Image, ImageDraw, ImageFont  # Part B only

    R, K, _, H, W = images.shape
    zoom = max(1, 64 // H)
    gap = 4
    font = ImageFont.load_default(size=12)  # the default size, 10, loses its spaces
    left = 8 + round(max(font.getlength(name) for name in rows))
    top = 16 * (bool(title) + bool(columns)) + gap
    width = max(left + K * (W * zoom + gap), 8 + round(font.getlength(title)))  # wide enough for the whole title
    canvas = Image.new("RGB", (width, top + R * (H * zoom + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black", font=font)
    for k, name in enumerate(columns):
        draw.text((left + k * (W * zoom + gap), top - 16), name, fill="black", font=font)
    tiles = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # (R, K, H, W, 3)
    for r, name in enumerate(rows):
        y = top + r * (H * zoom + gap)
        draw.text((4, y + H * zoom // 2 - 7), name, fill="black", font=font)
        for k in range(K):
            tile = Image.fromarray(tiles[r, k]).resize((W * zoom, H * zoom), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + k * (W * zoom + gap), y))
    canvas.save(path)
    return path
