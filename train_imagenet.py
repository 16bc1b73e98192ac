"""
Train SiT + REG on ImageNet 256 or 512 from SD-VAE latents (REG Sec. 4.1): a class subset on one GPU, or full ImageNet
on many. One script, two subcommands:

  prepare  ImageFolder -> ADM centre crops + SD-VAE posteriors (mean, std) in a few shard files and manifest.json.
           Resumable (finished shards are skipped); under torchrun each process encodes every WORLD_SIZE-th shard.
  train    the paper's recipe: SiT-XL/2, DINOv2-B, lambda 0.5, beta 0.03, AdamW 1e-4, global batch 256, EMA 0.9999.
           `python` on one GPU, `torchrun` for DDP; gradient accumulation keeps the global batch on fewer GPUs.

    python train_imagenet.py prepare --data ~/imagenet/train --out data/in10 --classes 10
    python train_imagenet.py train --data data/in10 --out runs/in10 --preset SiT-B/2 --micro-batch 128
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint HOST:29500 train_imagenet.py train --data data/in256 --out runs/xl
    python train_imagenet.py train --synthetic --bench 20 --preset SiT-B/2 --encoder-weights random   # speed only
"""
import argparse
import json
import math
import os
import signal
import time
from copy import deepcopy
from functools import lru_cache, partial

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import reg

SCALE = 0.18215                                         # SD-VAE latent scale (LDM), used by SiT, REPA and REG
VAE = 'stabilityai/sd-vae-ft-ema'                       # the paper's SD-VAE
EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')

# ----------------------------------------------------------------------------------------------------------------------
# 1. Preparation: ADM centre crops -> SD-VAE posteriors, in shards
# ----------------------------------------------------------------------------------------------------------------------

def center_crop(img, res):
    """ADM's crop (guided-diffusion, image_datasets.py center_crop_arr): halve with a BOX filter while the short side
    is >= 2 res (cheap, alias-free), BICUBIC-resize the short side to res, cut the centre square. -> uint8 (res, res, 3)."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    k = res / min(img.size)
    a = np.asarray(img.resize(tuple(round(s * k) for s in img.size), resample=Image.BICUBIC))
    top, left = (a.shape[0] - res) // 2, (a.shape[1] - res) // 2
    return a[top:top + res, left:left + res]


class Crops(torch.utils.data.Dataset):
    """Centre crops of image files. A bad file comes back as a message, raised in the main process (not a worker)."""
    def __init__(self, files, res, upscale):
        self.files, self.res, self.upscale = files, res, upscale

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, empty = self.files[i], torch.zeros(3, self.res, self.res, dtype=torch.uint8)
        try:
            with Image.open(path) as im:
                im = im.convert('RGB')
        except Exception as e:
            return empty, f"cannot read image {path} ({type(e).__name__}: {e}): delete or replace the file"
        if min(im.size) < self.res and not self.upscale:
            return empty, (f"image {path} is {im.size[0]}x{im.size[1]}, smaller than --resolution {self.res}: pass "
                           f"--upscale to enlarge such images bicubically (as ADM does), or remove the file")
        return torch.from_numpy(center_crop(im, self.res).copy()).permute(2, 0, 1), ''


def load_vae(name, device):
    """SD-VAE as a frozen diffusers AutoencoderKL, from a hub name or a local folder (offline)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise SystemExit("the SD-VAE needs diffusers: pip install diffusers") from None
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval().requires_grad_(False)
    except Exception as e:
        raise SystemExit(f"could not load the VAE {name!r} ({type(e).__name__}: {str(e)[:200]}). Offline? Download "
                         f"config.json and diffusion_pytorch_model.safetensors from https://huggingface.co/stabilityai/"
                         f"sd-vae-ft-ema/tree/main into a folder and pass that folder as --vae") from None


def list_images(root, classes=None):
    """(class names, [(file, label)]) of an ImageFolder; `classes`: 'N' = first N sorted names, or 'a,b,c'."""
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    if not found:
        raise SystemExit(f"--data {root!r} is not an ImageFolder (no class sub-folders): pass a folder laid out as "
                         f"<data>/<class>/<image>, e.g. ImageNet's train folder")
    if classes and classes.isdigit():
        found = found[:int(classes)]
    elif classes:
        missing = [c for c in classes.split(',') if c not in found]
        if missing:
            raise SystemExit(f"--classes names folders that {root!r} lacks: {', '.join(missing[:5])}")
        found = sorted(classes.split(','))
    files = [(os.path.join(root, c, f), y) for y, c in enumerate(found)
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(EXTS)]
    if not files:
        raise SystemExit(f"no images ({', '.join(EXTS)}) in the class folders of {root!r}")
    return found, files


