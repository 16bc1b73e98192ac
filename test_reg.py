"""Tests for reg.py: closed forms, invariants, an independent reference forward, and the official checkpoint layout.
CPU, offline, tiny configs. Run: python -m pytest -q"""

import argparse
import copy
import json
import math
import os
import random
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import reg
from tests.conftest import one_thread  # noqa: F401  (the tiny models run on one CPU thread)

pytestmark = pytest.mark.filterwarnings("ignore:REG token .* wide, model")  # tiny presets

OFFICIAL_KEYS = os.path.join(os.path.dirname(__file__), "tests", "official_keys_sit_xl2_reg.json")


def patchify(x, p):
    """(B, C, H, W) -> (B, T, p*p*C), the layout unpatchify inverts: (row in patch, column in patch, channel)."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def tiny(method="reg", **kw):
    cfg = dict(input_size=8, in_channels=3, num_classes=5, encoder_dim=24, encoder_depth=2, projector_dim=32)
    torch.manual_seed(0)
    return reg.make_model("SiT-Ti/2", method, **{**cfg, **kw})


def randomize(model, scale=0.05):
    """Give every zero-initialised weight a value, so outputs depend on all of them."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return model


def inputs(model, B=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    x = torch.randn(B, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, c.num_classes, (B,), generator=g)
    cls = torch.randn(B, c.encoder_dim, generator=g)
    T = (c.input_size // c.patch_size) ** 2
    feats = (torch.randn(B, c.encoder_dim, generator=g), torch.randn(B, T, c.encoder_dim, generator=g))
    return x, t, y, cls, feats


# --- parameter counts (the paper's: B 131.7M, L 459.7M, XL 676.9M with the token, without the projector) ---------------


@pytest.mark.parametrize(
    "preset,with_token,projector,token_parts",
    [("SiT-B/2", 131.7, 7.3, 1.18), ("SiT-L/2", 459.7, 7.9, 1.58), ("SiT-XL/2", 676.9, 8.1, 1.77)],
)
def test_parameter_counts_match_paper(preset, with_token, projector, token_parts):
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    with torch.device("meta"):
        reg_full, reg_nop, repa_nop = (
            reg.make_model(preset, "reg"),
            reg.make_model(preset, "reg", repa=False),
            reg.make_model(preset, "sit"),
        )
    assert round(count(reg_nop), 1) == with_token
    assert round(count(reg_full) - count(reg_nop), 1) == projector
    assert round(count(reg_nop) - count(repa_nop), 2) == token_parts


def test_plain_sit_has_sits_parameter_count():
    with torch.device("meta"):
        m = reg.make_model("SiT-B/2", "sit")
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == 130.5  # the paper's "130M"
    assert not hasattr(m, "projector") and not hasattr(m, "token_embedder") and m.final_layer.linear_cls is None


@pytest.mark.parametrize("preset", list(reg.PRESETS))
def test_every_preset_builds_and_runs(preset):
    with torch.device("meta"):
        m = reg.make_model(preset, "reg")
    assert m.cfg.hidden_size % m.cfg.num_heads == 0
    assert m.pos_embed.shape == (1, 1 + (32 // m.cfg.patch_size) ** 2, m.cfg.hidden_size)
    if preset.startswith("SiT-S") or preset.startswith("SiT-Ti"):  # the release's S presets are broken: ours run
        m = reg.make_model(preset, "reg", input_size=16)
        out = m(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 1]), torch.randn(2, 768))
        assert out[0].shape == (2, 4, 16, 16) and out[1].shape == (2, 768)


# --- patchify, embeddings ----------------------------------------------------------------------------------------------


def test_patchify_round_trip_and_channel_fastest_layout():
    x = torch.randn(2, 3, 8, 12)
    p = 2
    tokens = patchify(x, p)  # (2, 4*6, 2*2*3)
    assert tokens.shape == (2, 24, 12)
    i, j, r, s, c = 1, 4, 1, 0, 2  # token (row 1, col 4), pixel (1, 0), channel 2
    assert tokens[1, i * 6 + j, (r * p + s) * 3 + c] == x[1, c, i * p + r, j * p + s]
    sq = torch.randn(2, 3, 8, 8)
    assert torch.equal(reg.unpatchify(patchify(sq, p), p, 4), sq)


def test_patch_conv_is_a_linear_map_on_the_patchified_layout():
    m = tiny()
    x = torch.randn(2, 3, 8, 8)
    w, b = m.x_embedder.proj.weight, m.x_embedder.proj.bias  # (D, C, p, p)
    via_conv = m.x_embedder.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)
    via_linear = patchify(x, 2) @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + b
    torch.testing.assert_close(via_conv, via_linear, atol=1e-5, rtol=1e-5)


def test_pos_embed_is_sincos_with_a_zero_row_for_the_token():
    m = tiny()
    pe = m.pos_embed[0]
    assert torch.all(pe[0] == 0) and not m.pos_embed.requires_grad
    D, g = m.cfg.hidden_size, 4
    # token (row 1, col 2): first half of the channels encodes the column, second half the row (MAE)
    omega = 1 / 10000 ** (torch.arange(D // 4) / (D / 4))
    expect = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega), torch.sin(1 * omega), torch.cos(1 * omega)])
    torch.testing.assert_close(pe[1 + 1 * g + 2], expect, atol=1e-6, rtol=1e-6)


# --- an independent reference forward, written from the paper's equations with naive ops -----------------------------------------


