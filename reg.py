"""
REG: Representation Entanglement for Generation, in one file.

Papers:  REG   Wu et al., NeurIPS 2025          https://arxiv.org/abs/2507.01467
         REPA  Yu et al., ICLR 2025             https://arxiv.org/abs/2410.06940
         SiT   Ma et al., ECCV 2024             https://arxiv.org/abs/2401.08740 (on DiT's adaLN-Zero blocks, 2212.09748)

A SiT transformer predicts the velocity of a noised image x_t. REPA aligns the hidden states of an early block with the
patch features z of a frozen DINOv2. REG prepends ONE token to the patch tokens: the DINOv2 class token c of the same
image, noised with the same t, and predicts its velocity too (REG Sec. 3):

    L = |v_hat - v|^2  +  beta * |v_c_hat - v_c|^2  +  lambda * mean_n -cos(h_phi(h_n), z_n)     (n over all 1+T tokens)

Time convention (used everywhere below): t = 0 is data, t = 1 is noise;  x_t = alpha_t x + sigma_t eps.
Shape legend: B batch, C channels, H W image side, p patch, T = HW/p^2 patch tokens, D width, E encoder width.
Markers: a line ending in `# [REPA]` is what REPA adds to SiT, `# [REG]` what REG adds to SiT+REPA.
"""
import json
import math
import os
import random
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# 1. Building blocks (SiT Sec. 3 / DiT Sec. 3.2) -----------------------------------------------------------------------

def modulate(h, shift, scale):
    return h * (1 + scale) + shift


def unpatchify(x, p, grid):
    """(B, T, p*p*C) -> (B, C, H, W); each token is laid out (row in patch, column in patch, channel), channel fastest."""
    return rearrange(x, 'b (h w) (p q c) -> b c (h p) (w q)', h=grid, p=p, q=p)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos positions (MAE recipe): first half of the channels encodes the column, second half the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))       # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    def embed(pos):
        angle = pos.flatten().double()[:, None] * omega                                   # (T, D/4)
        return torch.cat([angle.sin(), angle.cos()], dim=1)                               # (T, D/2)
    return torch.cat([embed(cols), embed(rows)], dim=1).float()                           # (T, D)


def timestep_embedding(t, dim=256):
    """t in [0, 1] -> (B, 256) sinusoid of t itself (not 1000 t), cos first; an MLP follows in the model."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))  # (128,)
    angle = t.float()[:, None] * freqs[None]                                              # (B, 128)
    return torch.cat([angle.cos(), angle.sin()], dim=-1)                                  # (B, 256)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens, written out on fused SDPA; optional per-head qk LayerNorm."""
    def __init__(self, dim, heads, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, h):
        q, k, v = rearrange(self.qkv(h), 'b n (three k d) -> three b k n d', three=3, k=self.heads)  # 3 x (B, heads, N, D/heads)
        h = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)            # (B, heads, N, D/heads)
        return self.proj(rearrange(h, 'b k n d -> b n (k d)'))                            # (B, N, D)


class SiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning c (adaLN-Zero, DiT Sec. 3.2)."""
    def __init__(self, dim, heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(approximate='tanh'),
                                             fc2=nn.Linear(hidden, dim)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, h, c):                                                              # h (B, N, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, D)
        h = h + gate1 * self.attn(modulate(self.norm1(h), shift1, scale1))                # (B, N, D)
        return h + gate2 * self.mlp(modulate(self.norm2(h), shift2, scale2))              # (B, N, D)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then one head per kind of token: patches -> p*p*C velocities, REG token -> E velocities."""
    def __init__(self, dim, patch, channels, token_dim=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.linear_cls = nn.Linear(dim, token_dim) if token_dim else None                # [REG] token velocity head
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)                 # 2 x (B, 1, D)
        return modulate(self.norm_final(h), shift, scale)                                 # (B, N, D)

# 2. The model: SiT + REPA projector + REG token (REG Sec. 3) ----------------------------------------------------------

