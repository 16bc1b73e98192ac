"""
Train REG (or a baseline: --method sit / repa / reg-noalign / ...) on CIFAR-10 or any ImageFolder, in pixel space.

GPU, about an hour on one H100-class card (SiT-B/2 on 32x32 pixels, DINOv2 ViT-B/14 at 224px as the frozen encoder):
    python train_cifar.py --data-dir data/cifar10
CPU, learning within minutes (tiny model, encoder run once into a cache, small batch; see the README for figures):
    python train_cifar.py --data-dir data/cifar10 --model SiT-Ti/4 --projector-dim 256 --batch-size 32 --cache-features \
        --limit 5000 --encoder tf_efficientnet_lite0 --encoder-weights tf_efficientnet_lite0.in1k.safetensors
The data order is a pure function of (seed, step), so --resume continues a run exactly (weights, EMA, optimiser, RNGs).
"""
import argparse
import copy
import json
import math
import os
import resource
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import reg

MUST_MATCH = ('model', 'method', 'beta', 'lam', 'batch_size', 'lr', 'seed', 'encoder', 'limit', 'projector_dim')
PEAK_TFLOPS = {'H200': 989, 'H100': 989, 'B200': 2250, 'A100': 312, 'L40': 181, 'L4': 121, 'A10': 125,
               '4090': 165, '3090': 71, 'V100': 125, 'T4': 65}  # dense bf16/fp16 tensor-core TFLOP/s, vendor sheets


def load_data(args):
    """-> images uint8 (N, 3, H, W), labels (N,), class names. An ImageFolder at --data-dir, else CIFAR-10 (downloaded)."""
    d = args.data_dir
    folders = [e.name for e in os.scandir(d) if e.is_dir() and e.name != 'cifar-10-batches-py'] if os.path.isdir(d) else []
    if folders:
        from PIL import Image
        from torchvision.datasets import ImageFolder
        try:
            ds = ImageFolder(d)
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"--data-dir {d}: {e}") from None
        nested = [p for p, _ in ds.samples if os.path.dirname(os.path.dirname(p)) != os.path.normpath(d)]
        if nested:
            raise SystemExit(f"--data-dir {d}: images must sit directly in one folder per class, but {nested[0]} is nested "
                             f"deeper: point --data-dir at the folder that holds the class folders (e.g. {d}/train)")
        arrays, keep = [], subset(len(ds.samples), args.limit)
        ds.samples, ds.targets = [ds.samples[i] for i in keep], [ds.targets[i] for i in keep]
        for p, _ in ds.samples:
            try:
                arrays.append(np.asarray(Image.open(p).convert('RGB')))
            except OSError as e:
                raise SystemExit(f"cannot read image {p} ({e}): remove or replace it") from None
            if arrays[-1].shape != arrays[0].shape:
                raise SystemExit(f"images differ in size: {p} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]}, "
                                 f"{ds.samples[0][0]} is {arrays[0].shape[1]}x{arrays[0].shape[0]}: resize them all to one size")
        data, labels, classes = np.stack(arrays), ds.targets, ds.classes
    else:
        from torchvision.datasets import CIFAR10
        try:
            ds = CIFAR10(d, train=True, download=True)
        except Exception as e:
            raise SystemExit(f"could not get CIFAR-10 into --data-dir {d} ({type(e).__name__}: {str(e)[:120]}). Offline? "
                             f"Put an ImageFolder there (one subfolder of same-size images per class), or download "
                             f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into {d}") from None
        keep = subset(len(ds.data), args.limit)
        data, labels, classes = ds.data[keep], [ds.targets[i] for i in keep], ds.classes
    return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), classes  # (N, 3, H, W) uint8


