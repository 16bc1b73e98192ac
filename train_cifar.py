"""
Train REG (or a baseline: --method sit / repa / reg-noalign / ...) on CIFAR-10 or any ImageFolder, in pixel space.

GPU, about an hour on one H100-class card (SiT-B/2 on 32x32 pixels, DINOv2 ViT-B/14 at 224px as the frozen encoder):
    python train_cifar.py --data-dir data/cifar10
CPU, learning within minutes (tiny model, the encoder run once into a feature cache, a subset, small batches):
    OMP_NUM_THREADS=1 python train_cifar.py --data-dir cifar/train --model SiT-Ti/4 --limit 1000 --batch-size 32 \\
        --steps 1500 --lr 1e-3 --ema 0.995 --cache-features --encoder tf_efficientnet_lite0 --encoder-weights <file>
"""
import argparse, copy, json, math, os, resource, signal, time

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.utils import save_image
from tqdm import tqdm

import reg

MUST_MATCH = ('model', 'method', 'beta', 'lam', 'batch_size', 'lr', 'seed', 'encoder', 'limit', 'projector_dim')
PEAK_TFLOPS = {'H200': 989, 'H100': 989, 'B200': 2250, 'A100': 312, 'L4': 121, 'A10': 125, '4090': 165}  # dense bf16


def load_data(args):
    """-> images uint8 (N, 3, H, W), labels (N,), class names: an ImageFolder at --data-dir, else CIFAR-10."""
    d = args.data_dir                                         # --limit: a fixed random subset, same for every seed
    subset = lambda n: torch.randperm(n, generator=torch.Generator().manual_seed(0))[:args.limit or n].sort()[0].tolist()
    if os.path.isdir(d) and any(e.is_dir() and e.name != 'cifar-10-batches-py' for e in os.scandir(d)):
        ds = ImageFolder(d)                                   # an empty class folder: FileNotFoundError naming it
        ds.samples = [ds.samples[i] for i in subset(len(ds.samples))]
        for p in (p for p, _ in ds.samples if os.path.dirname(os.path.dirname(p)) != os.path.normpath(d)):
            raise SystemExit(f"--data-dir {d}: images must sit directly in one folder per class, not deeper ({p}): "
                             f"point --data-dir at the folder that holds the class folders (e.g. {d}/train)")
        arrays = []
        for p, _ in ds.samples:                               # an unreadable file: PIL's OSError names it
            arrays.append(np.asarray(Image.open(p).convert('RGB')))
            if arrays[-1].shape != arrays[0].shape:
                raise SystemExit(f"images differ in size: {p} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]}, "
                                 f"{ds.samples[0][0]} {arrays[0].shape[1]}x{arrays[0].shape[0]}: resize them to one size")
        data, labels, classes = np.stack(arrays), [y for _, y in ds.samples], ds.classes
    else:
        try:
            ds = CIFAR10(d, train=True, download=True)
        except Exception as e:
            raise SystemExit(f"could not get CIFAR-10 into --data-dir {d} ({type(e).__name__}: {str(e)[:120]}). "
                             f"Offline? Put an ImageFolder there (one folder of same-size images per class), or download "
                             f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into {d}") from None
        keep = subset(len(ds.data))
        data, labels, classes = ds.data[keep], [ds.targets[i] for i in keep], ds.classes
    return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), classes  # (N, 3, H, W) uint8


def to_pixels(u8, flip):
    """uint8 (B, 3, H, W) -> float in [-1, 1], mirrored where flip (B,) is 1 (the only augmentation)."""
    return torch.where(flip.view(-1, 1, 1, 1).bool(), u8.flip(-1), u8).float() / 127.5 - 1