METHODS = {  # name -> switches of one model and one loss (REG Sec. 4 ablations)
    'sit':         dict(repa=False, token='none'),     # plain SiT
    'repa':        dict(repa=True, token='none'),      # SiT + REPA
    'reg':         dict(repa=True, token='cls'),       # SiT + REPA + REG (the paper's method)
    'reg-noalign': dict(repa=False, token='cls'),      # class token without the alignment loss ("REG w/o REPA")
    'reg-learned': dict(repa=True, token='learned'),   # a learnable token in place of the entangled one
    'reg-mean':    dict(repa=True, token='mean'),      # mean of the encoder's patch tokens in place of its class token
}


@dataclass
class SiTConfig:
    input_size: int = 32        # side of the input: 32 = SD-VAE latents of 256px images, or CIFAR pixels
    in_channels: int = 4        # 4 for SD-VAE latents, 3 for pixels
    patch_size: int = 2         # p: tokens are p x p patches, T = (input_size / p)^2
    depth: int = 28             # number of SiT blocks
    hidden_size: int = 1152     # D
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000     # K; label K is the null label for CFG
    qk_norm: bool = False       # off in the paper; stabilises long bf16 runs
    repa: bool = True           # REPA projector after block `encoder_depth` (training-only head)
    token: str = 'cls'          # extra token: 'cls' (REG), 'mean' (encoder patch mean), 'learned', 'none'
    encoder_dim: int = 768      # E: width of the frozen encoder (DINOv2 ViT-B/14)
    encoder_depth: int = 8      # REPA/REG: 1-based block whose output is aligned (4 for B, 8 for L/XL)
    projector_dim: int = 2048   # REPA projector MLP width


class SiT(nn.Module):
    """SiT with adaLN-Zero; REPA's projector and REG's entangled token exist only when the config asks for them."""
    def __init__(self, cfg: SiTConfig):
        super().__init__()
        if cfg.token not in ('cls', 'mean', 'learned', 'none'):
            raise ValueError(f"unknown token kind {cfg.token!r}: use 'cls', 'mean', 'learned' or 'none'")
        if cfg.input_size % cfg.patch_size:
            raise ValueError(f"input_size {cfg.input_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.repa and not 1 <= cfg.encoder_depth <= cfg.depth:
            raise ValueError(f"encoder_depth {cfg.encoder_depth} must lie in 1..depth ({cfg.depth})")
        self.cfg, self.grid, D, E = cfg, cfg.input_size // cfg.patch_size, cfg.hidden_size, cfg.encoder_dim
        self.entangled = cfg.token in ('cls', 'mean')                                     # [REG] token is noised and denoised
        self.extra = int(cfg.token != 'none')                                             # [REG] 1 token slot before the patches
        self.x_embedder, self.t_embedder, self.y_embedder = nn.Module(), nn.Module(), nn.Module()  # DiT/SiT names
        self.x_embedder.proj = nn.Conv2d(cfg.in_channels, D, cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder.embedding_table = nn.Embedding(cfg.num_classes + 1, D)            # row K: the null label (CFG)
        if self.entangled:                                                                # [REG]
            self.token_embedder = nn.Linear(E, D)                                         # [REG] W_c: E -> D
            self.token_norm = nn.LayerNorm(D, eps=1e-6)                                   # [REG] LN with affine
        if cfg.token == 'learned':                                                        # [REG]
            self.learned_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)                # [REG] ablation: learnable token
        pos = torch.cat([torch.zeros(self.extra, D), sincos_pos_embed(D, self.grid)])     # [REG] zero row for the token slot
        self.pos_embed = nn.Parameter(pos[None], requires_grad=False)                     # (1, extra+T, D)
        self.blocks = nn.ModuleList(SiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        if cfg.repa:                                                                      # [REPA]
            P = cfg.projector_dim                                                         # [REPA]
            self.projector = nn.Sequential(nn.Linear(D, P), nn.SiLU(), nn.Linear(P, P), nn.SiLU(), nn.Linear(P, E))  # [REPA]
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels, E if self.entangled else None) # [REG]
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))                                   # the patch conv as a matrix
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        zero += [self.final_layer.linear_cls] if self.entangled else []                   # [REG]
        for m in zero:                                                                    # adaLN-Zero: the net starts at v = 0
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y, cls=None):
        """x (B, C, H, W), t (B,), y (B,), cls (B, E) noised token -> (v (B, C, H, W), v_cls (B, E), z_proj (B, N, E)).
        v_cls is None without an entangled token; z_proj is None outside training or without REPA."""
        cfg, B = self.cfg, x.shape[0]
        if x.shape[1:] != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(f"the model expects inputs of shape (B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}),"
                             f" got {tuple(x.shape)}: check the image size and channels, or build the model to match")
        h = rearrange(self.x_embedder.proj(x), 'b d h w -> b (h w) d')                    # (B, T, D)
        if self.entangled:                                                                # [REG]
            if cls is None or cls.shape != (B, cfg.encoder_dim):                          # [REG]
                raise ValueError(f"the REG token must be (B, E) = ({B}, {cfg.encoder_dim}), got {getattr(cls, 'shape', None)}:"
                                 f" the encoder width must equal encoder_dim")                               # [REG]
            tok = self.token_norm(self.token_embedder(cls))[:, None]                      # [REG] (B, 1, D)
            h = torch.cat([tok, h], dim=1)                                                # [REG] (B, 1+T, D)
        elif self.extra:                                                                  # [REG]
            h = torch.cat([self.learned_token.expand(B, -1, -1), h], dim=1)               # [REG] (B, 1+T, D)
        h = h + self.pos_embed                                                            # (B, N, D), N = extra+T
        c = self.t_embedder.mlp(timestep_embedding(t)) + self.y_embedder.embedding_table(y)  # (B, D)
        z_proj = None                                                                     # [REPA]
        for i, block in enumerate(self.blocks):
            h = block(h, c)                                                               # (B, N, D)
            if cfg.repa and self.training and i + 1 == cfg.encoder_depth:                 # [REPA]
                z_proj = self.projector(h)                                                # [REPA] (B, N, E)
        h = self.final_layer(h, c)                                                        # (B, N, D)
        v = unpatchify(self.final_layer.linear(h[:, self.extra:]), cfg.patch_size, self.grid)  # (B, C, H, W)
        v_cls = self.final_layer.linear_cls(h[:, 0]) if self.entangled else None          # [REG] (B, E)
        return v, v_cls, z_proj

