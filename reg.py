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
Markers: a line ending in `# [REPA]` is what REPA adds to SiT, `# [REG]` what REG adds to SiT+REPA.

Part A (sections 1-7) is the method: copy it on its own, it never uses Part B.
Part B (section 8) is the training kit the scripts share: EMA, run folders with exact resume, devices, timing, metrics.
"""

import argparse
import hashlib
import json
import math
import os
import random
import signal
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import asdict, dataclass

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
    """Multi-head self-attention over all tokens, written out on fused SDPA; optional per-head qk LayerNorm."""

    def __init__(self, dim, heads, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, h):  # h (B, N, D)
        qkv = self.qkv(h)  # (B, N, 3D)
        qkv = rearrange(qkv, "b n (three k d) -> three b k n d", three=3, k=self.heads)  # (3, B, heads, N, D/heads)
        q, k, v = qkv.unbind(0)  # 3 x (B, heads, N, D/heads)
        q = self.q_norm(q)
        k = self.k_norm(k)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        h = rearrange(h, "b k n d -> b n (k d)")  # (B, N, D)
        return self.proj(h)  # (B, N, D)


class SiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning `cond` (adaLN-Zero, DiT Sec. 3.2)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
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

    def __init__(self, dim, patch, channels, token_dim=None, token_slots=0):
        super().__init__()
        self.token_slots = token_slots  # [REG] 1 when a token sits before the patches
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.linear_cls = nn.Linear(dim, token_dim) if token_dim else None  # [REG] the token's velocity head
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h, cond):  # h (B, N, D), cond (B, D)
        shift, scale = self.adaLN_modulation(cond)[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        h = modulate(self.norm_final(h), shift, scale)  # (B, N, D)
        v_patches = self.linear(h[:, self.token_slots :])  # (B, T, p*p*C)
        v_cls = None
        if self.linear_cls is not None:  # [REG]
            v_cls = self.linear_cls(h[:, 0])  # [REG] (B, E)
        return v_patches, v_cls


# 2. The model: SiT + REPA projector + REG token (REG Sec. 3) ----------------------------------------------------------

# name -> switches of one model and one loss (REG Sec. 4 ablations)
METHODS = {
    "sit": dict(repa=False, token_kind="none"),  # plain SiT
    "repa": dict(repa=True, token_kind="none"),  # SiT + REPA
    "reg": dict(repa=True, token_kind="cls"),  # SiT + REPA + REG (the paper's method)
    "reg-noalign": dict(repa=False, token_kind="cls"),  # class token without the alignment loss ("REG w/o REPA")
    "reg-learned": dict(repa=True, token_kind="learned"),  # a learnable token in place of the entangled one
    "reg-mean": dict(repa=True, token_kind="mean"),  # mean of the encoder's patch tokens in place of its class token
}
TOKEN_KINDS = ("cls", "mean", "learned", "none")


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
    qk_norm: bool = False  # off in the paper; stabilises long bf16 runs
    repa: bool = True  # REPA projector after block `encoder_depth` (a training-only head)
    token_kind: str = "cls"  # the extra token: 'cls' (REG), 'mean' (encoder patch mean), 'learned', 'none'
    encoder_dim: int = 768  # E: width of the frozen encoder (DINOv2 ViT-B/14)
    encoder_depth: int = 8  # REPA/REG: 1-based block whose output is aligned (4 for B, 8 for L/XL)
    projector_dim: int = 2048  # REPA projector MLP width

    @property
    def grid(self):  # patch tokens per side
        return self.input_size // self.patch_size

    @property
    def has_token_slot(self):  # [REG] one token sits before the patch tokens
        return self.token_kind != "none"

    @property
    def entangled(self):  # [REG] the token is an encoder output, noised and denoised with the image
        return self.token_kind in ("cls", "mean")

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
        slots = int(cfg.has_token_slot)  # [REG]
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        if cfg.entangled:  # [REG]
            self.token_embedder = nn.Linear(E, D)  # [REG] W_cls: E -> D
            self.token_norm = nn.LayerNorm(D, eps=1e-6)  # [REG] LayerNorm with affine
        if cfg.token_kind == "learned":  # [REG]
            self.learned_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)  # [REG] ablation: a learnable token
        pos = torch.cat([torch.zeros(slots, D), sincos_pos_embed(D, cfg.grid)])  # [REG] a zero row for the token slot
        self.pos_embed = nn.Parameter(pos[None], requires_grad=False)  # (1, slots+T, D)
        self.blocks = nn.ModuleList(SiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        if cfg.repa:  # [REPA]
            P = cfg.projector_dim  # [REPA]
            self.projector = nn.Sequential(  # [REPA] h_phi: D -> P -> P -> E
                nn.Linear(D, P),  # [REPA]
                nn.SiLU(),  # [REPA]
                nn.Linear(P, P),  # [REPA]
                nn.SiLU(),  # [REPA]
                nn.Linear(P, E),  # [REPA]
            )  # [REPA]
        token_dim = E if cfg.entangled else None  # [REG]
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels, token_dim, slots)  # [REG] both heads
        self.initialize_weights()

    @property
    def entangled(self):
        return self.cfg.entangled

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
        v_cls is None without an entangled token; z_hat is None outside training or without REPA."""
        cfg = self.cfg
        check_inputs(cfg, x, cls)
        B = x.shape[0]
        h = self.x_embedder(x)  # (B, T, D)
        if cfg.entangled:  # [REG]
            cls_token = self.token_norm(self.token_embedder(cls))  # [REG] (B, D)
            h = torch.cat([cls_token[:, None], h], dim=1)  # [REG] (B, 1+T, D)
        if cfg.token_kind == "learned":  # [REG]
            h = torch.cat([self.learned_token.expand(B, -1, -1), h], dim=1)  # [REG] (B, 1+T, D)
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