def reference_forward(m, x, t, y, cls):
    c = m.cfg
    D, heads, p = c.hidden_size, c.num_heads, c.patch_size
    P = lambda name: dict(m.named_parameters())[name]
    lin = lambda h, name: h @ P(name + ".weight").T + P(name + ".bias")
    ln = lambda h, eps=1e-6: (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
    gelu = lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    silu = lambda h: h * torch.sigmoid(h)
    w = P("x_embedder.proj.weight")
    patches = patchify(x, p) @ w.permute(0, 2, 3, 1).reshape(D, -1).T + P("x_embedder.proj.bias")
    tok = ln(lin(cls, "token_embedder")) * P("token_norm.weight") + P("token_norm.bias")
    h = torch.cat([tok[:, None], patches], 1) + m.pos_embed
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    cond = lin(silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + P("y_embedder.embedding_table.weight")[y]
    for k in range(c.depth):
        b = f"blocks.{k}."
        mod = lin(silu(cond), b + "adaLN_modulation.1")[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = [mod[..., i * D : (i + 1) * D] for i in range(6)]
        a = ln(h) * (1 + sc1) + sh1
        q, kk, v = lin(a, b + "attn.qkv").split(D, -1)
        split = lambda z: z.reshape(z.shape[0], z.shape[1], heads, D // heads).transpose(1, 2)
        att = torch.softmax(split(q) @ split(kk).transpose(-1, -2) / math.sqrt(D // heads), -1) @ split(v)
        h = h + g1 * lin(att.transpose(1, 2).reshape(h.shape), b + "attn.proj")
        h = h + g2 * lin(gelu(lin(ln(h) * (1 + sc2) + sh2, b + "mlp.fc1")), b + "mlp.fc2")
    mod = lin(silu(cond), "final_layer.adaLN_modulation.1")[:, None]
    h = ln(h) * (1 + mod[..., D:]) + mod[..., :D]
    out = lin(h[:, 1:], "final_layer.linear")  # (B, T, p*p*C), channel fastest
    g = c.input_size // p
    img = out.reshape(-1, g, g, p, p, c.in_channels).permute(0, 5, 1, 3, 2, 4).reshape(x.shape)
    return img, lin(h[:, 0], "final_layer.linear_cls")


def test_model_matches_reference_forward():
    m = randomize(tiny()).eval()
    x, t, y, cls, _ = inputs(m)
    v, v_cls, z = m(x, t, y, cls)
    rv, rv_cls = reference_forward(m, x, t, y, cls)
    assert z is None  # projector is training-only
    torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v_cls, rv_cls, atol=1e-5, rtol=1e-4)


def test_projector_reads_the_encoder_depth_block():
    m = randomize(tiny()).train()
    x, t, y, cls, _ = inputs(m)
    seen = []
    m.blocks[m.cfg.encoder_depth - 1].register_forward_hook(lambda mod, i, o: seen.append(o))
    z = m(x, t, y, cls)[2]
    torch.testing.assert_close(z, m.projector(seen[0]))
    assert z.shape == (3, 1 + 16, 24)


# --- zero init ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(reg.METHODS))
def test_fresh_model_predicts_exactly_zero(method):
    m = tiny(method).eval()
    x, t, y, cls, _ = inputs(m)
    v, v_cls, _ = m(x, t, y, cls if m.cfg.entangled else None)
    assert torch.all(v == 0)
    assert (v_cls is None) == (not m.cfg.entangled)
    if m.cfg.entangled:
        assert torch.all(v_cls == 0)


# --- interpolant -------------------------------------------------------------------------------------------------------


def test_interpolant_endpoints_and_velocity():
    """x_t runs from the data (t = 0) to the noise (t = 1), and v is its derivative in t."""
    x, noise = torch.randn(2, 5, 3, dtype=torch.float64)
    t = torch.linspace(0.01, 0.99, 5, dtype=torch.float64)[:, None]  # (5, 1)
    assert torch.equal(reg.interpolant(x, noise, torch.zeros(5, 1))[0], x)
    assert torch.equal(reg.interpolant(x, noise, torch.ones(5, 1))[0], noise)
    h = 1e-6
    x_t, v = reg.interpolant(x, noise, t)
    slope = (reg.interpolant(x, noise, t + h)[0] - reg.interpolant(x, noise, t - h)[0]) / (2 * h)
    torch.testing.assert_close(v, slope, atol=1e-8, rtol=1e-8)


# --- joint loss --------------------------------------------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """Predicts the exact targets of the linear path from the clean data it was given; z_proj = 2 x the encoder tokens."""

    basis_fitted = True  # what reg_loss asks of a model

    def __init__(self, cfg, x, c, z):
        super().__init__()
        self.cfg, self.x, self.c, self.z = cfg, x, c, z

    def project_token(self, cls):
        return cls

    def forward(self, x_t, t, y, c_t):
        bt = t.view(-1, 1, 1, 1)
        return (x_t - self.x) / bt, (c_t - self.c) / t[:, None], 2 * self.z  # v = eps - x = (x_t - x) / t


def test_loss_is_zero_for_exact_predictions():
    m = tiny()
    x, _, y, _, feats = inputs(m)
    z = torch.cat([feats[0][:, None], feats[1]], 1)
    out = reg.reg_loss(Oracle(m.cfg, x, feats[0], z), x, y, feats, beta=0.03, lam=0.5)
    assert out["denoise"] < 1e-8 and out["denoise_cls"] < 1e-8
    torch.testing.assert_close(out["align"], torch.tensor(-1.0))
    torch.testing.assert_close(out["loss"], torch.tensor(-0.5), atol=1e-6, rtol=0)


def test_each_weight_scales_only_its_own_term():
    m = randomize(tiny()).train()
    x, _, y, _, feats = inputs(m)
    runs = {}
    for beta, lam in [(0.0, 0.0), (0.03, 0.5), (1.0, 2.0)]:
        torch.manual_seed(5)
        runs[beta, lam] = reg.reg_loss(m, x, y, feats, beta=beta, lam=lam)
    base = runs[0.0, 0.0]
    assert base["denoise_cls"] > 0 and base["align"] != 0
    for (beta, lam), out in runs.items():
        for k in ("denoise", "denoise_cls", "align"):
            assert torch.equal(out[k], base[k])
        torch.testing.assert_close(out["loss"], base["denoise"] + beta * base["denoise_cls"] + lam * base["align"])


def test_token_slot_is_aligned_with_the_class_token():
    m = randomize(tiny()).train()
    x, _, y, _, feats = inputs(m)
    torch.manual_seed(3)
    out = reg.reg_loss(m, x, y, feats)
    torch.manual_seed(3)  # replay the same draws by hand
    B = x.shape[0]
    t = torch.rand(B)
    eps, eps_c = torch.randn_like(x), torch.randn_like(feats[0])
    yy = torch.where(torch.rand(B) < 0.1, 5, y)
    x_t = (1 - t).view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1) * eps
    c_t = (1 - t)[:, None] * feats[0] + t[:, None] * eps_c
    v, v_c, z = m(x_t, t, yy, c_t)
    target = torch.cat([feats[0][:, None], feats[1]], 1)
    torch.testing.assert_close(out["align"], -F.cosine_similarity(z, target, dim=-1).mean())
    torch.testing.assert_close(out["denoise_cls"], ((v_c - (eps_c - feats[0])) ** 2).mean())
    torch.testing.assert_close(out["denoise"], ((v - (eps - x)) ** 2).mean())


@pytest.mark.parametrize(
    "beta,lam,head,flows",
    [
        (0.0, 0.5, "final_layer.linear_cls", False),
        (0.03, 0.5, "final_layer.linear_cls", True),
        (0.03, 0.0, "projector", False),
        (0.03, 0.5, "projector", True),
    ],
)
def test_a_zero_weight_cuts_the_gradient_of_its_head(beta, lam, head, flows):
    m = tiny().train()  # fresh: the heads start at zero
    x, _, y, _, feats = inputs(m)
    torch.manual_seed(0)
    reg.reg_loss(m, x, y, feats, beta=beta, lam=lam)["loss"].backward()
    grads = [p.grad for n, p in m.named_parameters() if n.startswith(head)]
    total = sum(0.0 if g is None else g.abs().sum().item() for g in grads)
    assert (total > 0) == flows


def train_one_step(model, ema, opt, x, y, feats):
    """One optimiser step as the training scripts write it: loss, backward, clip, step, EMA."""
    losses = reg.reg_loss(model, x, y, feats)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    reg.ema_update(ema, model)
    return dict(losses, grad_norm=grad_norm)


@pytest.mark.parametrize("method", list(reg.METHODS))
def test_every_method_trains_one_step(method):
    m = tiny(method).train()
    ema = copy.deepcopy(m).requires_grad_(False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, _, y, _, feats = inputs(m)
    out = train_one_step(m, ema, opt, x, y, None if method == "sit" else feats)
    assert torch.isfinite(out["loss"]) and out["grad_norm"] > 0
    assert (out["align"] != 0) == m.cfg.repa and (out["denoise_cls"] != 0) == m.cfg.entangled


def test_config_properties_decide_the_token_once():
    kinds = {
        name: (c.entangled, c.needs_encoder) for name, c in ((n, reg.SiTConfig(**reg.METHODS[n])) for n in reg.METHODS)
    }
    assert kinds == {
        "sit": (False, False),
        "repa": (False, True),
        "reg": (True, True),
        "reg-noalign": (True, True),
    }
    feats = (torch.randn(2, 4), torch.randn(2, 9, 4))
    assert reg.alignment_target(reg.SiTConfig(token_kind="none"), feats) is feats[1]
    z = reg.alignment_target(reg.SiTConfig(token_kind="cls"), feats)  # the token slot aligns with cls
    assert z.shape == (2, 10, 4) and torch.equal(z[:, 0], feats[0])
    with pytest.raises(ValueError, match="unknown token kind 'mean': use 'cls'"):
        reg.SiT(reg.SiTConfig(token_kind="mean"))


def test_ema_update_is_the_exponential_average():
    m = randomize(tiny())
    ema = copy.deepcopy(tiny()).requires_grad_(False)
    before = [p.clone() for p in ema.parameters()]
    reg.ema_update(ema, m, decay=0.9)
    for e, b, p in zip(ema.parameters(), before, m.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


# --- samplers on a Gaussian toy with a closed-form velocity field ------------------------------------------------------


class GaussianField:
    """Data x ~ N(mu_y, s^2) per coordinate and token c ~ N(-mu_y / 2, r^2): both depend on the label (the null label
    has mu = 0). On the linear path x_t = (1 - t) x + t eps, the exact velocity E[eps - x | x_t] is linear in x_t."""

    def __init__(self, mus, s=0.5, r=0.3):
        self.mus, self.s, self.r, self.calls = mus, s, r, []

    @staticmethod
    def velocity(z, t, mu, s):
        a, var = 1 - t, (1 - t) ** 2 * s**2 + t**2
        u = (z - a * mu) / var
        return t * u - (mu + a * s**2 * u)  # E[eps | z] - E[x | z]

    def __call__(self, x, t, y, cls):
        self.calls.append((t[0].item(), y.clone()))
        bt = t.view(-1, 1, 1, 1).double()
        mu = self.mus[y].view(-1, 1, 1, 1)
        v = self.velocity(x.double(), bt, mu, self.s)
        vc = self.velocity(cls.double(), t[:, None].double(), -self.mus[y][:, None] / 2, self.r)
        return v.float(), vc.float(), None


@pytest.mark.parametrize("mode,steps", [("euler", 200), ("sde", 250)])
def test_samplers_land_on_the_right_mean_and_std(mode, steps):
    torch.manual_seed(0)
    field = GaussianField(torch.tensor([2.0, -1.0, 0.0]))
    n = 4000
    y = torch.arange(n) % 2
    x, c = reg.sample(field, torch.randn(n, 1, 2, 2), y, torch.randn(n, 4), steps=steps, mode=mode, null_label=2)
    for label, mu in ((0, 2.0), (1, -1.0)):
        xs, cs = x[y == label], c[y == label]
        assert abs(xs.mean().item() - mu) < 0.03 and abs(xs.std().item() - 0.5) < 0.02
        assert abs(cs.mean().item() + mu / 2) < 0.03 and abs(cs.std().item() - 0.3) < 0.02


def guided(field, x, c, y, scales, guide, t=0.6):
    return reg.guided_velocity(field, x, c, torch.tensor(t), y, 2, *scales, guide, torch.float32)


def test_cfg_scale_one_equals_the_conditional_velocity():
    field = GaussianField(torch.tensor([2.0, -1.0, 0.0]))
    x, c, y = torch.randn(6, 1, 2, 2, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 2
    plain = guided(field, x, c, y, (1.0, 1.0), False)
    both = guided(field, x, c, y, (1.0, 1.0), True)
    for a, b in zip(plain, both):
        torch.testing.assert_close(a, b)


def test_cfg_combines_cond_and_uncond_with_separate_token_scale():
    field = GaussianField(torch.tensor([2.0, -1.0, 0.0]))
    x, c, y = torch.randn(6, 1, 2, 2, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 2
    cond = guided(field, x, c, y, (1.0, 1.0), False)
    uncond = guided(field, x, c, torch.full_like(y, 2), (1.0, 1.0), False)
    vx, vc = guided(field, x, c, y, (2.3, 1.5), True)
    torch.testing.assert_close(vx, uncond[0] + 2.3 * (cond[0] - uncond[0]))
    torch.testing.assert_close(vc, uncond[1] + 1.5 * (cond[1] - uncond[1]))
    vx0, vc0 = guided(field, x, c, y, (0.0, 0.0), True)
    torch.testing.assert_close(vc0, uncond[1])  # scale 0: the unconditional velocity, for the token too
    torch.testing.assert_close(vx0, uncond[0])
    vx1, vc1 = guided(field, x, c, y, (1.0, 4.0), True)  # token-only guidance
    torch.testing.assert_close(vx1, cond[0])
    torch.testing.assert_close(vc1, uncond[1] + 4.0 * (cond[1] - uncond[1]))


def test_score_from_velocity_is_the_gaussian_score():
    """Data N(mu, s^2): p_t = N((1 - t) mu, (1 - t)^2 s^2 + t^2) on the linear path, so the score is closed-form."""
    mu, s = 2.0, 0.5
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        tt = torch.tensor(t, dtype=torch.float64)
        var = (1 - tt) ** 2 * s**2 + tt**2
        u = (z - (1 - tt) * mu) / var  # minus the score
        clean = mu + (1 - tt) * s**2 * u  # E[x | z]
        v = tt * u - clean  # E[eps - x | z], eps = t u
        torch.testing.assert_close(reg.score_from_velocity(v, z, tt), -u)
        torch.testing.assert_close(reg.clean_estimate(v, z, tt), clean)


def test_trace_records_clean_estimates_that_end_at_the_sample():
    field = GaussianField(torch.tensor([2.0, -1.0, 0.0]))
    x0, c0, y = torch.randn(4, 1, 2, 2), torch.randn(4, 4), torch.arange(4) % 2
    trace = []
    x, _ = reg.sample(field, x0, y, c0, steps=50, mode="euler", null_label=2, trace=trace)
    assert [t for t, _ in trace] == pytest.approx(torch.linspace(1, 0, 51)[:-1].tolist())
    torch.testing.assert_close(trace[-1][1], x, atol=0.05, rtol=0)  # the last estimate is (nearly) the sample
    mu = torch.tensor([2.0, -1.0])[y].view(-1, 1, 1, 1)
    torch.testing.assert_close(trace[0][1], mu.expand_as(x0), atol=1e-5, rtol=0)  # at t = 1 the estimate is E[x] = mu


def test_cfg_scale_one_samples_like_the_unguided_sampler_and_token_only_guidance_acts():
    field = GaussianField(torch.tensor([2.0, -1.0, 0.0]))
    x0, c0, y = torch.randn(8, 1, 2, 2), torch.randn(8, 4), torch.arange(8) % 2
    torch.manual_seed(1)
    a = reg.sample(field, x0, y, c0, steps=20, mode="sde", null_label=2)
    torch.manual_seed(1)
    b = reg.sample(field, x0, y, c0, steps=20, mode="sde", cfg_scale=1.0, interval=(0, 0.85), null_label=2)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    torch.manual_seed(1)
    c = reg.sample(field, x0, y, c0, steps=20, mode="sde", cfg_scale=1.0, cls_cfg_scale=4.0, null_label=2)
    assert not torch.allclose(c[1], a[1])  # the token's own scale guides it, the image scale being 1


@pytest.mark.parametrize("mode", ["sde", "euler"])
def test_unconditional_pass_only_inside_the_guidance_interval(mode):
    field = GaussianField(torch.tensor([2.0, -1.0, 0.0]))
    y = torch.arange(4) % 2
    reg.sample(
        field,
        torch.randn(4, 1, 2, 2),
        y,
        torch.randn(4, 4),
        steps=25,
        mode=mode,
        cfg_scale=2.0,
        interval=(0.2, 0.5),
        null_label=2,
    )
    for t, labels in field.calls:
        has_null = bool((labels == 2).any())
        assert labels.numel() == (8 if has_null else 4)
        if not 0.2 <= t <= 0.5:
            assert not has_null, f"unconditional pass at t={t}"
    assert any((labels == 2).any() for _, labels in field.calls)


def test_sde_last_step_is_deterministic():
    field = GaussianField(torch.tensor([2.0, -1.0, 0.0]))
    x0, c0, y = torch.randn(4, 1, 2, 2), torch.randn(4, 4), torch.arange(4) % 2
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(reg.sample(field, x0, y, c0, steps=1, mode="sde", null_label=2))  # grid [1, 0]: the last step only
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    torch.manual_seed(0)
    two = reg.sample(field, x0, y, c0, steps=2, mode="sde", null_label=2)
    torch.manual_seed(1)
    assert not torch.equal(two[0], reg.sample(field, x0, y, c0, steps=2, mode="sde", null_label=2)[0])


def test_sde_grid():
    field = GaussianField(torch.tensor([2.0, -1.0, 0.0]))
    y = torch.zeros(3, dtype=torch.long)
    torch.manual_seed(0)
    reg.sample(field, torch.zeros(3, 1, 2, 2), y, torch.zeros(3, 4), steps=5, mode="sde", null_label=2)
    ts = [t for t, _ in field.calls]
    assert ts == pytest.approx([1.0, 0.76, 0.52, 0.28, 0.04])  # linspace(1, 0.04, N), then a step to 0
    assert len(ts) == 5


def test_sampler_returns_none_token_for_models_without_one():
    m = tiny("repa").eval()
    x, c = reg.sample(
        m, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), steps=3, mode="euler", cfg_scale=2.0, null_label=5
    )
    assert c is None and x.shape == (2, 3, 8, 8)


def test_reg_memorises_two_images_and_generates_each_with_its_own_token():
    """End to end: train REG on two images (each with fixed encoder features) until it memorises them; every sampler
    must then draw the image of the requested label and, jointly, that image's class token."""
    m = tiny()
    torch.manual_seed(0)
    x, cls, patches = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 24), torch.randn(2, 16, 24)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    idx = torch.arange(16) % 2
    for _ in range(250):
        loss = reg.reg_loss(m, x[idx], idx, (cls[idx], patches[idx]), label_dropout=0.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    labels = torch.arange(8) % 2
    for mode in ("euler", "sde"):
        torch.manual_seed(1)
        img, tok = reg.sample(m, torch.randn(8, 3, 8, 8), labels, torch.randn(8, 24), steps=50, mode=mode, null_label=5)
        err = ((img[:, None] - x[None]) ** 2).mean((2, 3, 4))  # (8 samples, 2 training images)
        assert torch.equal(err.argmin(1), labels) and err.min(1).values.max() < 0.05, mode
        assert F.cosine_similarity(tok, cls[labels]).min() > 0.9, mode  # the token generated with its image


# --- frozen encoder ----------------------------------------------------------------------------------------------------


def test_vit_encoder_drops_prefix_and_register_tokens_on_the_sit_grid():
    torch.manual_seed(0)
    enc = reg.load_encoder("vit_small_patch14_reg4_dinov2.lvd142m", grid=2, weights="random")
    assert enc.size == 28 and enc.net.num_prefix_tokens == 5
    img = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    cls, patches = enc(img)
    assert cls.shape == (2, 384) and patches.shape == (2, 4, 384)
    x = (img.float() / 255 - enc.mean) / enc.std
    full = enc.net.forward_features(x)  # (B, 1 + 4 registers + 4, E), after norm
    torch.testing.assert_close(cls, full[:, 0])
    torch.testing.assert_close(patches, full[:, 5:])


def test_cnn_encoder_gives_pooled_vector_and_map_on_the_grid():
    enc = reg.load_encoder("tf_efficientnet_lite0", grid=3, weights="random")
    cls, patches = enc(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert cls.shape == (2, 1280) and patches.shape == (2, 9, 1280)


def test_encoder_loads_a_local_weights_file(tmp_path):
    import timm

    src = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    path = str(tmp_path / "w.pth")
    torch.save(src.state_dict(), path)
    enc = reg.load_encoder("dinov2-s", grid=2, weights=path)
    assert torch.equal(enc.net.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)


def test_unreachable_hub_says_what_to_download(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(RuntimeError, match=r"(?s)huggingface\.co/timm/vit_base_patch14_dinov2.*--encoder-weights"):
        reg.load_encoder("dinov2-b", grid=16)


def test_a_hub_whose_name_does_not_resolve_is_refused_before_timm_retries(monkeypatch):
    """Offline without HF_HUB_OFFLINE, timm would retry its download for about a minute: load_encoder asks the name
    server first and refuses at once (timm is never called), unless the weights are in the Hugging Face cache."""
    import huggingface_hub
    import timm

    def no_name_server(*args):
        raise socket.gaierror(-2, "Name or service not known")

    def no_download(*args, **kwargs):
        raise AssertionError("timm was asked to download")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_name_server)
    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(RuntimeError, match=r"(?s)huggingface\.co/timm/vit_small_patch14_dinov2.*--encoder-weights"):
        reg.load_encoder("dinov2-s", grid=2)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    with pytest.raises(RuntimeError, match="AssertionError: timm was asked to download"):  # cached: timm loads it
        reg.load_encoder("dinov2-s", grid=2)


# --- bad input ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors_that_name_the_problem():
    m = tiny()
    x, t, y, cls, feats = inputs(m)
    with pytest.raises(ValueError, match="the model takes"):
        reg.sample(m, torch.randn(3, 3, 16, 16), y, cls)  # wrong size
    with pytest.raises(ValueError, match="the model takes"):
        reg.reg_loss(m, torch.randn(3, 4, 8, 8), y, feats)  # wrong channels
    with pytest.raises(ValueError, match="the REG token must be"):
        reg.sample(m, x, y, torch.randn(3, 7))  # token of the wrong width
    with pytest.raises(ValueError, match="unknown preset"):
        reg.make_model("SiT-M/2")
    with pytest.raises(ValueError, match="unknown method"):
        reg.make_model("SiT-B/2", "rep")
    with pytest.raises(ValueError, match="the SiT grid needs.*set the grid"):
        reg.reg_loss(m, x, y, (feats[0], feats[1][:, :9]))  # a 3x3 encoder grid for a 4x4 SiT grid
    with pytest.raises(ValueError, match="needs the frozen encoder"):
        reg.reg_loss(m, x, y, None)
    with pytest.raises(ValueError, match="unknown encoder"):
        reg.load_encoder("dinov3-b", grid=4, weights="random")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        reg.make_model("SiT-B/4", input_size=30)
    with pytest.raises(ValueError, match="sampler mode"):
        reg.sample(m, x, y, cls, steps=0)


# --- checkpoints -------------------------------------------------------------------------------------------------------


def official_state_dict(model):
    """Our state dict under the release's names."""
    back = {v: k for k, v in reg.OFFICIAL_NAMES.items()}
    out = {}
    for k, v in model.state_dict().items():
        for new, old in back.items():
            if k.startswith(new):
                k = old + k[len(new) :]
        out[k] = v.clone()
    return out


def test_official_layout_matches_the_release_key_list():
    keys = json.load(open(OFFICIAL_KEYS))
    with torch.device("meta"):
        m = reg.make_model("SiT-XL/2", "reg")
    ours = {k: list(v.shape) for k, v in official_state_dict(m).items()}
    assert ours == keys


def test_release_sized_random_state_dict_loads_strictly():
    keys = json.load(open(OFFICIAL_KEYS))
    torch.manual_seed(0)
    sd = {k: torch.randn(shape) * 0.01 for k, shape in keys.items()}
    cfg = reg.config_from_state_dict(sd)
    assert (
        cfg.depth,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.patch_size,
        cfg.input_size,
        cfg.encoder_dim,
        cfg.num_classes,
        cfg.token_kind,
        cfg.repa,
    ) == (28, 1152, 16, 2, 32, 768, 1000, "cls", True)
    with torch.device("meta"):  # skip 677M random inits
        m = reg.SiT(cfg)
    m = reg.load_weights(m, sd)
    assert torch.equal(m.token_embedder.weight, sd["cls_projectors2.weight"])
    assert torch.equal(m.projector[4].bias, sd["projectors.0.4.bias"])
    assert not any(p.is_meta for p in m.state_dict().values()) and not m.pos_embed.requires_grad


def test_official_checkpoint_file_round_trip_gives_the_same_outputs(tmp_path):
    src = randomize(tiny()).eval()
    path = str(tmp_path / "release.pt")
    sd = official_state_dict(src)
    torch.save(dict(model=sd, ema=sd, opt={}, args=argparse.Namespace(model="SiT-XL/2", cls=0.03), steps=7), path)
    ckpt = reg.load_checkpoint(path)  # weights_only, Namespace allowed as data
    assert ckpt["args"].cls == 0.03
    cfg = reg.config_from_state_dict(ckpt["ema"])
    cfg.encoder_depth = src.cfg.encoder_depth  # not readable off the weights
    dst = reg.load_weights(reg.SiT(cfg), ckpt["ema"]).eval()
    x, t, y, cls, _ = inputs(src)
    for a, b in zip(src(x, t, y, cls)[:2], dst(x, t, y, cls)[:2]):
        assert torch.equal(a, b)


def test_wrong_shapes_give_an_error_in_words():
    sd = official_state_dict(tiny())
    sd["final_layer.linear_cls.weight"] = torch.zeros(32, 128)
    del sd["wg_norm.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        reg.load_weights(tiny(), sd)
    msg = str(e.value)
    assert "missing keys (1): token_norm.bias" in msg and "unexpected keys (1): extra.weight" in msg
    assert "final_layer.linear_cls.weight: checkpoint (32, 128) vs model (24, 128)" in msg
    assert "load_model" in msg


def test_checkpoint_files_are_atomic_and_pruned_and_corruption_is_reported(tmp_path):
    m = tiny()
    ema = copy.deepcopy(m)
    opt = torch.optim.AdamW(m.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(1, 6):
        reg.save_training_state(str(tmp_path), step, m, ema, opt, scaler, dict(step=step), keep=2)
    assert [os.path.basename(p) for p in reg.checkpoints(str(tmp_path))] == ["0000004.pt", "0000005.pt"]
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))

    def full_disk(state, path):
        open(path, "wb").write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        with pytest.raises(ValueError, match="No space left on device.*free disk space"):
            reg.save_training_state(str(tmp_path), 6, m, ema, opt, scaler, dict(step=6), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["0000004.pt", "0000005.pt"]  # nothing lost, no .tmp left
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        reg.load_checkpoint(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        reg.load_checkpoint(str(tmp_path / "missing.pt"))


def test_run_resume_restores_weights_optimizer_and_rng(tmp_path):
    m = randomize(tiny()).train()
    ema = copy.deepcopy(m).requires_grad_(False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, _, y, _, feats = inputs(m)
    train_one_step(m, ema, opt, x, y, feats)
    reg.save_training_state(str(tmp_path), 1, m, ema, opt, None, dict(steps=2))  # no GradScaler
    expect = train_one_step(m, ema, opt, x, y, feats)["loss"]
    m2, ema2 = randomize(tiny()), tiny()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    state = reg.resume(str(tmp_path), dict(steps=2), (), m2, ema2, opt2, None)
    assert state["step"] == 1 and state["config"] == reg.asdict(m2.cfg)
    assert torch.equal(train_one_step(m2, ema2, opt2, x, y, feats)["loss"], expect)


@pytest.mark.parametrize("method", ["sit", "reg"])
def test_flop_count_matches_torch_flop_counter(method):
    from torch.utils.flop_counter import FlopCounterMode

    model = reg.make_model("SiT-Ti/2", method, input_size=16, in_channels=3, num_classes=10, encoder_dim=96)
    x, t, y, c = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1]), torch.randn(2, 96)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y, c if model.cfg.entangled else None)
    attention = (
        model.cfg.depth * 4 * (64 + int(model.cfg.entangled)) ** 2 * 128
    )  # QK^T and AV: CPU SDPA is not counted by torch
    assert reg.model_flops(model.cfg) - attention == pytest.approx(counter.get_total_flops() / 2, rel=1e-3)


def test_frechet_distance_closed_form():
    d, mu = 6, torch.arange(6, dtype=torch.float64) / 3
    a = (torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    b = (mu, 4 * torch.eye(d, dtype=torch.float64))
    assert reg.frechet_distance(a, b) == pytest.approx(float(mu.pow(2).sum()) + d * (1 + 4 - 2 * 2))
    torch.manual_seed(0)
    f = torch.randn(5000, 3, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0], [0, 1, 0.2], [0, 0, 2]], dtype=torch.float64
    )
    stats = (f.mean(0), torch.cov(f.T))
    assert reg.frechet_distance(stats, stats) == pytest.approx(0, abs=1e-8)


# --- encoder: the release's position-embedding resampling ---------------------------------------------------------------


def test_encoder_position_embedding_equals_the_releases_resampling():
    """The release loads DINOv2 from the hub and resamples its position embedding once to the 16x16 grid with timm's
    resample_abs_pos_embed (its utils.py); our encoder's set_input_size must give exactly that tensor."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    encoder = reg.load_encoder("dinov2-b", grid=16, weights="random")
    torch.manual_seed(0)
    import timm

    hub_like = timm.create_model(reg.ENCODERS["dinov2-b"], pretrained=False, num_classes=0)  # 37 x 37 positions
    release = resample_abs_pos_embed(hub_like.pos_embed.detach(), [16, 16])  # (1, 1 + 256, 768)
    assert encoder.size == 224 and release.shape == (1, 257, 768)
    assert torch.equal(encoder.net.pos_embed.detach(), release)


# --- teaching diagnostics -----------------------------------------------------------------------------------------------


def test_loss_per_t_bin_of_a_fresh_model_is_the_closed_form():
    """A fresh model predicts v = 0, so on the linear path every bin's loss is mean((eps - x)^2) for the fixed noise."""
    m = tiny().eval()
    x, _, y, _, feats = inputs(m, B=4)
    out = reg.loss_per_t_bin(m, x, y, feats, bins=5, seed=3)
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(x.shape, generator=g)
    eps_cls = torch.randn(feats[0].shape, generator=g)
    assert out["t"] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    assert out["denoise"] == pytest.approx([(eps - x).pow(2).mean().item()] * 5, rel=1e-6)
    assert out["denoise_cls"] == pytest.approx([(eps_cls - feats[0]).pow(2).mean().item()] * 5, rel=1e-6)
    assert reg.loss_per_t_bin(m, x, y, feats, bins=5, seed=3) == out  # fixed noise: the same numbers every call


def test_loss_per_t_bin_is_zero_for_exact_predictions_and_keeps_the_mode():
    m = tiny()
    x, _, y, _, feats = inputs(m)
    z = torch.cat([feats[0][:, None], feats[1]], 1)
    oracle = Oracle(m.cfg, x, feats[0], z).train()
    out = reg.loss_per_t_bin(oracle, x, y, feats, bins=4)
    assert max(out["denoise"]) < 1e-8 and max(out["denoise_cls"]) < 1e-8
    assert oracle.training  # put back in training mode


def test_strip_frames_run_from_pure_noise_estimate_to_the_sample():
    trace = [(1 - i / 9, torch.full((2, 1, 2, 2), float(i))) for i in range(10)]
    frames, times = reg.strip_frames(trace, frames=4)
    assert frames.shape == (2, 4, 1, 2, 2) and times == [1.0, 1 - 3 / 9, 1 - 6 / 9, 0.0]
    assert frames[0, :, 0, 0, 0].tolist() == [0.0, 3.0, 6.0, 9.0]


def test_diagnostic_plots_are_written(tmp_path):
    log = tmp_path / "log.jsonl"
    steps = [dict(step=s, loss=1.0 / s, denoise=1.0, denoise_cls=0.5, align=-0.5) for s in (1, 2, 3)]
    evaluation = dict(step=3, fd=10.0, bin_t=[0.25, 0.75], bin_denoise=[1.0, 2.0], bin_denoise_cls=[0.1, 0.2])
    records = [*steps, evaluation]  # as train_cifar.py logs them: the t bins in the evaluations' records
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')  # a torn last line
    assert len(reg.read_log(str(log))) == 4
    panels = dict(loss="the loss", bin_denoise="the loss per t bin", x="absent: no panel")
    png = reg.plot_log(str(log), str(tmp_path / "plot.png"), panels)
    assert os.path.getsize(png) > 1000
    assert reg.plot_log(str(log), str(tmp_path / "none.png"), dict(absent="no panel")) is None


# --- training kit (Part B) ------------------------------------------------------------------------------------------------


def test_resume_may_change_the_learning_rate_but_not_the_experiment(tmp_path):
    m = randomize(tiny()).train()
    ema = copy.deepcopy(m).requires_grad_(False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    folder = str(tmp_path)
    reg.log(folder, step=1, loss=1.0)
    reg.save_training_state(folder, 1, m, ema, opt, scaler, dict(lr=1e-3, seed=0, steps=3))
    reg.log(folder, step=2, loss=0.5)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo\n')  # a kill in mid-write
    reg.log(folder, step=3, loss=0.4)
    opt2 = torch.optim.AdamW(m.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="seed: checkpoint 0, now 1"):
        reg.resume(folder, dict(lr=1e-3, seed=1, steps=3), ("seed",), m, ema, opt2, scaler)
    with pytest.raises(ValueError, match="past --steps 0"):
        reg.resume(folder, dict(lr=1e-3, seed=0, steps=0), ("seed",), m, ema, opt2, scaler)
    state = reg.resume(folder, dict(lr=3e-4, seed=0, steps=3), ("seed",), m, ema, opt2, scaler)
    assert state["step"] == 1 and opt2.param_groups[0]["lr"] == 3e-4
    reg.log(folder, step=2, loss=0.45)  # the redone step
    records = reg.read_log(str(tmp_path / "log.jsonl"))  # the log is append-only; the reader drops the redone steps
    assert [r["step"] for r in records] == [1, 1, 2] and records[1]["changed"] == {"lr": [1e-3, 3e-4]}
    assert records[2]["loss"] == 0.45


def test_one_process_per_run_folder(tmp_path):
    with reg.lock_folder(str(tmp_path)):
        probe = subprocess.run(
            [sys.executable, "-c", f"import reg; reg.lock_folder({str(tmp_path)!r})"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    assert probe.returncode != 0 and "another process is writing to" in probe.stderr
    with reg.lock_folder(str(tmp_path)):  # the end of the block freed it
        pass


def test_graceful_stop_turns_sigterm_and_ctrl_c_into_a_request():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with reg.GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before
    with reg.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(SystemExit, match="stopped at once"):  # a second Ctrl-C aborts at once, in words
            os.kill(os.getpid(), signal.SIGINT)


def test_check_finite_names_the_last_checkpoint_and_the_fix(tmp_path):
    reg.check_finite(dict(loss=1.0, note="text"), 5, str(tmp_path))
    reg.save_checkpoint(str(tmp_path / "0000004.pt"), {})
    with pytest.raises(RuntimeError, match=r"at step 5.*0000004\.pt run again with a lower --lr"):
        reg.check_finite(dict(loss=float("nan")), 5, str(tmp_path))


def test_fingerprint_follows_content_not_names():
    x = torch.arange(6, dtype=torch.uint8)
    assert reg.fingerprint(x, 16) == reg.fingerprint(x.clone(), 16) != reg.fingerprint(x.flip(0), 16)
    half = torch.ones(3, dtype=torch.bfloat16)
    assert reg.fingerprint(half) != reg.fingerprint(half.float())  # bf16 hashed by its own bytes


def test_speed_figures_of_a_log_record():
    record = reg.speed(images=64, seconds=2.0, flops_per_image=1e9, device=torch.device("cpu"))
    assert record["img_per_s"] == 32.0 and record["peak_mem_gib"] > 0 and "mfu" not in record  # no peak on a CPU


def test_guiding_the_velocity_equals_guiding_the_sde_drift():
    """The release mixes SDE drifts d = v - t score(v); the drift is affine in v for a fixed x_t, so mixing the
    velocities first (our guided_velocity) gives the same drift up to float rounding."""
    field = GaussianField(torch.tensor([2.0, -1.0, 0.0]))
    x, c, y = torch.randn(6, 1, 2, 2, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 2
    t = torch.tensor(0.6, dtype=torch.float64)
    cond = guided(field, x, c, y, (1.0, 1.0), False)
    uncond = guided(field, x, c, torch.full_like(y, 2), (1.0, 1.0), False)
    mixed = guided(field, x, c, y, (2.3, 1.7), True)
    for k, (state, scale) in enumerate(((x, 2.3), (c, 1.7))):
        drift_cond = cond[k] - 0.6 * reg.score_from_velocity(cond[k], state, t)
        drift_uncond = uncond[k] - 0.6 * reg.score_from_velocity(uncond[k], state, t)
        drift_of_mix = mixed[k] - 0.6 * reg.score_from_velocity(mixed[k], state, t)
        torch.testing.assert_close(drift_of_mix, drift_uncond + scale * (drift_cond - drift_uncond), rtol=0, atol=1e-12)


def test_checkpoints_of_an_older_reg_py_still_load_and_resume(tmp_path):
    """Files of an older reg.py lack token_dim (0); a field this reg.py does not know is refused."""
    m = randomize(tiny()).train()
    ema = copy.deepcopy(m).requires_grad_(False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    old = reg.asdict(m.cfg)
    del old["token_dim"]  # added later: absent means 0
    assert reg.config_from_dict(old) == m.cfg
    with pytest.raises(ValueError, match=r"unknown fields \['future_field'\]"):
        reg.config_from_dict(dict(old, future_field=1))
    no_heads = dict(old)
    del no_heads["num_heads"]
    with pytest.raises(ValueError, match=r"lacking \[.num_heads.\]"):  # never a guessed head count
        reg.config_from_dict(no_heads)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    reg.save_checkpoint(
        str(tmp_path / "0000001.pt"),
        dict(
            model=m.state_dict(),
            ema=ema.state_dict(),
            opt=opt.state_dict(),
            scaler=scaler.state_dict(),
            step=1,
            config=old,
            args=dict(steps=1),
            rng=dict(torch=torch.get_rng_state(), python=random.getstate()),
        ),
    )
    state = reg.resume(str(tmp_path), dict(steps=1), (), m, ema, torch.optim.AdamW(m.parameters()), scaler)
    assert state["step"] == 1


# --- a library a copier trusts -------------------------------------------------------------------------------------


def test_copy_reg_py_round_trip(tmp_path):
    """The README's 'copy reg.py' paragraph: build, train a step with reg_loss and ema_update, sample with no null
    label to pass, save and load with the config inside (the same model back)."""
    model = reg.make_model("SiT-Ti/4", "reg", input_size=16, in_channels=3, num_classes=10, encoder_dim=64)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    feats = (torch.randn(4, 64), torch.randn(4, 16, 64))  # an own encoder: class token, row-major patch tokens
    loss = reg.reg_loss(model, images, labels, feats)["loss"]
    loss.backward()
    opt.step()
    reg.ema_update(ema, model)
    noise, token_noise = torch.randn(4, 3, 16, 16), torch.randn(4, 64)
    samples, tokens = reg.sample(ema, noise, labels, token_noise, steps=4, mode="euler", cfg_scale=2.0)
    assert samples.shape == (4, 3, 16, 16) and tokens.shape == (4, 64)
    back = reg.load_model(reg.save_model(str(tmp_path / "ema.pt"), ema))
    again, _ = reg.sample(back, noise, labels, token_noise, steps=4, mode="euler", cfg_scale=2.0)
    assert back.cfg == ema.cfg and torch.equal(again, samples)


def test_the_readmes_copy_paragraph_runs(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    code = readme.split("## Copy `reg.py`")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)
    assert scope["samples"].shape == (4, 3, 16, 16) and scope["tokens"].shape == (4, 64)
    assert scope["ema"].cfg == scope["model"].cfg and len(list(tmp_path.glob("ema.*"))) == 1  # saved


def test_sampler_derives_the_null_label():
    m = tiny()
    x, _, _, cls, _ = inputs(m, B=2)
    seen = []
    m.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    reg.sample(m, x, torch.tensor([0, 1]), cls, steps=1, mode="euler", cfg_scale=2.0)  # 5 classes: null label 5
    assert seen[-1].tolist() == [0, 1, 5, 5]
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.4 \(5 = the null label"):
        reg.sample(m, x, torch.tensor([0, 6]), cls, steps=1, mode="euler")


def test_sampler_keeps_t_in_float32_under_bf16_inputs():
    times = []

    def field(x, t, y, cls):
        times.append(t)
        return torch.zeros_like(x), None

    reg.sample(field, torch.randn(2, 1, 2, 2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long), steps=250)
    assert times[1].dtype == torch.float32 and times[1][0].item() == pytest.approx(1 - 0.96 / 249, abs=1e-7)


def test_validation_loss_on_an_eval_model_and_noalign_needs_only_the_class_token():
    m = randomize(tiny()).eval()
    x, _, y, _, feats = inputs(m)
    with torch.no_grad():
        out = reg.reg_loss(m, x, y, feats)
    assert out["align"] == 0 and out["denoise"] > 0  # no REPA projection outside training
    noalign = tiny("reg-noalign")
    assert reg.reg_loss(noalign, x, y, (feats[0], None))["denoise_cls"] > 0
    with pytest.raises(ValueError, match=r"not \(cls, None\)"):
        reg.reg_loss(m.train(), x, y, (feats[0], None))


def test_more_bad_inputs_fail_at_the_call_with_the_fix():
    m = tiny()
    x, t, y, cls, feats = inputs(m)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.4"):
        reg.reg_loss(m, x, torch.tensor([0, 1, 9]), feats)
    with pytest.raises(ValueError, match="the REG token must be"):
        reg.sample(m, x, y, cls[:2])  # a token of another batch size
    with pytest.raises(ValueError, match="num_heads 3 does not divide hidden_size 128"):
        reg.make_model("SiT-Ti/2", num_heads=3)
    with pytest.raises(TypeError, match="expected a state dict"):
        reg.load_weights(m, torch.zeros(3))
    with pytest.raises(ValueError, match="no x_embedder"):
        reg.config_from_state_dict({})
    whole = dict(ema=m.state_dict(), args=dict(lr=1e-4))
    for call in (reg.config_from_state_dict, lambda sd: reg.load_weights(m, sd)):
        with pytest.raises(ValueError, match=r"whole checkpoint.*pass its \['ema'\]"):
            call(whole)


def test_a_head_count_is_never_guessed():
    settings = dict(input_size=8, in_channels=3, depth=2, hidden_size=96, num_heads=3, num_classes=4, encoder_dim=32)
    model = reg.SiT(reg.SiTConfig(**settings, patch_size=2, encoder_depth=1, projector_dim=16))
    with pytest.raises(ValueError, match=r"head count is not stored.*num_heads"):
        reg.config_from_state_dict(model.state_dict())


def test_encoder_takes_uint8_images_only_stays_frozen_and_takes_its_input_size():
    """uint8, as read from files: a float image's range ([-1, 1], [0, 1] or 0..255) would be a guess."""
    enc = reg.load_encoder("tf_efficientnet_lite0", grid=2, weights="random", size=32)
    assert enc.size == 32
    with pytest.raises(ValueError, match=r"uint8 \(B, 3, H, W\), got torch.float32.*\.round\(\)\.to\(torch.uint8\)"):
        enc(torch.rand(2, 3, 16, 16) * 2 - 1)
    torch.nn.Sequential(enc).train()  # a parent module asks for training mode
    assert not enc.training and not any(m.training for m in enc.modules())  # BatchNorm statistics stay fixed


def test_encoder_weights_that_do_not_fit_are_an_error(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save(dict(weight=torch.zeros(3)), path)
    with pytest.raises(RuntimeError, match="Name that model as the encoder, or get vit_small_patch14_dinov2"):
        reg.load_encoder("dinov2-s", grid=2, weights=path)


def test_unwrap_sees_through_ddp_of_a_compiled_model():
    m = tiny()

    class DDPLike(torch.nn.Module):  # DDP keeps the wrapped module as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert reg.unwrap(DDPLike(torch.compile(m))) is m


# --- a token that fits --------------------------------------------------------------------------------------------


def test_a_token_wider_than_the_model_warns_once_in_words():
    with pytest.warns(UserWarning, match=r"REG token 1280 wide, model 128.*token_dim <= 128"):
        reg.make_model("SiT-Ti/4", "reg", input_size=16, in_channels=3, encoder_dim=1280)


def test_token_basis_is_orthonormal_ordered_by_variance_and_stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    tokens = torch.randn(500, 6, generator=g) * scales @ torch.linalg.qr(torch.randn(6, 6, generator=g))[0] + 3
    model = tiny("reg", encoder_dim=6, token_dim=3)
    model.set_token_basis(tokens)
    basis = model.token_basis
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)
    projected = model.project_token(tokens)  # (N, 3)
    variances = projected.var(0)
    assert variances[0] > variances[1] > variances[2] and variances[0] == pytest.approx(25, rel=0.15)
    torch.testing.assert_close(projected.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    assert model.final_layer.linear_cls.out_features == 3 and model.token_embedder.in_features == 3
    back = reg.load_model(reg.save_model(str(tmp_path / "m.pt"), model))
    assert back.cfg.token_dim == 3 and torch.equal(back.token_basis, basis)
    assert reg.config_from_state_dict(model.state_dict()).token_dim == 3  # read off the weights too


def test_token_projection_stays_fp32_under_a_bf16_autocast():
    """Under autocast the matmul would run in bf16 (about 3 significant digits); the projection opts out."""
    g = torch.Generator().manual_seed(0)
    model = tiny("reg", encoder_dim=24, token_dim=4)
    model.set_token_basis(torch.randn(50, 24, generator=g))
    cls = torch.randn(8, 24, generator=g)
    plain = model.project_token(cls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.project_token(cls)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, plain)


def test_pick_device_names_the_fix():
    with pytest.raises(RuntimeError, match="Expected one of cpu, cuda.*: banana"):
        reg.pick_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU.*--device cpu"):
            reg.pick_device("cuda")
    assert reg.pick_device("cpu").type == "cpu"


DEVICE = os.environ.get("REG_TEST_DEVICE", "cpu")  # pytest --device cuda


def syncs_while_sampling(m, x, y, cls, steps):
    """The host-device syncs CUDA's sync debug mode reports during one sample() call (0 on the CPU)."""
    if DEVICE.startswith("cuda"):
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = reg.sample(m, x, y, cls, steps=steps, mode="sde", cfg_scale=2.0)
    finally:
        if DEVICE.startswith("cuda"):
            torch.cuda.set_sync_debug_mode(0)
    assert out.device.type == torch.device(DEVICE).type and torch.isfinite(out).all()
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="counts CUDA syncs: pytest --device cuda")
def test_sampling_never_waits_for_the_device_inside_its_loop():
    """pytest --device cuda: the syncs of a 3-step and a 9-step run are the same (the label check and the time grid's
    copy happen once, before the loop)."""
    m = randomize(tiny()).to(DEVICE).eval()
    x, _, y, cls, _ = inputs(m)
    x, y, cls = x.to(DEVICE), y.to(DEVICE), cls.to(DEVICE)
    assert syncs_while_sampling(m, x, y, cls, 3) == syncs_while_sampling(m, x, y, cls, 9)


# --- the API refuses in its own words: one test per kind of wrong argument ---------------------------------------------


def test_labels_of_another_shape_dtype_or_batch_are_refused():
    m = tiny().train()
    x, _, y, cls, feats = inputs(m, B=2)
    for labels in (y[:, None], y.float(), y.tolist(), torch.tensor([0, 1, 2]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match=r"labels y must be an integer tensor \(B,\) = \(2,\).*torch.tensor"):
            reg.reg_loss(m, x, labels, feats)
        with pytest.raises(TypeError, match="labels y must be an integer tensor"):
            reg.sample(m, x, labels, cls, steps=1)


def test_inputs_of_another_dtype_are_refused_with_the_fix():
    m = tiny().train()
    x, _, y, cls, feats = inputs(m)
    with pytest.raises(TypeError, match=r"x is torch.float16, the model torch.float32: pass x.to\(torch.float32\)"):
        reg.reg_loss(m, x.half(), y, feats)  # float16 on a CPU
    with pytest.raises(TypeError, match="x is torch.float64"):
        reg.sample(m, x.double(), y, cls, steps=1)
    with pytest.raises(ValueError, match="the model takes x"):
        reg.reg_loss(m, x.tolist(), y, feats)


def test_a_token_given_to_a_model_without_one_or_missing_is_refused():
    x, _, y, cls, _ = inputs(tiny())
    with pytest.raises(ValueError, match=r"a token \(3, 24\) for a model without one \('none'\): pass cls=None"):
        reg.sample(tiny("repa"), x, y, cls, steps=1)
    with pytest.raises(ValueError, match="the REG token must be .* got NoneType"):
        reg.sample(tiny(), x, y, None, steps=1)


@pytest.mark.parametrize("scale", [math.nan, math.inf, "2", torch.tensor(2.0), True])
def test_guidance_scales_and_loss_weights_must_be_finite_numbers(scale):
    m = tiny()
    x, _, y, cls, feats = inputs(m)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        reg.sample(m, x, y, cls, steps=1, cfg_scale=scale)
    with pytest.raises(ValueError, match="cls_cfg_scale must be a finite number"):
        reg.sample(m, x, y, cls, steps=1, cls_cfg_scale=scale)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        reg.reg_loss(m.train(), x, y, feats, beta=scale)
    with pytest.raises(ValueError, match="interval's low end must be a finite number from 0 to 0.2"):
        reg.sample(m, x, y, cls, steps=1, interval=(0.5, 0.2))  # reversed: guidance nowhere


def test_a_token_dim_model_never_given_its_basis_is_refused_until_it_has_one(tmp_path):
    m = tiny("reg", token_dim=3).train()
    x, _, y, _, feats = inputs(m)
    with pytest.raises(ValueError, match=r"token_dim without a basis: .* model.set_token_basis"):
        reg.reg_loss(m, x, y, feats)
    fitted = copy.deepcopy(m)
    fitted.set_token_basis(torch.randn(10, 24))
    assert reg.reg_loss(fitted, x, y, feats)["denoise_cls"] > 0
    m.load_state_dict(fitted.state_dict())  # loaded weights bring their basis
    assert reg.reg_loss(m, x, y, feats)["loss"].isfinite()
    assert reg.load_model(reg.save_model(tmp_path / "m.pt", fitted)).train().basis_fitted


def test_a_basis_without_variance_or_for_another_model_is_refused():
    m = tiny("reg", token_dim=3)
    with pytest.raises(ValueError, match=r"N > k = 3, got \(3, 24\): more images, or a smaller token_dim"):
        m.set_token_basis(torch.randn(3, 24))  # 3 tokens: 2 directions with variance
    with pytest.raises(ValueError, match="N > k = 3"):
        m.set_token_basis(torch.randn(1, 24))  # one image: a NaN covariance
    with pytest.raises(RuntimeError):  # torch's words: the eigensolver on NaN, a copy of another size
        m.set_token_basis(torch.full((10, 24), math.nan))
    with pytest.raises(RuntimeError, match="must match the size"):
        m.set_token_basis(torch.randn(10, 7))
    with pytest.raises(ValueError, match="no token basis: build it with token_dim"):
        tiny("reg").set_token_basis(torch.randn(10, 24))
    assert not m.basis_fitted


def test_a_model_left_in_eval_mode_is_refused_where_it_would_train_with_align_0():
    m = tiny().eval()  # as load_model returns it
    x, _, y, _, feats = inputs(m)
    with pytest.raises(ValueError, match=r"eval mode .* align would be 0. Call model.train\(\)"):
        reg.reg_loss(m, x, y, feats)
    with torch.no_grad():
        assert reg.reg_loss(m, x, y, feats)["align"] == 0  # a validation loss
    frozen = copy.deepcopy(m).requires_grad_(False)  # an EMA: nothing to train
    assert reg.reg_loss(frozen, x, y, feats)["align"] == 0


@pytest.mark.parametrize("method", ["reg", "reg-noalign"])
def test_features_from_an_encoder_that_is_not_frozen_get_no_gradient(method):
    m = randomize(tiny(method)).train()
    x, _, y, _, feats = inputs(m)
    feats = tuple(f.clone().requires_grad_(True) for f in feats)  # an encoder that trains
    reg.reg_loss(m, x, y, feats, beta=1.0)["loss"].backward()
    assert all(f.grad is None for f in feats)
    assert m.x_embedder.proj.weight.grad is not None


def test_ema_update_refuses_a_swapped_order_another_model_or_a_bad_decay():
    m = tiny()
    ema = copy.deepcopy(m).requires_grad_(False)
    with pytest.raises(ValueError, match=r"ema_update\(ema, model\): pass a copy"):
        reg.ema_update(m, ema)  # swapped: the EMA trains nothing
    with pytest.raises(ValueError, match=r"ema_update\(ema, model\)"):
        reg.ema_update(tiny("reg", encoder_dim=12), m)
    with pytest.raises(ValueError, match="decay must be a finite number from 0 to 1"):
        reg.ema_update(ema, m, decay=math.nan)


def test_configs_saves_and_loads_refuse_what_is_not_theirs(tmp_path):
    with pytest.raises(ValueError, match="SiTConfig.input_size must be a positive int, got '32'"):
        reg.make_model("SiT-Ti/2", input_size="32")
    with pytest.raises(ValueError, match="SiTConfig.depth must be a positive int, got 0"):
        reg.make_model("SiT-Ti/2", depth=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'widht'"):
        reg.make_model("SiT-Ti/2", widht=3)
    with pytest.raises(ValueError, match="save_model writes a .pt file: name it NAME.pt, not 'm.safetensors'"):
        reg.save_model(tmp_path / "m.safetensors", tiny())
    path = reg.save_model(tmp_path / "m.pt", tiny())  # a pathlib.Path works
    assert reg.load_model(path).cfg.num_classes == 5
    with pytest.raises(ValueError, match="has no 'best' weights"):
        reg.load_model(reg.save_model(tmp_path / "m.pt", tiny()), weights="best")