# 3. Frozen encoder (REPA Sec. 3): class token and patch tokens on the SiT token grid ----------------------------------

ENCODERS = {f'dinov2-{s}{r}': f'vit_{n}_patch14{r.replace("-", "_") + "4" if r else ""}_dinov2.lvd142m'
            for s, n in dict(s='small', b='base', l='large', g='giant').items() for r in ('', '-reg')}


class FrozenEncoder(nn.Module):
    """A frozen timm model that maps images (uint8 or [-1, 1]) to (class token (B, E), patch tokens (B, grid^2, E))."""
    def __init__(self, net, grid):
        super().__init__()
        self.net, self.grid = net.eval().requires_grad_(False), grid
        self.vit, pcfg, self.dim = hasattr(net, 'patch_embed'), net.pretrained_cfg, net.num_features
        self.register_buffer('mean', torch.tensor(pcfg['mean']).view(1, 3, 1, 1), persistent=False)  # as it was trained
        self.register_buffer('std', torch.tensor(pcfg['std']).view(1, 3, 1, 1), persistent=False)
        # a ViT sees images resized so that its patch grid is the SiT grid; a CNN its own size, its map resampled
        self.size = grid * net.patch_embed.patch_size[0] if self.vit else pcfg['input_size'][-1]
        if self.vit:
            net.set_input_size(img_size=(self.size, self.size))

    @torch.no_grad()
    def forward(self, images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"the encoder takes RGB images (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2        # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode='bicubic', align_corners=False)
        x = (x - self.mean) / self.std
        f = self.net.forward_features(x)
        if self.vit:                                                                      # after the final norm
            return f[:, 0].float(), f[:, self.net.num_prefix_tokens:].float()             # (B, E), (B, T, E)
        pooled = self.net.forward_head(f, pre_logits=True)                                # (B, E)
        fmap = F.interpolate(f.float(), size=(self.grid, self.grid), mode='bilinear', align_corners=False)
        return pooled.float(), rearrange(fmap, 'b e h w -> b (h w) e')                    # (B, E), (B, T, E)


def load_encoder(name='dinov2-b', grid=16, weights=None, device='cpu', flag='--encoder-weights'):
    """DINOv2 (`dinov2-{s,b,l,g}[-reg]`) or any timm model by name. `weights`: a local file (offline), None to fetch
    from the Hugging Face hub, or 'random' for an untrained copy of the architecture (tests)."""
    import timm
    arch = ENCODERS.get(name, name)
    if not timm.is_model(arch):
        raise ValueError(f"unknown encoder {name!r}: use one of {sorted(ENCODERS)} or a timm model name")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"the SiT token grid must be a positive integer, got {grid!r}")
    if weights not in (None, 'random') and not os.path.isfile(weights):
        raise ValueError(f"encoder weights file {weights!r} does not exist")
    overlay = dict(file=weights) if weights not in (None, 'random') else None
    try:
        net = timm.create_model(arch, pretrained=weights != 'random', num_classes=0, pretrained_cfg_overlay=overlay)
    except Exception as e:
        hub = timm.models.get_pretrained_cfg(arch).hf_hub_id or arch
        raise RuntimeError(f"could not load weights for encoder {arch} ({type(e).__name__}: {str(e)[:200]}). Offline? "
                           f"Download https://huggingface.co/{hub}/resolve/main/model.safetensors and pass its path "
                           f"as {flag} (load_encoder(weights=...)).") from None
    return FrozenEncoder(net, grid).to(device)