@torch.no_grad()
def build_cache(path, enc, images, bs, device, ctx):
    """Run the frozen encoder once over every image and its mirror: (2, N, 1+T, E) float16 = [class token ; patches]."""
    shape = (2, len(images), 1 + enc.grid ** 2, enc.dim)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    print(f"feature cache: encoding {len(images)} images x 2 flips -> {path} ({2 * math.prod(shape) / 1e9:.2f} GB)")
    store, ms = np.lib.format.open_memmap(path + '.tmp', mode='w+', dtype=np.float16, shape=shape), []
    for f in (0, 1):
        for i in tqdm(range(0, shape[1], bs), desc=f'encoding (flip={f})'):
            t0, x = time.perf_counter(), images[i:i + bs]
            with ctx:
                cls, patches = enc(to_pixels(x, torch.full((len(x),), f, device=device)))
            store[f, i:i + bs] = torch.cat([cls[:, None], patches], 1).half().cpu().numpy()  # the copy syncs the device
            ms.append((time.perf_counter() - t0) * 1000 * bs / len(x))
    store.flush()
    os.replace(path + '.tmp', path)                           # atomic: a cache is whole or absent
    print(f"feature cache: the encoder took {np.median(ms):.0f} ms per batch of {bs}; each training step now skips it")


def main(args):
    try:
        return train(args)
    except (ValueError, RuntimeError, OSError) as e:         # reg raises these with messages that name the fix
        raise SystemExit(f"error: {e}") from None