def shard_path(folder, i):
    return os.path.join(folder, f'shard_{i:05d}.pt')


def write_manifest(out, plan, rank):
    """manifest.json = the plan + the shards on disk. Shards are written atomically, so their presence is the truth;
    several ranks may rewrite this file (each through its own temporary name)."""
    done = [i for i in range(len(plan['counts'])) if os.path.exists(shard_path(out, i))]
    with open(os.path.join(out, f'.manifest.{rank}.tmp'), 'w') as f:
        json.dump({**plan, 'done': done, 'complete': len(done) == len(plan['counts'])}, f, indent=1)
    os.replace(os.path.join(out, f'.manifest.{rank}.tmp'), os.path.join(out, 'manifest.json'))


def prepare(args):
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device, (classes, files) = local_device(args.device), list_images(args.data, args.classes)
    n, size = len(files), args.shard_size
    plan = dict(classes=classes, resolution=args.resolution, vae=args.vae or VAE, images=n,
                counts=[min(size, n - s) for s in range(0, n, size)])
    manifest = os.path.join(args.out, 'manifest.json')
    if os.path.isfile(manifest) and {k: v for k, v in json.load(open(manifest)).items() if k in plan} != plan:
        raise SystemExit(f"{args.out!r} holds a different preparation (classes, --resolution, --vae or --shard-size "
                         f"differ): pass another --out, or delete that folder")
    os.makedirs(args.out, exist_ok=True)
    todo = [i for i in range(rank, len(plan['counts']), world) if not os.path.exists(shard_path(args.out, i))]
    write_manifest(args.out, plan, rank)
    vae = load_vae(plan['vae'], device) if todo else None
    bar = tqdm(total=sum(plan['counts'][i] for i in todo), unit='img', disable=rank > 0, desc='prepare')
    for i in todo:
        chunk = files[i * size:(i + 1) * size]
        loader = torch.utils.data.DataLoader(Crops([f for f, _ in chunk], args.resolution, args.upscale),
                                             batch_size=args.batch_size, num_workers=args.workers)
        parts = dict(mean=[], std=[], images=[])
        for img, err in loader:
            if any(err):
                raise SystemExit(next(e for e in err if e))
            with torch.no_grad():                                                          # posterior of 2x - 1 in [-1, 1]
                post = vae.encode(img.to(device).float() / 127.5 - 1).latent_dist
            for k, v in (('mean', post.mean.half()), ('std', post.std.half()), ('images', img)):
                parts[k].append(v.cpu())
            bar.update(len(img))
        shard = {k: torch.cat(v) for k, v in parts.items()}                                # (N, 4, res/8, res/8) fp16 ...
        reg.save_checkpoint(shard_path(args.out, i), dict(shard, labels=torch.tensor([y for _, y in chunk])))
        write_manifest(args.out, plan, rank)
    bar.close()

# ----------------------------------------------------------------------------------------------------------------------
# 2. Data for training: memory-mapped shards, global batches fixed by (seed, step)
# ----------------------------------------------------------------------------------------------------------------------

def load_prepared(folder):
    """The shards of a finished preparation, memory-mapped (full ImageNet need not fit in RAM); refuses a partial one."""
    if not os.path.isfile(os.path.join(folder, 'manifest.json')):
        raise SystemExit(f"{folder!r} has no manifest.json: run `python train_imagenet.py prepare --out {folder}` first")
    meta = json.load(open(os.path.join(folder, 'manifest.json')))
    missing = [i for i in range(len(meta['counts'])) if not os.path.exists(shard_path(folder, i))]
    if missing:
        raise SystemExit(f"the preparation in {folder!r} is incomplete ({len(missing)} of {len(meta['counts'])} shards "
                         f"missing, e.g. {shard_path(folder, missing[0])}): rerun the same `prepare` command to finish it")
    shards = [torch.load(shard_path(folder, i), mmap=True, weights_only=True) for i in range(len(meta['counts']))]
    for i, (s, c) in enumerate(zip(shards, meta['counts'])):
        if len(s['labels']) != c:
            raise SystemExit(f"{shard_path(folder, i)} holds {len(s['labels'])} images, the manifest {c}: delete the "
                             f"shard and rerun `prepare`")
    return shards, meta