def check_config(cfg):
    """Refuse a config that cannot build a model, with the reason in words."""
    if cfg.token_kind not in TOKEN_KINDS:
        raise ValueError(f"unknown token kind {cfg.token_kind!r}: use one of {', '.join(TOKEN_KINDS)}")
    if cfg.input_size % cfg.patch_size:
        raise ValueError(f"input_size {cfg.input_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.repa and not 1 <= cfg.encoder_depth <= cfg.depth:
        raise ValueError(f"encoder_depth {cfg.encoder_depth} must lie in 1..depth ({cfg.depth})")


def check_inputs(cfg, x, cls):
    """Refuse inputs of the wrong shape before they reach a layer (whose error would not name the cause)."""
    expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"the model expects inputs of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}: "
            "check the image size and channels, or build the model to match"
        )
    if cfg.entangled and (cls is None or tuple(cls.shape) != (x.shape[0], cfg.encoder_dim)):  # [REG]
        got = None if cls is None else tuple(cls.shape)  # [REG]
        raise ValueError(  # [REG]
            f"the REG token must be (B, E) = ({x.shape[0]}, {cfg.encoder_dim}), got {got}: "
            "the encoder width must equal encoder_dim"
        )


# 3. Frozen encoder (REPA Sec. 3): class token and patch tokens on the SiT token grid ----------------------------------

# short name -> timm architecture (the weights: hf.co/timm/<architecture>)
ENCODERS = {
    "dinov2-s": "vit_small_patch14_dinov2.lvd142m",
    "dinov2-b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2-l": "vit_large_patch14_dinov2.lvd142m",
    "dinov2-g": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2-s-reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2-b-reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2-l-reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2-g-reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}


class FrozenEncoder(nn.Module):
    """A frozen timm model that maps images (uint8 or [-1, 1]) to feats = (class token (B, E), patches (B, grid^2, E)).
    A ViT sees images resized so that its patch grid is the SiT grid; a CNN its own size, its map resampled to the grid
    and its pooled vector playing the class token."""

    def __init__(self, net, grid):
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
            self.size = pretrained_cfg["input_size"][-1]

    @torch.no_grad()
    def forward(self, images):  # images (B, 3, H, W), uint8 or [-1, 1]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"the encoder takes RGB images (B, 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float() / 255  # (B, 3, H, W) in [0, 1]
        else:
            x = (images.float() + 1) / 2
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


def load_encoder(name="dinov2-b", grid=16, weights=None, device="cpu", flag="--encoder-weights"):
    """DINOv2 (`dinov2-{s,b,l,g}[-reg]`) or any timm model by name. `weights`: a local file (offline), None to fetch
    from the Hugging Face hub, or 'random' for an untrained copy of the architecture (tests)."""
    import timm

    arch = ENCODERS.get(name, name)
    if not timm.is_model(arch):
        raise ValueError(f"unknown encoder {name!r}: use one of {sorted(ENCODERS)} or a timm model name")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"the SiT token grid must be a positive integer, got {grid!r}")
    local_file = weights not in (None, "random")
    if local_file and not os.path.isfile(weights):
        raise ValueError(f"encoder weights file {weights!r} does not exist")
    overlay = dict(file=weights) if local_file else None
    try:
        net = timm.create_model(arch, pretrained=weights != "random", num_classes=0, pretrained_cfg_overlay=overlay)
    except Exception as e:
        hub = timm.models.get_pretrained_cfg(arch).hf_hub_id or arch
        raise RuntimeError(
            f"could not load weights for encoder {arch} ({type(e).__name__}: {str(e)[:200]}). Offline? "
            f"Download https://huggingface.co/{hub}/resolve/main/model.safetensors and pass its path "
            f"as {flag} (load_encoder(weights=...))."
        ) from None
    return FrozenEncoder(net, grid).to(device)


def token_target(cfg, feats):  # [REG]
    """What the token slot stands for (B, E): the encoder's class token, or for 'mean' the mean of its patch tokens."""
    enc_cls, enc_patches = feats  # [REG] (B, E), (B, T, E)
    if cfg.token_kind == "mean":  # [REG]
        return enc_patches.mean(1)  # [REG] (B, E)
    return enc_cls  # [REG] (B, E)


# 4. Interpolant (SiT Sec. 2): x_t = alpha_t x + sigma_t eps, the same t for image and token ---------------------------