# 4. Interpolant (SiT Sec. 2): x_t = alpha_t x + sigma_t eps, the same t for image and token ---------------------------

def interpolant(t, path='linear'):
    """t = 0 data, t = 1 noise -> (alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt)."""
    if path == 'linear':
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == 'cosine':
        a = t * math.pi / 2
        return a.cos(), a.sin(), -math.pi / 2 * a.sin(), math.pi / 2 * a.cos()
    raise ValueError(f"unknown path {path!r}: use 'linear' or 'cosine'")


def sample_time(n, weighting='uniform', path='linear', device='cpu'):
    """Training times: uniform (paper default) or log-normal (EDM-style: s = exp(N(0, 1)) mapped to t)."""
    if weighting == 'uniform':
        return torch.rand(n, device=device)
    if weighting == 'lognormal':
        s = torch.randn(n, device=device).exp()
        return s / (1 + s) if path == 'linear' else 2 / math.pi * torch.atan(s)
    raise ValueError(f"unknown time weighting {weighting!r}: use 'uniform' or 'lognormal'")

# 5. Joint loss (REG Sec. 3): velocity of the image + beta x velocity of the token + lambda x alignment ----------------

def unwrap(model):
    """The SiT inside a DDP or torch.compile wrapper."""
    while hasattr(model, 'module') or hasattr(model, '_orig_mod'):
        model = getattr(model, 'module', None) or model._orig_mod
    return model