def train(args):
    torch.manual_seed(args.seed)
    device = reg.pick_device(args.device)
    ctx = reg.autocast(device, args.precision)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for the fp32 parts on GPUs
    images, labels, classes = load_data(args)
    N, K, size, B, enc, cache = len(images), len(classes), images.shape[-1], args.batch_size, None, None
    images, labels, grid = images.to(device), labels.to(device), size // reg.PRESETS[args.model]['patch_size']
    if reg.METHODS[args.method]['repa'] or reg.METHODS[args.method]['token'] != 'none':   # `sit` needs no encoder
        enc = reg.load_encoder(args.encoder, grid, args.encoder_weights, device)
        tag = f"{args.encoder}-{os.path.basename(args.encoder_weights or 'hub')}-g{grid}-n{N}".replace('/', '_')
        if args.cache_features:                               # keyed by encoder, weights, grid and data size
            if not os.path.isfile(path := os.path.join(args.cache_dir or args.data_dir, f"feats-{tag}.npy")):
                build_cache(path, enc, images, B, device, ctx)
            cache, enc = np.load(path, mmap_mode='r'), None
    torch.manual_seed(args.seed)                              # the init does not depend on which encoder path ran
    model = reg.make_model(args.model, args.method, input_size=size, in_channels=3, num_classes=K,
                           encoder_dim=enc.dim if enc else cache.shape[-1] if cache is not None else 768,
                           **dict(projector_dim=args.projector_dim) if args.projector_dim else {}).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    cuda = device.type == 'cuda'
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0, fused=cuda)
    scaler = torch.amp.GradScaler('cuda') if args.precision == 'fp16' and cuda else None
    net, per_epoch, order = torch.compile(model) if args.compile else model, N // B, {}
    if per_epoch == 0:
        raise SystemExit(f"--batch-size {B} exceeds the {N} training images: lower it")
    def batch_at(step):
        """Epoch e's permutation and flips come from a generator seeded with (seed, e), so the batch of a step is a pure
        function of the step: a resumed run meets exactly the batches the uninterrupted run met."""
        epoch, i = divmod(step, per_epoch)
        if order.get('epoch') != epoch:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
            order.update(epoch=epoch, perm=torch.randperm(N, generator=g), flip=torch.randint(0, 2, (N,), generator=g))
        idx = order['perm'][i * B:(i + 1) * B]
        flip = order['flip'][idx]
        x, y = to_pixels(images[idx.to(device)], flip.to(device)), labels[idx.to(device)]   # (B, 3, H, W), (B,)
        if cache is not None:                                 # the features of the flip this batch got
            tok = torch.from_numpy(cache[flip.numpy(), idx.numpy()]).to(device).float()   # (B, 1+T, E)
            return x, y, (tok[:, 0], tok[:, 1:])
        with ctx:
            return x, y, enc(x) if enc else None
    def loss_fn(x, y, feats):
        with ctx:
            return reg.reg_loss(net, x, y, feats, beta=args.beta, lam=args.lam)
    if args.bench:
        return bench(args, model, ema, opt, batch_at, loss_fn, device)
    out = args.out or os.path.join('runs', f"cifar-{args.method}-{args.model.replace('/', '-')}")
    run, found, step, log_path = reg.Run(out, args.keep), reg.list_checkpoints(out), 0, os.path.join(out, 'log.jsonl')
    if found and not args.resume:
        raise SystemExit(f"{out} holds checkpoints already: pass --resume to continue that run, or --out another folder")
    step = run.resume(model, ema, opt, scaler, {k: getattr(args, k) for k in MUST_MATCH}).get('step', 0)  # or other
    print(f"run {out}: {args.method}, {args.model}, {N} images {size}x{size}, {K} classes, {device}, from step {step}")
    fixed, state, stop = torch.Generator().manual_seed(args.seed), {}, []     # fixed: the same noise for every grid
    noise = [torch.randn(K * 8, *s, generator=fixed).to(device) for s in ((3, size, size), (model.cfg.encoder_dim,))]
    def check(at):                                            # a host sync: only at log steps and before saving
        rec = {k: round(v.item(), 6) for k, v in state['last'].items()}
        if not all(map(math.isfinite, rec.values())):
            raise SystemExit(f"the loss is not finite at step {at} ({rec}); the last good checkpoint is "
                             f"{(reg.list_checkpoints(out) or ['none'])[-1]}: lower --lr, or use --precision bf16/fp32")
        return rec
    def save(at):                                             # args: the flags, for the checks on resume
        if 'last' in state and check(at):
            run.save(at, model, ema, opt, scaler, args={k: v for k, v in vars(args).items() if not isinstance(v, list)})
    def on_ctrl_c(*_):                                        # end the step in flight, save, stop; a 2nd Ctrl-C aborts
        stop.append(signal.signal(signal.SIGINT, signal.default_int_handler))
        tqdm.write("Ctrl-C: saving a checkpoint after this step (continue with --resume); press again to abort")
    t_log, s_log, bar = time.time(), step, tqdm(total=args.steps, initial=step, unit='step')
    sigint = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        while step < args.steps and not stop:
            x, y, feats = batch_at(step)
            state['last'] = reg.train_step(net, ema, opt, [lambda: loss_fn(x, y, feats)], clip=1.0, ema_decay=args.ema,
                                           scaler=scaler)          # the paper's gradient clip
            step += 1
            bar.update()
            if step % args.log_every == 0 or step == args.steps:
                rec = dict(check(step), img_per_s=round((step - s_log) * B / (time.time() - t_log), 1))
                run.log(step=step, **rec)
                bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k != 'grad_norm'})
                t_log, s_log = time.time(), step
            if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                y = torch.arange(K, device=device).repeat_interleave(8)   # one row per class
                save_image((generate(args, ema, noise[0], y, noise[1], device) + 1) / 2,
                           os.path.join(out, f'samples_{step:07d}.png'), nrow=8)
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                evaluate(args, ema, images, K, out, step, run, device, state)
            if step % args.ckpt_every == 0 or step == args.steps or stop:
                save(step)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, sigint)
    plot_losses(log_path, os.path.join(out, 'losses.png'))
    return out


def generate(args, ema, x, y, tok, device):
    """EMA samples in [-1, 1]; the RNG is forked and seeded, so sampling never perturbs training (exact resume)."""
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(args.seed)
        return reg.sample(ema, x, y, tok if ema.entangled else None, steps=args.sample_steps, mode=args.sample_mode,
                          cfg_scale=args.cfg_scale, null_label=ema.cfg.num_classes)[0].clamp(-1, 1)