def interpolant(t, path="linear"):
    """t = 0 data, t = 1 noise -> (alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt)."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":
        angle = t * math.pi / 2
        return angle.cos(), angle.sin(), -math.pi / 2 * angle.sin(), math.pi / 2 * angle.cos()
    raise ValueError(f"unknown path {path!r}: use 'linear' or 'cosine'")


def sample_time(n, weighting="uniform", path="linear", device="cpu"):
    """Training times: uniform (paper default) or log-normal (EDM-style: s = exp(N(0, 1)) mapped to t)."""
    if weighting == "uniform":
        return torch.rand(n, device=device)
    if weighting == "lognormal":
        s = torch.randn(n, device=device).exp()
        if path == "linear":
            return s / (1 + s)
        return 2 / math.pi * torch.atan(s)
    raise ValueError(f"unknown time weighting {weighting!r}: use 'uniform' or 'lognormal'")


# 5. Joint loss (REG Sec. 3): velocity of the image + beta x velocity of the token + lambda x alignment ----------------


def unwrap(model):
    """The SiT inside a DDP or torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def reg_loss(model, x, y, feats=None, beta=0.03, lam=0.5, path="linear", weighting="uniform", label_dropout=0.1):
    """x (B, C, H, W) clean input, y (B,) labels, feats = (class token (B, E), patch tokens (B, T, E)) of the frozen
    encoder. Returns a dict of scalars: loss (what to backpropagate), denoise, denoise_cls, align."""
    cfg = unwrap(model).cfg
    check_feats(cfg, feats)
    B = x.shape[0]
    t = sample_time(B, weighting, path, x.device)  # (B,)
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)  # 4 x (B,)
    alpha_x = alpha.view(B, 1, 1, 1)
    sigma_x = sigma.view(B, 1, 1, 1)
    eps = torch.randn_like(x)  # (B, C, H, W)
    x_t = alpha_x * x + sigma_x * eps  # (B, C, H, W)
    v = d_alpha.view(B, 1, 1, 1) * x + d_sigma.view(B, 1, 1, 1) * eps  # (B, C, H, W)
    cls_t = None  # [REG]
    if cfg.entangled:  # [REG]
        cls = token_target(cfg, feats)  # [REG] (B, E)
        eps_cls = torch.randn_like(cls)  # [REG] its own noise, the same t
        cls_t = alpha[:, None] * cls + sigma[:, None] * eps_cls  # [REG] (B, E)
        v_cls = d_alpha[:, None] * cls + d_sigma[:, None] * eps_cls  # [REG] (B, E)
    drop = torch.rand(B, device=y.device) < label_dropout
    y = torch.where(drop, cfg.num_classes, y)  # CFG: drop labels to the null label
    v_hat, v_cls_hat, z_hat = model(x_t, t, y, cls_t)
    denoise = (v_hat.float() - v).pow(2).mean()
    denoise_cls = x.new_zeros(())
    align = x.new_zeros(())
    if cfg.entangled:  # [REG]
        denoise_cls = (v_cls_hat.float() - v_cls).pow(2).mean()  # [REG]
    if cfg.repa:  # [REPA]
        z = alignment_target(cfg, feats)  # [REPA] (B, N, E)
        similarity = F.normalize(z_hat.float(), dim=-1) * F.normalize(z.float(), dim=-1)  # [REPA] (B, N, E)
        align = -similarity.sum(-1).mean()  # [REPA] mean over tokens of -cos
    loss = denoise + beta * denoise_cls + lam * align
    return dict(loss=loss, denoise=denoise, denoise_cls=denoise_cls, align=align)


def alignment_target(cfg, feats):  # [REPA]
    """The encoder tokens the projected hidden states are aligned with: the patches, and the token slot (B, N, E)."""
    enc_cls, enc_patches = feats  # [REPA] (B, E), (B, T, E)
    if cfg.has_token_slot:  # [REG] the slot is aligned too
        slot_target = token_target(cfg, feats)  # [REG] (B, E)
        return torch.cat([slot_target[:, None], enc_patches], dim=1)  # [REG] (B, 1+T, E)
    return enc_patches  # [REPA] (B, T, E)


def check_feats(cfg, feats):
    """Refuse missing or misshapen encoder features, naming the fix."""
    if cfg.needs_encoder and feats is None:
        raise ValueError("this method needs the frozen encoder's features: pass feats=(cls, patches)")
    if feats is not None and tuple(feats[1].shape[1:]) != (cfg.grid**2, cfg.encoder_dim):
        raise ValueError(
            f"encoder patch tokens have shape {tuple(feats[1].shape[1:])} but the SiT grid needs (T, E) = "
            f"({cfg.grid**2}, {cfg.encoder_dim}): the encoder's patch grid must equal the SiT grid "
            "(load_encoder(grid=...))"
        )


# 6. Samplers (SiT Sec. 2; REG Sec. 3): one loop moves the pair (x, cls) from t = 1 to t = 0 ---------------------------


def score_from_velocity(v, x_t, t, path="linear"):
    """The score grad log p_t(x_t) that a velocity implies (SiT Sec. 2; REPA's get_score_from_velocity):
    x_t = alpha x + sigma eps and v = d_alpha x + d_sigma eps give  score = (alpha / d_alpha v - x_t) / var."""
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)
    ratio = alpha / d_alpha
    variance = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x_t) / variance


def clean_estimate(v, x_t, t, path="linear"):
    """The model's estimate of the clean input at time t: solve x_t = alpha x + sigma eps, v = d_alpha x + d_sigma eps
    for x (linear path: x = x_t - t v)."""
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)
    return (d_sigma * x_t - sigma * v) / (d_sigma * alpha - sigma * d_alpha)


def guided_velocity(model, x, cls, t, y, null_label, cfg_scale, cls_cfg_scale, guide, dtype):
    """One network evaluation at time t -> (v, v_cls) in the state's dtype. With `guide` the batch runs twice (labels y
    and the null label, the same x and cls) and v = v_uncond + scale (v_cond - v_uncond); the token has its own scale
    (<= 0: its conditional velocity). A token of width 0 stands for a model without one."""
    has_token = cls.shape[1] > 0  # [REG]
    if guide:
        x = torch.cat([x, x])  # (2B, C, H, W)
        cls = torch.cat([cls, cls])  # [REG] (2B, E)
        y = torch.cat([y, torch.full_like(y, null_label)])  # (2B,)
    t_batch = torch.full((len(y),), t, dtype=dtype, device=y.device)  # (B,) or (2B,)
    cls_in = cls.to(dtype) if has_token else None  # [REG]
    v, v_cls = model(x.to(dtype), t_batch, y, cls_in)[:2]
    v = v.to(x.dtype)  # (B or 2B, C, H, W)
    v_cls = v_cls.to(cls.dtype) if has_token else torch.zeros_like(cls)  # [REG] (B or 2B, E)
    if not guide:
        return v, v_cls
    v_cond, v_uncond = v.chunk(2)
    v = v_uncond + cfg_scale * (v_cond - v_uncond)
    v_cls_cond, v_cls_uncond = v_cls.chunk(2)  # [REG]
    v_cls = v_cls_uncond + cls_cfg_scale * (v_cls_cond - v_cls_uncond)  # [REG]
    if cls_cfg_scale <= 0:  # [REG] a token scale <= 0 turns its guidance off
        v_cls = v_cls_cond  # [REG]
    return v, v_cls