def reg_loss(model, x, y, feats=None, beta=0.03, lam=0.5, path='linear', weighting='uniform', label_dropout=0.1):
    """x (B, C, H, W) clean input, y (B,) labels, feats = (cls (B, E), patches (B, T, E)) of the frozen encoder.
    Returns a dict of scalars: loss (what to backpropagate), denoise, token, align."""
    cfg = unwrap(model).cfg
    B, T = x.shape[0], (cfg.input_size // cfg.patch_size) ** 2
    if (cfg.repa or cfg.token != 'none') and feats is None:
        raise ValueError("this method needs the frozen encoder's features: pass feats=(cls, patches)")
    if feats is not None and feats[1].shape[1:] != (T, cfg.encoder_dim):
        raise ValueError(f"encoder patch tokens have shape {tuple(feats[1].shape[1:])} but the SiT grid needs (T, E) = "
                         f"({T}, {cfg.encoder_dim}): the encoder's patch grid must equal the SiT grid (load_encoder(grid=...))")
    t = sample_time(B, weighting, path, x.device)                                         # (B,)
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)                                 # 4 x (B,)
    bx = lambda a: a.view(B, 1, 1, 1)
    eps = torch.randn_like(x)                                                             # (B, C, H, W)
    x_t, v = bx(alpha) * x + bx(sigma) * eps, bx(d_alpha) * x + bx(d_sigma) * eps         # (B, C, H, W)
    c = None if feats is None else feats[1].mean(1) if cfg.token == 'mean' else feats[0]  # [REG] (B, E) the token
    c_t = v_c = None                                                                      # [REG]
    if cfg.token in ('cls', 'mean'):                                                      # [REG]
        eps_c = torch.randn_like(c)                                                       # [REG] its own noise, same t
        c_t = alpha[:, None] * c + sigma[:, None] * eps_c                                 # [REG] (B, E)
        v_c = d_alpha[:, None] * c + d_sigma[:, None] * eps_c                             # [REG] (B, E)
    y = torch.where(torch.rand(B, device=y.device) < label_dropout, cfg.num_classes, y)   # CFG: drop labels to null
    v_hat, v_c_hat, z_hat = model(x_t, t, y, c_t)
    denoise = (v_hat.float() - v).pow(2).mean()
    token = align = x.new_zeros(())
    if v_c_hat is not None:                                                               # [REG]
        token = (v_c_hat.float() - v_c).pow(2).mean()                                     # [REG]
    if z_hat is not None:                                                                 # [REPA]
        z = torch.cat([c[:, None], feats[1]], dim=1) if z_hat.shape[1] == T + 1 else feats[1]  # [REG] align slot 0 too
        align = -(F.normalize(z_hat.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1).mean()  # [REPA]
    return dict(loss=denoise + beta * token + lam * align, denoise=denoise, token=token, align=align)

# 6. Samplers (SiT Sec. 2; REG Sec. 3): one loop moves the pair (image, token) from t = 1 to t = 0 ---------------------

def guided_drift(model, pair, t, y, null_label, scales, guide, sde, path, dtype):
    """One network evaluation at time t -> the drifts of the pair (image, token). With `guide` the batch runs twice
    (labels y and the null label, same image and token) and a drift becomes uncond + scale (cond - uncond)."""
    if guide:
        pair = [None if s is None else torch.cat([s, s]) for s in pair]                   # [REG] the token too: (2B, ...)
        y = torch.cat([y, torch.full_like(y, null_label)])                                # (2B,)
    tt = torch.full((len(y),), t, dtype=torch.float64, device=y.device)
    out = model(pair[0].to(dtype), tt.to(dtype), y, None if pair[1] is None else pair[1].to(dtype))[:2]
    drifts = []
    for i, (s, v, scale) in enumerate(zip(pair, out, scales)):                           # i = 0 image, 1 token
        d = None if s is None else v.to(s.dtype)
        if d is not None and sde:                                                         # d = v - (w_t / 2) score, w_t = 2t
            alpha, sigma, d_alpha, d_sigma = (a.view(-1, *[1] * (s.dim() - 1)) for a in interpolant(tt.to(s.dtype), path))
            d = d - t * (alpha / d_alpha * d - s) / (sigma ** 2 - alpha / d_alpha * d_sigma * sigma)  # score from v
        if d is not None and guide:
            cond, uncond = d.chunk(2)
            d = cond if i == 1 and scale <= 0 else uncond + scale * (cond - uncond)       # [REG] token: own scale
        drifts.append(d)
    return drifts


@torch.no_grad()
def sample(model, x, y, cls=None, steps=250, mode='sde', cfg_scale=1.0, cls_cfg_scale=None, interval=(0.0, 1.0),
           null_label=1000, path='linear', state_dtype=None, noise=torch.randn_like):
    """x (B, C, H, W) and cls (B, E) start as N(0, I) at t = 1; returns the pair at t = 0.
    mode 'sde': Euler-Maruyama on linspace(1, 0.04, steps) then one deterministic step to 0 (the release's sampler);
    'euler' / 'heun': the probability-flow ODE on linspace(1, 0, steps + 1).
    `model` is any callable (x, t, y, cls) -> (v, v_cls, ...). CFG runs only where low <= t <= high.
    `noise(state)` draws the SDE's noise (default: the global RNG; pass per-sample generators for shard-proof seeds)."""
    if mode not in ('sde', 'euler', 'heun') or steps < 1:
        raise ValueError(f"sampler mode must be 'sde', 'euler' or 'heun' and steps >= 1, got {mode!r}, {steps}")
    dtype, state_dtype = x.dtype, state_dtype or (torch.float64 if x.device.type == 'cpu' else torch.float32)  # f64: slow on GPUs
    cls_cfg_scale = cfg_scale if cls_cfg_scale is None else cls_cfg_scale
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64) if mode != 'sde' else \
        torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    pair = [x.to(state_dtype), None if cls is None else cls.to(state_dtype)]              # [REG] (image, token)
    step = lambda a, b, h: [None if u is None else u + h * du for u, du in zip(a, b)]     # a + h * b, pairwise
    for i, (t, t_next) in enumerate(zip(ts[:-1].tolist(), ts[1:].tolist())):
        dt, last = t_next - t, i == len(ts) - 2
        guide = cfg_scale != 1.0 and interval[0] <= t <= interval[1]
        drift = lambda p, tau: guided_drift(model, p, tau, y, null_label, (cfg_scale, cls_cfg_scale), guide,
                                            mode == 'sde', path, dtype)
        d = drift(pair, t)
        new = step(pair, d, dt)
        if mode == 'sde' and not last:                                                    # + sqrt(w_t |dt|) n, w_t = 2t
            new = step(new, [None if u is None else noise(u) for u in new], math.sqrt(2 * t * abs(dt)))
        if mode == 'heun' and not last:                                                   # average with the slope at t_next
            new = step(pair, [None if a is None else (a + b) / 2 for a, b in zip(d, drift(new, t_next))], dt)
        pair = new
    return pair[0].to(dtype), None if pair[1] is None else pair[1].to(dtype)