def evaluate(args, ema, images, K, out, step, run, device, state):
    """FD in a frozen encoder's class-token space (dinov2-l: FD_DINOv2) of --eval-n EMA samples vs the training set."""
    with torch.random.fork_rng(devices=[]):                   # loaded once; a 'random' one (tests) seeded
        torch.manual_seed(args.seed)
        enc = state['eval_enc'] = state.get('eval_enc') or reg.load_encoder(args.eval_encoder, 16,
                                                                            args.eval_encoder_weights, device)
    tag = f"{args.eval_encoder}-{os.path.basename(args.eval_encoder_weights or 'hub')}-n{len(images)}".replace('/', '_')
    bs, n, g, u8 = args.batch_size, args.eval_n, torch.Generator().manual_seed(args.seed + 1), []  # not the grids' noise
    ref = reg.encoder_stats(enc, images.split(bs), cache=os.path.join(args.cache_dir or args.data_dir, f'stats-{tag}.pt'))
    for i in range(0, n, bs):                                 # the classes in turn
        x, c = (torch.randn(min(bs, n - i), *s, generator=g).to(device) for s in (images.shape[1:], (ema.cfg.encoder_dim,)))
        y = torch.arange(i, i + len(x), device=device) % K
        u8.append(((generate(args, ema, x, y, c, device) + 1) * 127.5).round().to(torch.uint8))   # (b, 3, H, W)
    fd = reg.frechet_distance(reg.encoder_stats(enc, u8), ref)
    run.log(step=step, fd=round(fd, 4), eval_encoder=args.eval_encoder, eval_n=n)
    tqdm.write(f"step {step}: FD_{args.eval_encoder} = {fd:.2f} ({n} EMA samples vs the training set)")
    if args.save_npz:                                         # the ADM evaluator's format
        np.savez(os.path.join(out, f'samples_{step:07d}.npz'), arr_0=torch.cat(u8).permute(0, 2, 3, 1).cpu().numpy())


def plot_losses(log_path, png):
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
    recs = [r for r in map(json.loads, open(log_path)) if 'loss' in r]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, k in zip(axes, ('loss', 'denoise', 'token', 'align')):
        ax.plot([r['step'] for r in recs], [r[k] for r in recs])
        ax.set(title=k, xlabel='step')
    fig.tight_layout()
    fig.savefig(png)
    print(f"loss curves: {png}")