def subset(n, limit):
    """--limit: a fixed random subset (the same for every seed), in the original order; classes stay balanced."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].sort().values.tolist() if limit else range(n)


def to_pixels(u8, flip):
    """uint8 (B, 3, H, W) -> float in [-1, 1], mirrored where flip (B,) is true (the only augmentation)."""
    x = u8.float() / 127.5 - 1
    return torch.where(flip.view(-1, 1, 1, 1).bool(), x.flip(-1), x)


@torch.no_grad()
def build_cache(path, enc, images, bs, device, ctx):
    """Run the frozen encoder once over every image and its mirror: (2, N, 1+T, E) float16 = [class token ; patches]."""
    N, T = len(images), enc.grid ** 2
    print(f"feature cache: encoding {N} images x 2 flips -> {path} ({2 * N * (1 + T) * enc.dim * 2 / 1e9:.2f} GB)")
    store, ms = np.lib.format.open_memmap(path + '.tmp', mode='w+', dtype=np.float16, shape=(2, N, 1 + T, enc.dim)), []
    for f in (0, 1):
        for i in tqdm(range(0, N, bs), desc=f'encoding (flip={f})'):
            t0 = time.perf_counter()
            x = to_pixels(images[i:i + bs].to(device), torch.full((len(images[i:i + bs]),), f, device=device))
            with ctx:
                cls, patches = enc(x)
            tokens = torch.cat([cls[:, None], patches], 1).half().cpu()    # the copy to the host also syncs the device
            ms.append((time.perf_counter() - t0) * 1000 * bs / len(x))
            store[f, i:i + bs] = tokens.numpy()
    store.flush()
    del store
    os.replace(path + '.tmp', path)
    print(f"feature cache: the encoder pass took {np.median(ms):.1f} ms per batch of {bs}; each training step saves it")


def sit_flops(cfg, extra):
    """Forward FLOPs of one image through the SiT, counting 2 per multiply-add of every matmul/conv (elementwise ops,
    norms and softmax ignored), attention's QK^T and AV included; training costs 3x this (backward = 2x forward)."""
    D, T, E, P, p = cfg.hidden_size, (cfg.input_size // cfg.patch_size) ** 2, cfg.encoder_dim, cfg.projector_dim, cfg.patch_size
    N, M = T + extra, int(cfg.hidden_size * cfg.mlp_ratio)
    block = 2 * N * (4 * D * D + 2 * D * M) + 4 * N * N * D + 2 * D * 6 * D            # qkv+proj, MLP, attention, adaLN
    io = 2 * T * p * p * cfg.in_channels * D * 2 + 2 * D * 2 * D + 2 * (256 * D + D * D)  # patchify, unpatchify, final adaLN, t-MLP
    repa = 2 * N * (D * P + P * P + P * E) if cfg.repa else 0                           # projector (training only)
    return cfg.depth * block + io + repa + (4 * E * D if cfg.token in ('cls', 'mean') else 0)


def main(args):
    try:
        return train(args)
    except (ValueError, RuntimeError) as e:       # reg raises these with messages that name the fix
        raise SystemExit(f"error: {e}") from None


def train(args):
    torch.manual_seed(args.seed)
    device = reg.pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for the fp32 parts on GPUs
    ctx = reg.autocast(device, args.precision)
    images, labels, classes = load_data(args)
    N, K, size = len(images), len(classes), images.shape[-1]
    preset = reg.PRESETS.get(args.model, {})
    grid = size // preset.get('patch_size', 1)
    images, labels = images.to(device), labels.to(device)
    needs_enc = reg.METHODS[args.method]['repa'] or reg.METHODS[args.method]['token'] != 'none'  # `sit` needs none
    enc = cache = None
    if needs_enc:
        enc = reg.load_encoder(args.encoder, grid, args.encoder_weights, device)
        probe = enc(to_pixels(images[:2], torch.zeros(2, device=device)))[1]
        if probe.shape[1] != grid * grid:
            raise SystemExit(f"encoder {args.encoder} gives {probe.shape[1]} patch tokens, the SiT grid needs {grid}x{grid}: "
                             f"pick another --encoder or --model patch size")
        if args.cache_features:
            tag = f"{args.encoder}-{os.path.basename(args.encoder_weights or 'hub')}-g{grid}-n{N}".replace('/', '_')
            path = os.path.join(args.cache_dir or args.data_dir, f"feats-{tag}.npy")
            if not os.path.isfile(path):
                build_cache(path, enc, images, args.batch_size, device, ctx)
            cache, enc = np.load(path, mmap_mode='r'), None
    torch.manual_seed(args.seed)                  # the model's init does not depend on which encoder path ran
    extra = dict(projector_dim=args.projector_dim) if args.projector_dim else {}
    model = reg.make_model(args.model, args.method, input_size=size, in_channels=3, num_classes=K,
                           encoder_dim=enc.dim if enc else cache.shape[-1] if cache is not None else 768, **extra).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0, fused=device.type == 'cuda')
    scaler = torch.amp.GradScaler(device.type) if args.precision == 'fp16' and device.type == 'cuda' else None
    net = torch.compile(model) if args.compile else model
    B, per_epoch, order = args.batch_size, N // args.batch_size, {}
    if per_epoch == 0:
        raise SystemExit(f"--batch-size {B} exceeds the {N} training images: lower it")

    def batch_at(step):
        """The data order is a function of (seed, step): epoch e's permutation and flips come from a generator seeded
        with (seed, e), so a resumed run meets exactly the batches the uninterrupted run would have met."""
        epoch, i = divmod(step, per_epoch)
        if order.get('epoch') != epoch:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
            order.update(epoch=epoch, perm=torch.randperm(N, generator=g), flip=torch.randint(0, 2, (N,), generator=g))
        idx = order['perm'][i * B:(i + 1) * B]
        flip = order['flip'][idx]
        x = to_pixels(images[idx.to(device)], flip.to(device))                            # (B, 3, H, W)
        if cache is not None:
            tok = torch.from_numpy(cache[flip.numpy(), idx.numpy()]).to(device).float()  # (B, 1+T, E)
            return x, labels[idx.to(device)], (tok[:, 0], tok[:, 1:])
        with ctx:
            return x, labels[idx.to(device)], enc(x) if enc else None

    def loss_fn(x, y, feats):
        with ctx:
            return reg.reg_loss(net, x, y, feats, beta=args.beta, lam=args.lam)

    if args.bench:
        return bench(args, model, ema, opt, scaler, net, batch_at, loss_fn, device)
    out = args.out or os.path.join('runs', f"cifar-{args.method}-{args.model.replace('/', '-')}")
    run, found = reg.Run(out, keep=args.keep), reg.list_checkpoints(out)
    if found and not args.resume:
        raise SystemExit(f"{out} already holds checkpoints ({os.path.basename(found[-1])}): pass --resume to continue "
                         f"that run, or --out another folder")
    step, log_path = 0, os.path.join(out, 'log.jsonl')
    if found:
        old = reg.load_checkpoint(found[-1])      # corrupt -> ValueError naming the file
        diff = [f"--{k.replace('_', '-')}: checkpoint {old.get('args', {}).get(k)!r}, now {getattr(args, k)!r}"
                for k in MUST_MATCH if old.get('args', {}).get(k) != getattr(args, k)]
        diff += [f"model {k}: checkpoint {v!r}, now {getattr(model.cfg, k)!r}" for k, v in old['config'].items()
                 if getattr(model.cfg, k) != v]
        if diff:
            raise SystemExit(f"{found[-1]} comes from another configuration:\n  " + "\n  ".join(diff) +
                             "\nresume with the original flags, or start a new run with another --out")
        step = run.resume(model, ema, opt, scaler)['step']
    lines = open(log_path).readlines() if os.path.isfile(log_path) else []
    with open(log_path, 'w') as f:                # drop records past the checkpoint (or all, on a fresh start)
        f.writelines(l for l in lines if found and json.loads(l).get('step', 0) <= step)
    print(f"run {out}: {args.method} on {args.model}, {N} images {size}x{size}, {K} classes, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {device}, from step {step}")
    fixed = torch.Generator().manual_seed(args.seed)     # the same noise for every sample grid
    noise = torch.randn(K * args.sample_cols, 3, size, size, generator=fixed).to(device)
    tok_noise = torch.randn(K * args.sample_cols, model.cfg.encoder_dim, generator=fixed).to(device)
    state = dict(last=None)

    def save(at):
        if at > 0 and state['last'] is not None and torch.isfinite(state['last']['loss']):
            run.save(at, model, ema, opt, scaler, args={k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool, type(None)))})

    t_log, s_log = time.time(), step
    bar = tqdm(total=args.steps, initial=step, unit='step', dynamic_ncols=True)
    try:
        while step < args.steps:
            x, y, feats = batch_at(step)
            state['last'] = reg.train_step(net, ema, opt, [lambda: loss_fn(x, y, feats)], clip=args.clip,
                                           ema_decay=args.ema, scaler=scaler)
            step += 1
            bar.update()
            if step % args.log_every == 0 or step == args.steps:   # the only host-device sync of the loop
                rec = {k: round(v.item(), 6) for k, v in state['last'].items()}
                if not all(map(math.isfinite, rec.values())):
                    raise SystemExit(f"loss is not finite at step {step} ({rec}); the last good checkpoint is "
                                     f"{(reg.list_checkpoints(out) or ['none'])[-1]}: lower --lr, or use --precision bf16/fp32")
                rec['img_per_s'] = round((step - s_log) * B / (time.time() - t_log), 1)
                run.log(step=step, **rec)
                bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k != 'grad_norm'})
                t_log, s_log = time.time(), step
            if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                grid_png(args, ema, noise, tok_noise, K, os.path.join(out, f'samples_{step:07d}.png'), device)
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                evaluate(args, ema, images, K, out, step, run, device, state)
            if step % args.ckpt_every == 0 or step == args.steps:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted at step {step}: saving a checkpoint; continue with --resume")
        save(step)
        return out
    bar.close()
    plot_losses(log_path, os.path.join(out, 'losses.png'))
    return out