# 7. Presets and checkpoints (the official release's layout, and our own weights_only files) ---------------------------

SIZES = dict(Ti=(4, 128, 2), S=(12, 384, 6), B=(12, 768, 12), L=(24, 1024, 16), XL=(28, 1152, 16))  # depth, D, heads
PRESETS = {f'SiT-{s}/{p}': dict(depth=d, hidden_size=w, num_heads=h, patch_size=p,  # Ti = tiny, for CPU work
                                encoder_depth=2 if s == 'Ti' else 4 if s in 'SB' else 8,   # REPA: 4 for S/B, 8 for L/XL
                                projector_dim=256 if s == 'Ti' else 2048)
           for s, (d, w, h) in SIZES.items() for p in (2, 4, 8)}


def make_model(preset='SiT-XL/2', method='reg', **overrides):
    """A model from a preset name ('SiT-B/2', ..., 'SiT-Ti/2' tiny) and a method name of METHODS."""
    for kind, name, table in (('preset', preset, PRESETS), ('method', method, METHODS)):
        if name not in table:
            raise ValueError(f"unknown {kind} {name!r}: choose one of {', '.join(table)}")
    return SiT(SiTConfig(**{**PRESETS[preset], **METHODS[method], **overrides}))


OFFICIAL_NAMES = {'cls_projectors2.': 'token_embedder.', 'wg_norm.': 'token_norm.', 'projectors.0.': 'projector.'}