def bench(args, model, ema, opt, batch_at, loss_fn, device):
    """--bench N: time N steps after 3 warm-up steps, split into encoder (or cache read), forward+backward, optimiser."""
    cuda, times = device.type == 'cuda', []
    def clock():                                              # wait for the GPU's queue, then read the time
        torch.cuda.synchronize() if cuda else None
        return time.perf_counter()
    for step in range(args.bench + 3):
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        x, y, feats = batch_at(step)
        t1 = clock()
        loss_fn(x, y, feats)['loss'].backward()               # (timed without fp16's loss scaling)
        t2 = clock()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        reg.ema_update(ema, model, args.ema)
        times.append([t1 - t0, t2 - t1, clock() - t2])
    t = np.median(np.array(times[3:]), axis=0) * 1e3                                      # ms: encoder, fwd+bwd, opt
    tflops = 3 * reg.model_flops(model.cfg) * args.batch_size / t.sum() / 1e9
    name = torch.cuda.get_device_name() if cuda else 'cpu'
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0)
    mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    res = dict(img_per_s=args.batch_size * 1e3 / t.sum(), ms_step=t.sum(), ms_encoder=t[0], ms_fwd_bwd=t[1],
               ms_optimizer=t[2], peak_mem_gib=mem / 2**30, tflops=tflops, mfu=tflops / peak if peak else float('nan'))
    print(f"bench {args.model} {args.method}, batch {args.batch_size}, {name} (peak {peak or '?'} TFLOP/s): "
          + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--data-dir', default='data/cifar10', help='an ImageFolder (a folder per class), or where CIFAR-10 is or goes')
    a('--limit', type=int, default=0, help='train on a fixed random subset of this many images (CPU runs); 0 = all')
    a('--model', default='SiT-B/2', choices=list(reg.PRESETS), help='default SiT-B/2 (~1 h on a GPU); CPU: SiT-Ti/4')
    a('--method', default='reg', choices=list(reg.METHODS), help='reg (the paper), repa, sit, or a REG Sec. 4 ablation')
    a('--beta', type=float, default=0.03, help='token loss weight (REG Sec. 3; paper 0.03)')
    a('--lam', type=float, default=0.5, help='alignment loss weight (REG Sec. 3 / REPA; paper 0.5)')
    a('--projector-dim', type=int, default=0, help="REPA projector width; 0 = the preset's (2048, REPA; Ti: 256)")
    a('--encoder', default='dinov2-b', help='frozen encoder: dinov2-{s,b,l,g}[-reg] or a timm name; paper dinov2-b')
    a('--encoder-weights', default=None, help="a local weights file (offline), or 'random' (smoke tests); default: hub")
    a('--cache-features', action='store_true', help='encode the data once (both flips, float16) and train without it')
    a('--cache-dir', default=None, help='where feature caches and FD reference statistics go; default --data-dir')
    a('--steps', type=int, default=40000, help='optimiser steps; default 40k (SiT-B/2, batch 128: ~1 h on an H100, estimated)')
    a('--batch-size', type=int, default=128, help='default 128 (half the paper\'s ImageNet 256; CIFAR is small)')
    a('--lr', type=float, default=1e-4, help='AdamW learning rate (paper 1e-4; betas 0.9/0.999, no weight decay); 1e-3 for SiT-Ti on a CPU')
    a('--ema', type=float, default=0.9999, help='EMA decay per step; default 0.9999 (paper); 0.995 for short CPU runs')
    a('--precision', default='bf16', choices=['bf16', 'fp16', 'fp32'], help='GPU autocast; fp16 adds a GradScaler')
    a('--compile', action='store_true', help='torch.compile the SiT (off by default, so it can be stepped through)')
    a('--device', default=None, help='default: cuda, then mps, then cpu')
    a('--seed', type=int, default=0, help='seeds the init, the data order and the sample noise; default 0')
    a('--out', default=None, help='run folder; default runs/cifar-<method>-<model>, e.g. runs/cifar-reg-SiT-B-2')
    a('--resume', action='store_true', help='continue the latest checkpoint in --out, exactly')
    a('--keep', type=int, default=3, help='checkpoints kept; default 3')
    a('--log-every', type=int, default=100, help='steps between log.jsonl records (the loop\'s only syncs); default 100')
    a('--ckpt-every', type=int, default=5000, help='steps between checkpoints (also at the end, on Ctrl-C); default 5000')
    a('--sample-every', type=int, default=2500, help='steps between EMA sample grids (a row per class); default 2500, 0 = off')
    a('--sample-mode', default='euler', choices=['euler', 'heun', 'sde'], help="default euler (fast; the paper's: sde)")
    a('--sample-steps', type=int, default=50, help="sampler steps; default 50 (speed; the paper's 250)")
    a('--cfg-scale', type=float, default=1.0, help='classifier-free guidance scale; default 1 (none)')
    a('--eval-every', type=int, default=0, help='steps between FD evaluations; default 0 = off')
    a('--eval-n', type=int, default=5000, help='EMA samples per FD evaluation; default 5000')
    a('--eval-encoder', default='dinov2-l', help='the FD feature space; default dinov2-l (FD_DINOv2, Stein et al. 2023)')
    a('--eval-encoder-weights', default=None, help='a local weights file for --eval-encoder; default: the hub')
    a('--save-npz', action='store_true', help='also save the FD samples as .npz (arr_0 uint8 NHWC, the ADM format)')
    a('--bench', type=int, default=0, help='time this many steps after 3 warm-up steps, print the split, exit')
    a('--peak-tflops', type=float, default=0, help='peak bf16 TFLOP/s for the MFU; default: a table of common GPUs')
    return p.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