@torch.no_grad()
def generate(args, ema, x, y, tok, device):
    """EMA samples in [-1, 1] from fixed noise; the RNG is forked so sampling never perturbs training (exact resume)."""
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(args.seed)
        return reg.sample(ema, x, y, tok if ema.entangled else None, steps=args.sample_steps, mode=args.sample_mode,
                          cfg_scale=args.cfg_scale, null_label=ema.cfg.num_classes)[0].clamp(-1, 1)


def grid_png(args, ema, noise, tok_noise, K, path, device):
    from torchvision.utils import save_image
    y = torch.arange(K, device=device).repeat_interleave(args.sample_cols)                # one row per class
    save_image((generate(args, ema, noise, y, tok_noise, device) + 1) / 2, path, nrow=args.sample_cols)


def evaluate(args, ema, images, K, out, step, run, device, state):
    """FD in a frozen encoder's class-token space (FD_DINOv2 with dinov2-l) of --eval-n EMA samples vs the training set."""
    if 'eval_enc' not in state:                   # loaded at the first evaluation; a 'random' one is seeded (tests)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            state['eval_enc'] = reg.load_encoder(args.eval_encoder, 16, args.eval_encoder_weights, device)
    enc, bs, n = state['eval_enc'], args.batch_size, args.eval_n
    tag = f"{args.eval_encoder}-{os.path.basename(args.eval_encoder_weights or 'hub')}-n{len(images)}".replace('/', '_')
    ref = reg.encoder_stats(enc, (images[i:i + bs] for i in range(0, len(images), bs)),
                            cache=os.path.join(args.cache_dir or args.data_dir, f'stats-{tag}.pt'))
    g, S = torch.Generator().manual_seed(args.seed + 1), ema.cfg.input_size
    xs = [generate(args, ema, torch.randn(min(bs, n - i), 3, S, S, generator=g).to(device),
                   torch.arange(i, min(i + bs, n), device=device) % K,
                   torch.randn(min(bs, n - i), ema.cfg.encoder_dim, generator=g).to(device), device) for i in range(0, n, bs)]
    u8 = torch.cat([((x + 1) * 127.5).round().to(torch.uint8) for x in xs])               # (n, 3, H, W)
    fd = reg.frechet_distance(reg.encoder_stats(enc, u8.split(bs)), ref)
    run.log(step=step, fd=round(fd, 4), eval_encoder=args.eval_encoder, eval_n=n)
    tqdm.write(f"step {step}: FD_{args.eval_encoder} = {fd:.2f} ({n} samples)")
    if args.save_npz:
        np.savez(os.path.join(out, f'samples_{step:07d}.npz'), arr_0=u8.permute(0, 2, 3, 1).cpu().numpy())