def config_from_state_dict(sd):
    """Read a SiTConfig off a state dict (ours or the release's): widths, depth, patch, grid, classes, token parts."""
    sd = {rename_official(k): v for k, v in sd.items()}
    D, C, p, _ = sd['x_embedder.proj.weight'].shape
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    token = 'cls' if 'token_embedder.weight' in sd else 'learned' if 'learned_token' in sd else 'none'
    T = sd['pos_embed'].shape[1] - (token != 'none')
    preset = next((v for v in PRESETS.values() if (v['depth'], v['hidden_size'], v['patch_size']) == (depth, D, p)),
                  dict(num_heads=max(1, D // 64), encoder_depth=min(8, depth)))                   # heads are not stored
    E = sd['final_layer.linear_cls.weight'].shape[0] if token == 'cls' else \
        sd['projector.4.weight'].shape[0] if 'projector.4.weight' in sd else 768
    return SiTConfig(input_size=int(math.isqrt(T)) * p, in_channels=C, patch_size=p, depth=depth, hidden_size=D,
                     num_heads=preset['num_heads'], num_classes=sd['y_embedder.embedding_table.weight'].shape[0] - 1,
                     repa='projector.0.weight' in sd, token=token, encoder_dim=E,
                     encoder_depth=preset['encoder_depth'], projector_dim=sd.get('projector.0.weight', torch.zeros(2048)).shape[0],
                     qk_norm='blocks.0.attn.q_norm.weight' in sd)


def rename_official(key):
    """The release's name of a parameter -> ours (`cls_projectors2.weight` -> `token_embedder.weight`)."""
    for old, new in OFFICIAL_NAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_weights(model, sd):
    """Load our or the release's state dict strictly; a mismatch raises a ValueError that says what differs."""
    sd = {rename_official(k.removeprefix('module.').removeprefix('_orig_mod.')): v for k, v in sd.items()}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        fit = asdict(config_from_state_dict(sd)) if 'x_embedder.proj.weight' in sd else 'unknown'
        raise ValueError("checkpoint does not fit the model:" + "".join(
            f"\n  {what} ({len(ks)}): {', '.join(ks[:6])}{' ...' if len(ks) > 6 else ''}" for what, ks in
            (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)) if ks)
            + f"\nA config that fits the checkpoint: {fit}")
    model.load_state_dict(sd, strict=True, assign=next(model.parameters()).is_meta)   # a model built on 'meta' takes
    return model                                                                          # the tensors without a copy


def load_checkpoint(path):
    """torch.load a checkpoint safely (weights_only); the release's pickled argparse.Namespace is allowed as data."""
    import argparse
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is corrupt or not "
                         f"a PyTorch checkpoint: delete it or pass another one") from None


def save_checkpoint(path, state, keep=None):
    """Atomic: write a temporary file, then rename, so a kill never leaves half a checkpoint. Keeps the last `keep`."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)
    for old in list_checkpoints(folder)[:-keep] if keep else []:
        os.remove(old)


def list_checkpoints(folder):
    """Our checkpoints in a run folder (named by step, zero-padded), oldest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(os.path.join(folder, f) for f in names if f.endswith('.pt') and f[:-3].isdigit())

# 8. Pieces both training scripts share --------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, every step (the release's EMA)."""
    pairs = [(e, m) for e, m in zip(ema.parameters(), unwrap(model).parameters()) if m.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [m for _, m in pairs], 1 - decay)


def train_step(model, ema, opt, micro_losses, clip=1.0, ema_decay=0.9999, scaler=None):
    """One optimiser step: backward through each micro-batch (zero-arg fns returning reg_loss's dict; DDP syncs only on
    the last), clip the gradient norm, step, update the EMA. Returns the mean of each term as tensors (no host sync)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)                               # fp16 only; else a no-op
    opt.zero_grad(set_to_none=True)
    outs = []
    for i, micro in enumerate(micro_losses):
        with model.no_sync() if hasattr(model, 'no_sync') and i < len(micro_losses) - 1 else nullcontext():
            out = micro()
            scaler.scale(out['loss'] / len(micro_losses)).backward()
        outs.append({k: v.detach() for k, v in out.items()})
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    ema_update(ema, model, ema_decay)
    return {**{k: sum(o[k] for o in outs) / len(outs) for k in outs[0]}, 'grad_norm': grad_norm}


class Run:
    """A run folder: `log.jsonl` with one line per logged step, checkpoints `NNNNNNN.pt` (atomic, last `keep` kept),
    and exact resume: weights, EMA, optimiser, scaler, step, every RNG, and whatever `extra` the script adds."""
    def __init__(self, folder, keep=3):
        self.folder, self.keep = folder, keep
        os.makedirs(folder, exist_ok=True)

    def log(self, **record):
        with open(os.path.join(self.folder, 'log.jsonl'), 'a') as f:
            f.write(json.dumps({k: float(v) if torch.is_tensor(v) else v for k, v in record.items()}) + '\n')

    def save(self, step, model, ema, opt, scaler=None, **extra):
        rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        state = dict(model=unwrap(model).state_dict(), rng=rng, ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                     config=asdict(unwrap(model).cfg), scaler=scaler and scaler.state_dict(), **extra)
        save_checkpoint(os.path.join(self.folder, f'{step:07d}.pt'), state, self.keep)

    def resume(self, model, ema, opt, scaler=None, must_match=None):
        """Load the latest checkpoint of the folder into the given objects and cut the log back to its step; returns
        its dict ({} when there is none). The model's config and the flags in `must_match` (saved as `args=` extra)
        must equal the checkpoint's, else a ValueError lists what differs."""
        found, log = list_checkpoints(self.folder), os.path.join(self.folder, 'log.jsonl')
        state = load_checkpoint(found[-1]) if found else dict(step=0)
        old_args, cfg = state.get('args', {}), unwrap(model).cfg
        diff = [f"--{k.replace('_', '-')}: checkpoint {old_args.get(k)!r}, now {v!r}"
                for k, v in (must_match or {}).items() if found and old_args.get(k) != v]
        diff += [f"{k}: checkpoint {v!r}, now {getattr(cfg, k)!r}" for k, v in state.get('config', {}).items()
                 if getattr(cfg, k) != v]
        if diff:
            raise ValueError(f"{found[-1]} comes from another configuration:\n  " + "\n  ".join(diff) +
                             "\nresume with the original flags, or start a new run in another folder")
        lines = open(log).readlines() if os.path.isfile(log) else []
        with open(log, 'w') as f:                                                         # drop records past the checkpoint
            f.writelines(r for r in lines if json.loads(r)['step'] <= state['step'])
        if not found:
            return {}
        load_weights(unwrap(model), state['model'])
        load_weights(ema, state['ema'])
        opt.load_state_dict(state['opt'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        torch.set_rng_state(state['rng']['torch'])
        random.setstate(state['rng']['python'])
        if state['rng']['cuda'] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['rng']['cuda'])
        return state


def pick_device(name=None):
    """--device default: cuda (under torchrun: this process's GPU, cuda:LOCAL_RANK), then mps, then cpu."""
    mps = torch.backends.mps.is_available()
    device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'mps' if mps else 'cpu'))
    if device.type == 'cuda' and device.index is None and 'LOCAL_RANK' in os.environ:
        torch.cuda.set_device(device := torch.device('cuda', int(os.environ['LOCAL_RANK'])))
    return device