def synthetic(n, res, classes=1000):
    """Random shards of the real layout, for --bench without a preparation."""
    g, h = torch.Generator().manual_seed(0), res // 8
    shard = dict(mean=torch.randn(n, 4, h, h, generator=g).half(), std=torch.full((n, 4, h, h), 0.05).half(),
                 images=torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8),
                 labels=torch.randint(0, classes, (n,), generator=g))
    return [shard], dict(classes=[str(c) for c in range(classes)], resolution=res, vae=None)


def gather(shards, starts, idx):
    """Global indices -> (mean, std, images, labels) stacked from the shards that hold them."""
    s = torch.searchsorted(starts, idx, right=True) - 1
    rows = list(zip(s.tolist(), (idx - starts[s]).tolist()))
    return [torch.stack([shards[a][k][b] for a, b in rows]) for k in ('mean', 'std', 'images', 'labels')]


@lru_cache(maxsize=1)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def global_batch(n, size, seed, step):
    """The dataset indices of a step's global batch: a function of (seed, step) only, so every rank agrees on it."""
    epoch, k = divmod(step, n // size)
    return epoch_order(n, seed, epoch)[k * size:(k + 1) * size]

# ----------------------------------------------------------------------------------------------------------------------
# 3. Measuring: analytic FLOPs and timestamps that do not wait for the GPU
# ----------------------------------------------------------------------------------------------------------------------

def sit_flops(cfg):
    """Training FLOPs per image of SiT, PaLM's rule (App. B): a matmul with W weights costs 2W per token forward and 4W
    backward; attention adds 4 N^2 D per block forward (QK^T and AV). Norms, activations and the per-image adaLN and
    embedders are left out. (Forward/2 for SiT-XL/2 = 118.4 G multiply-adds, DiT-XL/2's quoted 118.6 GFLOPs.)"""
    D, L, P, E = cfg.hidden_size, cfg.depth, cfg.projector_dim, cfg.encoder_dim
    N = (cfg.input_size // cfg.patch_size) ** 2 + (cfg.token != 'none')
    W = L * (4 + 2 * cfg.mlp_ratio) * D * D + 2 * D * cfg.in_channels * cfg.patch_size ** 2  # blocks, patchify, head
    W += (D * P + P * P + P * E) if cfg.repa else 0                                         # projector, every token
    return 3 * (2 * N * W + 4 * L * N * N * D + (4 * D * E if cfg.token in ('cls', 'mean') else 0))


def encoder_flops(enc):
    """Forward FLOPs per image of the frozen ViT encoder (same rule; it runs forward only)."""
    net = enc.net
    N = (enc.size // net.patch_embed.patch_size[0]) ** 2 + net.num_prefix_tokens
    return 2 * N * sum(p.numel() for p in net.blocks.parameters()) + 4 * len(net.blocks) * N * N * enc.dim


def stamp(device):
    """A timestamp that does not sync: a recorded CUDA event on GPUs, the host clock (ms) elsewhere."""
    if device.type != 'cuda':
        return time.perf_counter() * 1000
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def ms(a, b):
    return b - a if isinstance(a, float) else a.elapsed_time(b)

# ----------------------------------------------------------------------------------------------------------------------
# 4. Training
# ----------------------------------------------------------------------------------------------------------------------

def local_device(name):
    """--device, or under torchrun this process's GPU (LOCAL_RANK)."""
    device = reg.pick_device(name)
    if device.type == 'cuda' and 'LOCAL_RANK' in os.environ:
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    return device


@torch.no_grad()
def sample_grid(ema, vae, path, steps, device, n=16):
    """A fixed-noise grid of EMA samples (SDE, few steps, no CFG), decoded through the VAE."""
    from torchvision.utils import save_image
    cfg, g = ema.cfg, torch.Generator().manual_seed(0)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)
    cls = torch.randn(n, cfg.encoder_dim, generator=g).to(device) if ema.entangled else None
    torch.manual_seed(0)
    z, _ = reg.sample(ema, x, torch.arange(n, device=device) % cfg.num_classes, cls, steps=steps, null_label=cfg.num_classes)
    save_image((vae.decode(z / SCALE).sample + 1) / 2, path, nrow=int(math.sqrt(n)))


def train(args):
    rank, world, ddp = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)), 'RANK' in os.environ
    G = args.global_batch
    micro = args.micro_batch or G // world
    if G % (micro * world):
        raise SystemExit(f"--global-batch {G} is not a multiple of --micro-batch x processes ({micro} x {world}): pick a "
                         f"--micro-batch and a GPU count whose product divides {G}")
    device = local_device(args.device)
    if ddp:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True      # TF32 matmuls: free speed
    torch.manual_seed(args.seed)                                                        # same initial weights everywhere
    shards, meta = synthetic(G, args.resolution) if args.synthetic else load_prepared(args.data)
    starts = torch.tensor([0] + [len(s['labels']) for s in shards]).cumsum(0)
    n, latent = int(starts[-1]), meta['resolution'] // 8
    if n < G:
        raise SystemExit(f"the data holds {n} images, fewer than --global-batch {G}: lower it or prepare more classes")
    if args.preset not in reg.PRESETS:
        raise SystemExit(f"unknown --preset {args.preset!r}: choose one of {', '.join(reg.PRESETS)}")
    try:                                                                                # grid 16 -> 224 px (256), 448 (512)
        enc = reg.load_encoder(args.encoder, latent // reg.PRESETS[args.preset]['patch_size'], args.encoder_weights, device)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(str(e)) from None
    model = reg.make_model(args.preset, args.method, input_size=latent, num_classes=len(meta['classes']),
                           encoder_dim=enc.dim).to(device)
    ema = deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=0, eps=1e-8, fused=device.type == 'cuda')
    scaler = torch.amp.GradScaler('cuda') if args.precision == 'fp16' and device.type == 'cuda' else None
    run, state = (None, {}) if args.bench else (reg.Run(args.out), {})
    if run and reg.list_checkpoints(args.out) and not args.resume:
        raise SystemExit(f"{args.out!r} already holds checkpoints: pass --resume to continue, or another --out")
    if run and args.resume:
        state = run.resume(model, ema, opt, scaler)
    vae = load_vae(args.vae or meta['vae'], device) if rank == 0 and run and args.sample_every else None
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if run and rank == 0:
        os.makedirs(os.path.join(args.out, 'samples'), exist_ok=True)
    start = state.get('step', 0)
    total = start + 5 + args.bench if args.bench else args.steps                        # --bench: 5 warm-up steps first
    marks, times, clock = {}, [], (lambda: stamp(device)) if args.bench else (lambda: None)
    opt.register_step_pre_hook(lambda *_: marks.__setitem__('opt', clock()))

    def micro_loss(step, idx, pos):
        # Seeding from (seed, step, position in the global batch) makes every random draw (flip, posterior noise, and
        # reg_loss's t, noise, label dropout) independent of how the batch is split over ranks and micro-batches.
        torch.manual_seed((args.seed * 1_000_003 + step) * 1_000_003 + pos)
        mean, std, img, y = [t.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else t
                             for t in gather(shards, starts, idx)]
        flip = torch.rand(len(y), device=device).view(-1, 1, 1, 1) < 0.5                # the one augmentation (paper)
        mean, std, img = [torch.where(flip, a.flip(-1), a) for a in (mean, std, img)]
        x = (mean.float() + std.float() * torch.randn(mean.shape, device=device)) * SCALE  # resampled posterior (B, 4, h, w)
        with reg.autocast(device, args.precision):
            marks.setdefault('enc', []).append(clock())
            feats = enc(img)                                                           # (B, E), (B, T, E)
            marks['enc'].append(clock())
            return reg.reg_loss(model, x, y, feats, beta=args.beta, lam=args.lam)

    stop, handlers = [], {}
    def on_signal(sig, frame):                                                          # finish the step, save, exit
        stop.append(sig)
        signal.signal(signal.SIGINT, signal.default_int_handler)                        # a second Ctrl-C quits at once
    for sig in (signal.SIGINT, signal.SIGTERM):
        handlers[sig] = signal.signal(sig, on_signal)
    bar = tqdm(initial=start, total=total, unit='step', disable=rank > 0, dynamic_ncols=True)
    acc, rec, last = {}, {}, (start, time.perf_counter())
    try:
        for step in range(start, total):
            if step == total - args.bench and args.bench:
                torch.cuda.synchronize() if device.type == 'cuda' else None
                t_bench = time.perf_counter()
            lo = rank * (G // world)                                                    # this rank's slice of the batch
            idx = global_batch(n, G, args.seed, step)[lo:lo + G // world]
            marks.clear()
            marks['start'] = clock()
            out = reg.train_step(model, ema, opt, [partial(micro_loss, step, idx[j:j + micro], lo + j)
                                                   for j in range(0, len(idx), micro)], args.clip, args.ema, scaler)
            times += [(marks['start'], marks['enc'], marks['opt'], clock())] if args.bench else []
            acc = {k: acc.get(k, 0) + v.float() for k, v in out.items()}
            bar.update()
            done = step + 1
            if args.bench or not (done % args.log_every == 0 or done % args.ckpt_every == 0 or done == total
                                  or (stop and world == 1)):
                continue
            vals = torch.stack(list(acc.values()) + [torch.tensor(float(bool(stop)), device=device)]) / (done - last[0])
            if ddp:                                                                     # the log step's only syncs
                dist.all_reduce(vals)
            rec, acc = dict(zip(list(acc) + ['stop'], (vals / world).tolist())), {}
            now = time.perf_counter()
            rec['img_per_s'], last = (done - last[0]) * G / (now - last[1]), (done, now)
            if not all(math.isfinite(v) for v in rec.values()):
                raise SystemExit(f"non-finite loss or gradient by step {done} ({rec}); nothing saved. Resume from the "
                                 f"last checkpoint in {args.out!r} with a lower --lr, or --precision fp32")
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            if rank == 0:
                run.log(step=done, **{k: v for k, v in rec.items() if k != 'stop'})
                if done % args.ckpt_every == 0 or done == total or rec['stop']:
                    run.save(done, model, ema, opt, scaler, classes=meta['classes'], resolution=meta['resolution'],
                             vae=meta['vae'], args=vars(args))
                if vae is not None and done % args.sample_every == 0:
                    sample_grid(ema, vae, os.path.join(args.out, 'samples', f'{done:07d}.png'), args.sample_steps, device)
            if rec['stop']:
                bar.write(f"stopped by a signal after step {done}; the checkpoint is saved: continue with --resume")
                break
    finally:
        bar.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    if args.bench:
        torch.cuda.synchronize() if device.type == 'cuda' else None
        ips, per = args.bench * G / (time.perf_counter() - t_bench), np.array(
            [(ms(a, d), sum(ms(e[i], e[i + 1]) for i in range(0, len(e), 2)), ms(o, d)) for a, e, o, d in times[-args.bench:]])
        step_ms, enc_ms, opt_ms = per.mean(0)
        tflops = (sit_flops(reg.unwrap(model).cfg) + encoder_flops(enc)) * ips / world / 1e12
        rec = dict(images_per_s=ips, step_ms=step_ms, encoder_ms=enc_ms, fwd_bwd_ms=step_ms - enc_ms - opt_ms,
                   optimizer_ms=opt_ms, tflops_per_gpu=tflops, mfu=tflops / args.peak_tflops,
                   peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else float('nan'))
        if rank == 0:
            print(f"{args.preset} {meta['resolution']}px, {world} x {device.type}, batch {G} (micro {micro}): " +
                  ", ".join(f"{k} {v:.4g}" for k, v in rec.items()))
    if ddp:
        dist.destroy_process_group()
    return rec

# ----------------------------------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--device', default=None, help='default: cuda, then mps, then cpu; under torchrun cuda:LOCAL_RANK')
    common.add_argument('--resolution', type=int, default=256, help='image side: the paper trains 256 (and 512); '
                        'train reads it from the preparation unless --synthetic')
    common.add_argument('--vae', default=None, help=f"default {VAE} (the paper's; train: the preparation's), or a "
                        "local folder holding its config.json and weights (offline)")
    a = sub.add_parser('prepare', parents=[common], help='ImageFolder -> shards of centre crops + SD-VAE posteriors')
    a.add_argument('--data', required=True, help='ImageFolder root, <data>/<class>/<image> (ImageNet: its train folder)')
    a.add_argument('--out', required=True, help='folder for shard_NNNNN.pt files and manifest.json')
    a.add_argument('--classes', default=None, help="'N': the first N class folders (sorted); or 'n01440764,n01443537'; "
                   "default: all")
    a.add_argument('--shard-size', type=int, default=10_000, help='images per shard (10K at 256 px: 2.1 GB)')
    a.add_argument('--batch-size', type=int, default=64, help='images per VAE call (64 fits any GPU)')
    a.add_argument('--workers', type=int, default=8, help='processes that decode and crop images (0: in-process)')
    a.add_argument('--upscale', action='store_true', help='enlarge images smaller than --resolution bicubically (ADM '
                   'does; full ImageNet has some at 256, many at 512); default: refuse them, naming the file')
    t = sub.add_parser('train', parents=[common], help="train SiT + REG with the paper's recipe")
    t.add_argument('--data', default=None, help='a finished `prepare` folder')
    t.add_argument('--synthetic', action='store_true', help='random latents and images instead of --data (for --bench)')
    t.add_argument('--out', default='runs/imagenet', help='run folder: checkpoints, log.jsonl, samples/')
    t.add_argument('--preset', default='SiT-XL/2', help='paper: SiT-XL/2 (also B/2, L/2); SiT-Ti/2 is a CPU toy')
    t.add_argument('--method', default='reg', choices=list(reg.METHODS), help='paper: reg; others are its ablations')
    t.add_argument('--encoder', default='dinov2-b', help='paper: DINOv2-B/14 at 224 px (256) or 448 px (512)')
    t.add_argument('--encoder-weights', default=None, help="local weights file (offline); 'random' for tests and --bench")
    t.add_argument('--beta', type=float, default=0.03, help='class-token loss weight (paper 0.03)')
    t.add_argument('--lam', type=float, default=0.5, help='alignment loss weight lambda (paper 0.5)')
    t.add_argument('--lr', type=float, default=1e-4, help='AdamW learning rate (paper 1e-4, constant)')
    t.add_argument('--global-batch', type=int, default=256, help='images per optimiser step, all GPUs (paper 256)')
    t.add_argument('--micro-batch', type=int, default=None, help='images per GPU per pass; accumulation = global / '
                   '(micro x GPUs); default: global / GPUs')
    t.add_argument('--steps', type=int, default=400_000, help="optimiser steps (paper's tables: 400K; XL/2 best: 4M)")
    t.add_argument('--ema', type=float, default=0.9999, help='EMA decay, every step (paper 0.9999)')
    t.add_argument('--clip', type=float, default=1.0, help='gradient-norm clip (release: 1.0)')
    t.add_argument('--precision', default='bf16', choices=('bf16', 'fp16', 'fp32'), help='autocast on GPU (release: '
                   'fp16; bf16 is safer); CPU runs fp32')
    t.add_argument('--compile', action='store_true', help='torch.compile the model (off: easier to step through)')
    t.add_argument('--seed', type=int, default=0, help='fixes the data order and every random draw')
    t.add_argument('--resume', action='store_true', help='continue exactly from the latest checkpoint in --out')
    t.add_argument('--log-every', type=int, default=100, help='steps between log lines (the only host-GPU syncs)')
    t.add_argument('--ckpt-every', type=int, default=10_000, help='steps between checkpoints (last 3 kept)')
    t.add_argument('--sample-every', type=int, default=10_000, help='steps between EMA sample grids (0: none)')
    t.add_argument('--sample-steps', type=int, default=50, help='SDE steps for the grids (paper: 250, for FID)')
    t.add_argument('--bench', type=int, default=0, help='time N steps after 5 warm-up steps, print speed, save nothing')
    t.add_argument('--peak-tflops', type=float, default=989.0, help='GPU peak for MFU (H100 SXM dense bf16: 989)')
    return p


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parser().parse_args(args)
    if args.command == 'train' and not (args.data or args.synthetic):
        raise SystemExit('train needs --data (a `prepare` folder) or --synthetic')
    return prepare(args) if args.command == 'prepare' else train(args)


if __name__ == '__main__':
    main()