def plot_losses(log_path, png):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
    recs = [r for r in map(json.loads, open(log_path)) if 'loss' in r]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, k in zip(axes, ('loss', 'denoise', 'token', 'align')):
        ax.plot([r['step'] for r in recs], [r[k] for r in recs])
        ax.set_title(k), ax.set_xlabel('step')
    fig.tight_layout()
    fig.savefig(png)
    print(f"loss curves: {png}")


def bench(args, model, ema, opt, scaler, net, batch_at, loss_fn, device):
    """--bench N: time N steps after a warm-up, split into encoder (or cache read), forward+backward and optimiser."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times = []
    for step in range(args.bench + 3):                                                   # 3 warm-up steps
        t0 = time.perf_counter()
        x, y, feats = batch_at(step)
        sync(), times.append([time.perf_counter() - t0])
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, y, feats)['loss']
        (scaler.scale(loss) if scaler else loss).backward()
        sync(), times[-1].append(time.perf_counter() - t0)
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(opt) if scaler else opt.step()
        scaler.update() if scaler else None
        reg.ema_update(ema, model, args.ema)
        sync(), times[-1].append(time.perf_counter() - t0)
    t = np.median(np.array(times[3:]), axis=0)                                           # cumulative: encoder, +fwd/bwd, +opt
    ms = dict(encoder=t[0] * 1e3, fwd_bwd=(t[1] - t[0]) * 1e3, optimizer=(t[2] - t[1]) * 1e3, step=t[2] * 1e3)
    tflops = 3 * sit_flops(model.cfg, model.extra) * args.batch_size / t[2] / 1e12
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20                       # Linux reports KiB
    res = dict(img_per_s=args.batch_size / t[2], **{f'ms_{k}': v for k, v in ms.items()}, peak_mem_gib=mem,
               tflops=tflops, mfu=tflops / peak if peak else None)
    print(f"bench {args.model} {args.method} batch {args.batch_size} on {name}: {res['img_per_s']:.1f} img/s, "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()) + f", peak memory {mem:.2f} GiB, "
          f"{tflops:.3g} TFLOP/s (SiT matmuls only), MFU " + (f"{res['mfu']:.1%} of {peak} TFLOP/s" if peak else "n/a"))
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--data-dir', default='data/cifar10', help='ImageFolder of same-size images (one folder per class), or where '
      'CIFAR-10 is (downloaded by torchvision when missing); default data/cifar10')
    a('--limit', type=int, default=0, help='train on a fixed random subset of this many images (CPU runs); 0 = all')
    a('--model', default='SiT-B/2', choices=list(reg.PRESETS), help='preset of reg.PRESETS; default SiT-B/2 (~1 h of '
      'recognisable CIFAR samples on one modern GPU); SiT-Ti/* for CPUs')
    a('--method', default='reg', choices=list(reg.METHODS), help='reg (the paper), repa, sit, or an ablation of REG Sec. 4.3')
    a('--beta', type=float, default=0.03, help='token loss weight (REG Eq. 9, paper 0.03)')
    a('--lam', type=float, default=0.5, help='alignment loss weight (REG Eq. 9 / REPA, paper 0.5)')
    a('--projector-dim', type=int, default=0, help='REPA projector width; 0 = the preset (2048, REPA); 256 suits SiT-Ti')
    a('--encoder', default='dinov2-b', help='frozen encoder: dinov2-{s,b,l,g}[-reg] or a timm name (paper: dinov2-b)')
    a('--encoder-weights', default=None, help="local weights file (offline), 'random' (smoke tests); default: the HF hub")
    a('--cache-features', action='store_true', help='encode the data once (both flips, float16, in --cache-dir) and '
      'train without the encoder')
    a('--cache-dir', default=None, help='where feature caches and FD statistics go; default --data-dir')
    a('--steps', type=int, default=40000, help='total optimiser steps; default 40k (SiT-B/2, batch 128: ~1 h on an H100)')
    a('--batch-size', type=int, default=128, help='default 128 (REPA/REG CIFAR-scale; the paper uses 256 on ImageNet)')
    a('--lr', type=float, default=1e-4, help='AdamW learning rate (paper 1e-4)')
    a('--clip', type=float, default=1.0, help='gradient-norm clip (paper 1.0)')
    a('--ema', type=float, default=0.9999, help='EMA decay per step (paper 0.9999)')
    a('--precision', default='bf16', choices=['bf16', 'fp16', 'fp32'], help='autocast on GPUs (bf16 default; fp16 uses '
      'a GradScaler as in the release); CPUs always run fp32')
    a('--compile', action='store_true', help='torch.compile the SiT (off by default so it can be stepped through)')
    a('--device', default=None, help='default: cuda, then mps, then cpu')
    a('--seed', type=int, default=0, help='seeds the model init, the data order and the sample noise; default 0')
    a('--out', default=None, help='run folder; default runs/cifar-<method>-<model>')
    a('--resume', action='store_true', help='continue the latest checkpoint in --out exactly')
    a('--keep', type=int, default=3, help='checkpoints kept; default 3')
    a('--log-every', type=int, default=100, help='steps between log.jsonl records (and host syncs); default 100')
    a('--ckpt-every', type=int, default=5000, help='steps between checkpoints (also at the end and on Ctrl-C); default 5000')
    a('--sample-every', type=int, default=2500, help='steps between EMA sample grids (one row per class); 0 = off')
    a('--sample-cols', type=int, default=8, help='samples per class in a grid; default 8')
    a('--sample-mode', default='euler', choices=['euler', 'heun', 'sde'], help="sampler; default euler (fast; the paper's "
      'is sde with 250 steps)')
    a('--sample-steps', type=int, default=50, help='sampler steps; default 50 (speed over the paper\'s 250)')
    a('--cfg-scale', type=float, default=1.0, help='classifier-free guidance scale; default 1 (none)')
    a('--eval-every', type=int, default=0, help='steps between FD evaluations; 0 = off')
    a('--eval-n', type=int, default=5000, help='EMA samples per FD evaluation; default 5000')
    a('--eval-encoder', default='dinov2-l', help='feature space of the FD; default dinov2-l (FD_DINOv2, Stein et al.)')
    a('--eval-encoder-weights', default=None, help='local weights file for --eval-encoder; default: the HF hub')
    a('--save-npz', action='store_true', help='also write the FD samples as .npz (arr_0 uint8 NHWC, ADM evaluator format)')
    a('--bench', type=int, default=0, help='time this many steps (after 3 warm-up steps), print the split, and exit')
    a('--peak-tflops', type=float, default=0, help='peak bf16 TFLOP/s for the MFU; default: a table of common GPUs')
    return p.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