def sampling_times(steps, mode):
    """The time grid: the ODEs run linspace(1, 0, steps + 1); the SDE linspace(1, 0.04, steps), then one last step to 0
    (the release's sampler; the score is singular at t = 0)."""
    if mode not in ("sde", "euler", "heun") or steps < 1:
        raise ValueError(f"sampler mode must be 'sde', 'euler' or 'heun' and steps >= 1, got {mode!r}, {steps}")
    if mode == "sde":
        return torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


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
    null_label=1000,
    path="linear",
    state_dtype=None,
    noise=torch.randn_like,
    trace=None,
):
    """x (B, C, H, W) and cls (B, E) start as N(0, I) at t = 1; returns (x, cls) at t = 0 (cls None without a token).
    mode 'sde': Euler-Maruyama with diffusion w_t = 2t, so drift = v - t score; 'euler' / 'heun': the probability-flow
    ODE dx/dt = v. CFG only where low <= t <= high. `model`: any callable (x, t, y, cls) -> (v, v_cls, ...). `noise(u)`
    draws the SDE's noise (per-sample generators make seeds shard-proof); `trace` receives (t, clean estimate) per step."""
    dtype = x.dtype  # the model's input dtype
    if state_dtype is None:
        state_dtype = torch.float64 if x.device.type == "cpu" else torch.float32  # float64 is slow on GPUs
    if cls_cfg_scale is None:
        cls_cfg_scale = cfg_scale
    has_token = cls is not None  # [REG]
    if not has_token:
        cls = x.new_zeros(x.shape[0], 0)  # a token of width 0: the same loop serves models without one
    x = x.to(state_dtype)  # (B, C, H, W)
    cls = cls.to(state_dtype)  # [REG] (B, E)
    times = sampling_times(steps, mode).tolist()  # checks mode and steps first
    for i in range(steps):
        t = times[i]
        t_next = times[i + 1]
        dt = t_next - t  # < 0: from noise to data
        last = i == steps - 1
        guide = cfg_scale != 1.0 and interval[0] <= t <= interval[1]
        scales = (cfg_scale, cls_cfg_scale)
        t_state = torch.tensor(t, dtype=x.dtype, device=x.device)
        v, v_cls = guided_velocity(model, x, cls, t, y, null_label, *scales, guide, dtype)
        if trace is not None:
            trace.append((t, clean_estimate(v, x, t_state, path).to(dtype)))
        drift = v  # the ODE moves along v
        drift_cls = v_cls  # [REG]
        if mode == "sde":  # the SDE's drift: v - (w_t / 2) score, w_t = 2t
            drift = v - t * score_from_velocity(v, x, t_state, path)
            drift_cls = v_cls - t * score_from_velocity(v_cls, cls, t_state, path)  # [REG]
        x_next = x + dt * drift  # Euler step
        cls_next = cls + dt * drift_cls  # [REG] the same step for the token
        if mode == "sde" and not last:  # Euler-Maruyama: + sqrt(w_t |dt|) n
            x_next = x_next + math.sqrt(2 * t * abs(dt)) * noise(x_next)
            cls_next = cls_next + math.sqrt(2 * t * abs(dt)) * noise(cls_next)  # [REG]
        if mode == "heun" and not last:  # Heun: the average of the slopes at t and t_next
            v_next, v_cls_next = guided_velocity(model, x_next, cls_next, t_next, y, null_label, *scales, guide, dtype)
            x_next = x + dt * ((drift + v_next) / 2)
            cls_next = cls + dt * ((drift_cls + v_cls_next) / 2)  # [REG]
        x = x_next
        cls = cls_next
    return x.to(dtype), cls.to(dtype) if has_token else None


# 7. Presets and checkpoints (the official release's layout, and our own weights_only files) ---------------------------

# DiT's sizes with SiT's names; Ti (tiny) is ours, for CPU work. encoder_depth: REPA's block, 4 for S/B, 8 for L/XL.
PRESETS = {
    "SiT-Ti/2": dict(depth=4, hidden_size=128, num_heads=2, patch_size=2, encoder_depth=2, projector_dim=256),
    "SiT-Ti/4": dict(depth=4, hidden_size=128, num_heads=2, patch_size=4, encoder_depth=2, projector_dim=256),
    "SiT-Ti/8": dict(depth=4, hidden_size=128, num_heads=2, patch_size=8, encoder_depth=2, projector_dim=256),
    "SiT-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2, encoder_depth=4, projector_dim=2048),
    "SiT-S/4": dict(depth=12, hidden_size=384, num_heads=6, patch_size=4, encoder_depth=4, projector_dim=2048),
    "SiT-S/8": dict(depth=12, hidden_size=384, num_heads=6, patch_size=8, encoder_depth=4, projector_dim=2048),
    "SiT-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2, encoder_depth=4, projector_dim=2048),
    "SiT-B/4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4, encoder_depth=4, projector_dim=2048),
    "SiT-B/8": dict(depth=12, hidden_size=768, num_heads=12, patch_size=8, encoder_depth=4, projector_dim=2048),
    "SiT-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2, encoder_depth=8, projector_dim=2048),
    "SiT-L/4": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=4, encoder_depth=8, projector_dim=2048),
    "SiT-L/8": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=8, encoder_depth=8, projector_dim=2048),
    "SiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, encoder_depth=8, projector_dim=2048),
    "SiT-XL/4": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=4, encoder_depth=8, projector_dim=2048),
    "SiT-XL/8": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=8, encoder_depth=8, projector_dim=2048),
}