def autocast(device, precision='bf16'):
    """One mixed-precision context for every device: bf16 (default) or fp16 on GPUs, plain fp32 elsewhere."""
    if precision == 'fp32' or device.type != 'cuda':
        return nullcontext()
    return torch.autocast('cuda', dtype=torch.bfloat16 if precision == 'bf16' else torch.float16)


def model_flops(cfg, train=True):
    """Forward FLOPs of one input through the SiT: 2 per multiply-add of every matmul and conv, attention's QK^T and AV
    included; norms, softmax, elementwise ops and the frozen encoder not counted. A training step costs 3x (backward 2x)."""
    D, E, P, p, C, M = cfg.hidden_size, cfg.encoder_dim, cfg.projector_dim, cfg.patch_size, cfg.in_channels, \
        int(cfg.hidden_size * cfg.mlp_ratio)
    T = (cfg.input_size // p) ** 2
    N = T + (cfg.token != 'none')
    block = 2 * N * (4 * D * D + 2 * D * M) + 4 * N * N * D + 12 * D * D                  # qkv+proj, MLP, attention, adaLN
    io = 4 * T * p * p * C * D + 4 * D * D + 2 * (256 * D + D * D)                         # (un)patchify, final adaLN, t-MLP
    repa = 2 * N * (D * P + P * P + P * E) if cfg.repa and train else 0                    # [REPA] projector (training only)
    return cfg.depth * block + io + repa + (4 * E * D if cfg.token in ('cls', 'mean') else 0)  # [REG] token in and out


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), the trace of the root taken through symmetric eigenvalues."""
    (mu1, s1), (mu2, s2) = a, b
    w, V = torch.linalg.eigh(s1)
    root1 = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T                                   # S_a^1/2
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()           # tr (S_a^1/2 S_b S_a^1/2)^1/2
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


@torch.no_grad()
def encoder_stats(encoder, batches, cache=None):
    """Mean and covariance of a frozen encoder's class token over image batches (uint8 or [-1, 1]); with dinov2-l this
    is FD_DINOv2's feature space (Stein et al. 2023). Cached to the file `cache` when given."""
    if cache and os.path.isfile(cache):
        return tuple(torch.load(cache, weights_only=True))
    feats = torch.cat([encoder(b.to(encoder.mean.device))[0].cpu() for b in batches]).double()  # (N, E)
    stats = feats.mean(0), torch.cov(feats.T)
    if cache:
        save_checkpoint(cache, list(stats))
    return stats