def make_model(preset="SiT-XL/2", method="reg", **overrides):
    """A model from a preset name ('SiT-B/2', ..., 'SiT-Ti/2' tiny) and a method name of METHODS."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    settings = {**PRESETS[preset], **METHODS[method], **overrides}
    return SiT(SiTConfig(**settings))


def config_from_dict(fields):
    """The SiTConfig a checkpoint stores (asdict). Files written before `token_kind` was named so call it `token`."""
    fields = dict(fields)
    if "token" in fields:
        fields["token_kind"] = fields.pop("token")
    unknown = sorted(set(fields) - set(SiTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"the checkpoint's config has fields this reg.py does not know ({unknown}): a newer file?")
    return SiTConfig(**fields)


# the release's parameter names -> ours (everything else has the same name)
OFFICIAL_NAMES = {"cls_projectors2.": "token_embedder.", "wg_norm.": "token_norm.", "projectors.0.": "projector."}


def rename_official(key):
    """The release's name of a parameter -> ours (`cls_projectors2.weight` -> `token_embedder.weight`)."""
    for old, new in OFFICIAL_NAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def rename_to_official(key):
    """Our name of a parameter -> the release's (the inverse of rename_official), for exporting our weights."""
    for old, new in OFFICIAL_NAMES.items():
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def config_from_state_dict(sd):
    """Read a SiTConfig off a state dict (ours or the release's): widths, depth, patch, grid, classes, token parts.
    Heads and the REPA block are not stored: they come from the preset of the same depth, width and patch."""
    sd = {rename_official(k): v for k, v in sd.items()}
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if "token_embedder.weight" in sd:
        token_kind = "cls"
    elif "learned_token" in sd:
        token_kind = "learned"
    else:
        token_kind = "none"
    T = sd["pos_embed"].shape[1] - int(token_kind != "none")
    matching = [v for v in PRESETS.values() if (v["depth"], v["hidden_size"], v["patch_size"]) == (depth, D, p)]
    preset = matching[0] if matching else dict(num_heads=max(1, D // 64), encoder_depth=min(8, depth))
    repa = "projector.0.weight" in sd
    if token_kind == "cls":
        encoder_dim = sd["final_layer.linear_cls.weight"].shape[0]
    elif repa:
        encoder_dim = sd["projector.4.weight"].shape[0]
    else:
        encoder_dim = 768
    return SiTConfig(
        input_size=math.isqrt(T) * p,
        in_channels=C,
        patch_size=p,
        depth=depth,
        hidden_size=D,
        num_heads=preset["num_heads"],
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        repa=repa,
        token_kind=token_kind,
        encoder_dim=encoder_dim,
        encoder_depth=preset["encoder_depth"],
        projector_dim=sd["projector.0.weight"].shape[0] if repa else 2048,
    )


def load_weights(model, sd):
    """Load our or the release's state dict strictly; a mismatch raises a ValueError that says what differs."""
    sd = {rename_official(k.removeprefix("module.").removeprefix("_orig_mod.")): v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    common = sorted(set(sd) & set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in common
              if sd[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        problems = ""
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                more = " ..." if len(keys) > 6 else ""
                problems += f"\n  {what} ({len(keys)}): {', '.join(keys[:6])}{more}"
        fit = asdict(config_from_state_dict(sd)) if "x_embedder.proj.weight" in sd else "unknown"
        raise ValueError(f"checkpoint does not fit the model:{problems}\nA config that fits the checkpoint: {fit}")
    on_meta = next(model.parameters()).is_meta  # a model built on 'meta' takes the tensors without a copy
    model.load_state_dict(sd, strict=True, assign=on_meta)
    return model


def load_checkpoint(path):
    """torch.load a checkpoint safely (weights_only); the release's pickled argparse.Namespace is allowed as data."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"checkpoint {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is corrupt or not "
            "a PyTorch checkpoint: delete it or pass another one"
        ) from None


# ======================================================================================================================
# PART B. THE TRAINING KIT (what train_cifar.py, train_imagenet.py and sample.py share; Part A never uses it)
# ======================================================================================================================

# 8. EMA, run folders with exact resume, stopping, devices, timing, FLOPs, metrics, the VAE -----------------------------


@torch.no_grad()
def ema_update(ema, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, every step (the release's EMA)."""
    pairs = [(e, m) for e, m in zip(ema.parameters(), unwrap(model).parameters()) if m.requires_grad]
    ema_params = [e for e, _ in pairs]
    model_params = [m for _, m in pairs]
    torch._foreach_lerp_(ema_params, model_params, 1 - decay)


def save_checkpoint(path, state, keep=None):
    """Atomic: write a temporary file, then rename, so a kill never leaves half a checkpoint. Keeps the last `keep`."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            os.remove(old)


def list_checkpoints(folder):
    """Our checkpoints in a run folder (named by step, zero-padded), oldest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(os.path.join(folder, f) for f in names if f.endswith(".pt") and f[:-3].isdigit())


def read_log(path):
    """The records of a log.jsonl; a torn last line (a kill in mid-write) is dropped."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # only the last line can be torn
    return records


class Run:
    """A run folder: `args.json` (every setting), `log.jsonl` (one line per record), checkpoints `NNNNNNN.pt` (atomic,
    the last `keep` kept) and exact resume: weights, EMA, optimiser, scaler, step, every RNG, and the script's extras."""

    def __init__(self, folder, keep=3):
        self.folder = folder
        self.keep = keep
        os.makedirs(folder, exist_ok=True)

    def write_args(self, args):
        with open(os.path.join(self.folder, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1, default=str)

    def log(self, **record):
        record = {k: float(v) if torch.is_tensor(v) else v for k, v in record.items()}
        with open(os.path.join(self.folder, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, step, model, ema, opt, scaler=None, **extra):
        rng = dict(
            torch=torch.get_rng_state(),
            python=random.getstate(),
            cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        )
        state = dict(
            model=unwrap(model).state_dict(),
            ema=ema.state_dict(),
            opt=opt.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            step=step,
            rng=rng,
            config=asdict(unwrap(model).cfg),
            **extra,
        )
        save_checkpoint(os.path.join(self.folder, f"{step:07d}.pt"), state, self.keep)

    def resume(self, model, ema, opt, scaler=None, must_match=None, may_change=None):
        """Load the latest checkpoint of the folder into the given objects and cut the log back to its step; returns its
        dict ({} when there is none). The model's config and the settings in `must_match` (saved as `args=` extra) must
        equal the checkpoint's, else a ValueError lists what differs; a change of one in `may_change` (the learning
        rate, say) is allowed and logged."""
        found = list_checkpoints(self.folder)
        if not found:
            self.trim_log(0)
            return {}
        state = load_checkpoint(found[-1])
        old_args = state.get("args", {})
        cfg = asdict(unwrap(model).cfg)
        saved = asdict(config_from_dict(state["config"]))  # an older file's field names read as today's
        differences = [f"--{k.replace('_', '-')}: checkpoint {old_args.get(k)!r}, now {v!r}"
                       for k, v in (must_match or {}).items() if old_args.get(k) != v]  # fmt: skip
        differences += [f"{k}: checkpoint {v!r}, now {cfg.get(k)!r}" for k, v in saved.items() if cfg.get(k) != v]
        if differences:
            raise ValueError(
                f"{found[-1]} comes from another configuration:\n  " + "\n  ".join(differences)
                + "\nresume with the original flags, or start a new run in another folder"
            )  # fmt: skip
        self.trim_log(state["step"])
        changes = {k: (old_args.get(k), v) for k, v in (may_change or {}).items() if old_args.get(k) != v}
        for k, (old, new) in changes.items():
            print(f"resume: --{k.replace('_', '-')} changed from {old} to {new} at step {state['step']}")
            self.log(step=state["step"], note=f"--{k.replace('_', '-')} changed from {old} to {new}")
        load_weights(unwrap(model), state["model"])
        load_weights(ema, state["ema"])
        opt.load_state_dict(state["opt"])
        for group in opt.param_groups:  # a changed learning rate wins over the saved one
            group["lr"] = (may_change or {}).get("lr", group["lr"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state

    def trim_log(self, step):
        """Keep the log records up to `step` (those past the checkpoint are redone), dropping a torn last line."""
        path = os.path.join(self.folder, "log.jsonl")
        records = [r for r in read_log(path) if r["step"] <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


class GracefulStop:
    """Ctrl-C or SIGTERM (what schedulers send before a kill): the loop finishes its step, saves and stops. A second
    Ctrl-C aborts at once. Use as `with GracefulStop() as stop:` and test `stop.requested` after each step."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        message = f"{name}: saving a checkpoint after this step (continue with --resume); Ctrl-C again aborts"
        print("\n" + message, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def check_finite(record, step, folder):
    """Stop a run whose loss or gradient went non-finite, pointing at the last good checkpoint and the fix."""
    bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        last = list_checkpoints(folder)[-1] if list_checkpoints(folder) else "none yet"
        raise RuntimeError(
            f"non-finite values at step {step} ({bad}); nothing was saved. The last good checkpoint is {last}: "
            "continue it with --resume and a lower --lr (allowed on resume), or use --precision fp32"
        )


def pick_device(name=None):
    """--device default: cuda (under torchrun: this process's GPU, cuda:LOCAL_RANK), then mps, then cpu."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device, precision="bf16"):
    """One mixed-precision context for every device: bf16 (default) or fp16 on GPUs, plain fp32 elsewhere."""
    if precision == "fp32" or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def number(text, kind, low, high, allowed):
    """An argparse type: `text` as an int or a float within [low, high], else an error that says what is allowed
    (argparse adds the flag's name), so a bad value fails when the command line is read, before any work."""
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
    return value


def positive_int(text):
    return number(text, int, 1, math.inf, "an integer >= 1")


def nonneg_int(text):
    return number(text, int, 0, math.inf, "an integer >= 0")


def unit_float(text):
    return number(text, float, 0.0, 1.0, "a number from 0 to 1")


def nonneg_float(text):
    return number(text, float, 0.0, 1.7976931348623157e308, "a finite number >= 0")


def positive_float(text):
    return number(text, float, 2.2250738585072014e-308, 1.7976931348623157e308, "a finite number > 0")


# dense bf16 peak TFLOP/s of common GPUs, for the MFU (nanoGPT's estimate_mfu, per PaLM appendix B)
PEAK_TFLOPS = {"H200": 989, "H100": 989, "B200": 2250, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165}


def model_flops(cfg, train=True):
    """Forward FLOPs of one input through the SiT: 2 per multiply-add of every matmul and conv, attention's QK^T and AV
    included; norms, softmax, elementwise ops and the frozen encoder not counted. A training step costs 3x (backward 2x)."""
    D = cfg.hidden_size
    E = cfg.encoder_dim
    P = cfg.projector_dim
    p = cfg.patch_size
    C = cfg.in_channels
    M = int(cfg.hidden_size * cfg.mlp_ratio)
    T = cfg.grid**2
    N = T + int(cfg.has_token_slot)
    block = 2 * N * (4 * D * D + 2 * D * M) + 4 * N * N * D + 12 * D * D  # qkv+proj, MLP, attention, adaLN
    io = 4 * T * p * p * C * D + 4 * D * D + 2 * (256 * D + D * D)  # (un)patchify, final adaLN, t-MLP
    repa = 2 * N * (D * P + P * P + P * E) if cfg.repa and train else 0  # [REPA] projector (training only)
    token = 4 * E * D if cfg.entangled else 0  # [REG] token in and out
    return cfg.depth * block + io + repa + token


def encoder_flops(encoder):
    """Forward FLOPs per image of a frozen ViT by model_flops' rule; 0 for a CNN or no encoder (plain SiT)."""
    if encoder is None or not encoder.vit:
        return 0
    net = encoder.net
    N = (encoder.size // net.patch_embed.patch_size[0]) ** 2 + net.num_prefix_tokens
    weights = sum(p.numel() for p in net.blocks.parameters())
    return 2 * N * weights + 4 * len(net.blocks) * N * N * encoder.dim


class StepTimer:
    """--bench: milliseconds of each phase of a step (data, encoder, forward+backward, optimiser). On a GPU each mark
    waits for the queue first, so a phase's time is its own (this slows the step a little; it is a benchmark)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.steps = []
        self.last = 0.0

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self):
        self.steps.append({})
        self.last = self.now()

    def mark(self, phase):
        now = self.now()
        step = self.steps[-1]
        step[phase] = step.get(phase, 0.0) + (now - self.last) * 1e3
        self.last = now

    def report(self, images_per_step, flops_per_image, device, warmup, peak_tflops=0):
        """Medians over the steps after `warmup`: ms per phase, images/s, TFLOP/s, MFU, peak memory."""
        timed = self.steps[warmup:]
        phases = list(timed[0])
        medians = {f"ms_{k}": float(torch.tensor([s[k] for s in timed]).median()) for k in phases}
        ms_step = float(torch.tensor([sum(s.values()) for s in timed]).median())
        name = torch.cuda.get_device_name(device) if self.cuda else "cpu"
        peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0)
        if self.cuda:
            memory = torch.cuda.max_memory_allocated(device)
        else:
            import resource

            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        images_per_s = images_per_step * 1e3 / ms_step
        tflops = flops_per_image * images_per_s / 1e12
        return dict(
            device=name,
            images_per_s=images_per_s,
            ms_step=ms_step,
            **medians,
            peak_mem_gib=memory / 2**30,
            tflops=tflops,
            mfu=tflops / peak if peak else float("nan"),
        )


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), the trace of the root taken through symmetric eigenvalues."""
    mu1, s1 = a
    mu2, s2 = b
    w, V = torch.linalg.eigh(s1)
    root1 = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T  # S_a^1/2
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()  # tr (S_a^1/2 S_b S_a^1/2)^1/2
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


@torch.no_grad()
def encoder_stats(encoder, batches, cache=None):
    """Mean and covariance of a frozen encoder's class token over image batches (uint8 or [-1, 1]); with dinov2-l this
    is FD_DINOv2's feature space (Stein et al. 2023). Cached to the file `cache` when given."""
    if cache and os.path.isfile(cache):
        return tuple(torch.load(cache, weights_only=True))
    feats = [encoder(batch.to(encoder.mean.device))[0].cpu() for batch in batches]
    feats = torch.cat(feats).double()  # (N, E)
    stats = (feats.mean(0), torch.cov(feats.T))
    if cache:
        save_checkpoint(cache, list(stats))
    return stats


def fingerprint(*items):
    """A short hex digest of tensors, strings and the bytes of files (a path prefixed 'file:'): what makes data, weights
    or a feature cache the same, whatever its name."""
    digest = hashlib.sha256()
    for item in items:
        if torch.is_tensor(item):
            digest.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
        elif isinstance(item, str) and item.startswith("file:"):
            with open(item[5:], "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def plot_losses(log_path, png, keys=("loss", "denoise", "denoise_cls", "align")):
    """losses.png: one panel per loss term of log.jsonl over the steps (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss curves (pip install matplotlib)")
        return None
    records = [r for r in read_log(log_path) if "loss" in r]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        ax.plot([r["step"] for r in records], [r.get(key, float("nan")) for r in records])
        ax.set(title=key, xlabel="step")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


# the SD-VAE of latent diffusion: latents are scaled by 0.18215 to unit variance (LDM); REG and REPA use 'ema'
LATENT_SCALE = 0.18215
VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(name="ema", device="cpu"):
    """The SD-VAE (diffusers AutoencoderKL): 'ema' / 'mse' (fetched from the hub), a hub name, a local folder with
    config.json and the weights, or a weights file inside such a folder."""
    repo = VAES.get(name, name)
    folder = os.path.dirname(repo) if os.path.isfile(repo) else repo
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError("the SD-VAE needs diffusers: pip install diffusers") from None
    try:
        # low_cpu_mem_usage=False: the VAE is small; it loads without `accelerate` (and without a warning about it)
        vae = AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False)
    except Exception as e:
        raise ValueError(
            f"no SD-VAE from {name!r} ({type(e).__name__}: {str(e)[:120]}). Offline? Put config.json and "
            f"diffusion_pytorch_model.safetensors of hf.co/{VAES['ema']} in a folder and pass that folder as --vae"
        ) from None
    return vae.to(device).eval().requires_grad_(False)


# 9. Teaching diagnostics: where in t the token helps, where the generated token lands, how a sample forms ------------


@torch.no_grad()
def loss_per_t_bin(model, x, y, feats=None, bins=10, seed=0, path="linear"):
    """The image and token velocity losses of `model` on a fixed batch at the centre of each of `bins` equal t bins
    (minRF's diagnostic). The noise comes from `seed`, so calls at different training steps compare like with like.
    -> dict(t=[bins], denoise=[bins], denoise_cls=[bins]) (denoise_cls all 0 without an entangled token)."""
    net = unwrap(model)
    cfg = net.cfg
    was_training = net.training
    net.eval()
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(x.shape, generator=generator).to(x.device)  # (B, C, H, W)
    cls = token_target(cfg, feats) if cfg.entangled else None  # (B, E)
    eps_cls = torch.randn(cls.shape, generator=generator).to(x.device) if cfg.entangled else None
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    result = dict(t=centres.tolist(), denoise=[], denoise_cls=[])
    for t_value in centres.tolist():
        t = torch.full((x.shape[0],), t_value, device=x.device)  # (B,)
        alpha, sigma, d_alpha, d_sigma = interpolant(t, path)  # 4 x (B,)
        x_t = alpha.view(-1, 1, 1, 1) * x + sigma.view(-1, 1, 1, 1) * eps
        v = d_alpha.view(-1, 1, 1, 1) * x + d_sigma.view(-1, 1, 1, 1) * eps
        cls_t = None
        if cfg.entangled:
            cls_t = alpha[:, None] * cls + sigma[:, None] * eps_cls
            v_cls = d_alpha[:, None] * cls + d_sigma[:, None] * eps_cls
        v_hat, v_cls_hat, _ = net(x_t, t, y, cls_t)
        result["denoise"].append(float((v_hat.float() - v).pow(2).mean()))
        token_loss = float((v_cls_hat.float() - v_cls).pow(2).mean()) if cfg.entangled else 0.0
        result["denoise_cls"].append(token_loss)
    net.train(was_training)
    return result


def class_centroids(tokens, labels, num_classes):
    """The mean encoder token of each class (K, E), from real images' tokens (N, E) and their labels (N,)."""
    sums = torch.zeros(num_classes, tokens.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels.cpu(), tokens.double().cpu())
    counts = torch.bincount(labels.cpu(), minlength=num_classes).clamp(min=1)
    return (sums / counts[:, None]).float()


def token_landing(cls, y, centroids):
    """Where generated tokens (B, E) land among the class centroids (K, E): token_match, the fraction whose nearest
    centroid (by cosine) is the centroid of the label they were generated for, and token_cos, their mean cosine with it."""
    cosines = F.normalize(cls.float().cpu(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T  # (B, K)
    nearest = cosines.argmax(dim=1)  # (B,)
    own = cosines.gather(1, y.cpu()[:, None])[:, 0]  # (B,)
    return dict(token_match=float((nearest == y.cpu()).float().mean()), token_cos=float(own.mean()))


def strip_frames(trace, frames=8):
    """From sample(..., trace=list): the clean-image estimates at `frames` steps evenly spaced from the first (t = 1) to
    the last -> (B, frames, C, H, W), one row of a sampling strip per sample."""
    picks = torch.linspace(0, len(trace) - 1, frames).round().long().tolist()
    chosen = [trace[i][1].float().cpu() for i in picks]
    return torch.stack(chosen, dim=1)


def plot_t_bins(log_path, png):
    """t_bins.png: the held-out image (and token) velocity loss of each t bin over training, one curve per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(log_path) if "bin_denoise" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    has_token = any(any(r["bin_denoise_cls"]) for r in records)
    panels = ["bin_denoise", "bin_denoise_cls"] if has_token else ["bin_denoise"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    colours = plt.cm.viridis(torch.linspace(0, 1, len(records[0]["bin_t"])).tolist())
    for ax, key in zip(axes[0], panels):
        for k, t in enumerate(records[0]["bin_t"]):
            ax.plot(steps, [r[key][k] for r in records], color=colours[k], label=f"t={t:.2f}")
        ax.set(title=f"held-out {key.removeprefix('bin_')} per t bin", xlabel="step", yscale="log")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_comparison(logs, png, key="fd"):
    """One PNG with `key` (default FD) over training steps for several runs: logs = {name: path of its log.jsonl}.
    Where the logs hold `bin_denoise`, a second panel shows the last evaluation's loss per t bin, run against run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, path in logs.items():
        records = [r for r in read_log(path) if key in r]
        axes[0].plot([r["step"] for r in records], [r[key] for r in records], marker="o", label=name)
        binned = [r for r in read_log(path) if "bin_denoise" in r]
        if binned:
            axes[1].plot(binned[-1]["bin_t"], binned[-1]["bin_denoise"], marker="o", label=name)
    axes[0].set(title=f"{key} over training (lower is better)", xlabel="step", ylabel=key)
    axes[1].set(title="held-out image velocity loss per t bin, last evaluation", xlabel="t (0 data, 1 noise)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
