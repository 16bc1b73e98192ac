"""
Train REG on ImageNet 256 or 512 in SD-VAE latent space (REG Sec. 4.1): a class subset on one GPU, or all of ImageNet on
many. Two subcommands:
  prepare  ImageFolder -> ADM centre crops + SD-VAE posteriors (mean, std), in a few shard files with a manifest.json.
           Resumable (finished shards are skipped); under torchrun each process encodes every WORLD_SIZE-th shard.
  train    the paper's recipe: SiT-XL/2, DINOv2-B, lambda 0.5, beta 0.03, AdamW 1e-4, global batch 256, EMA 0.9999.
           `python` on one GPU, `torchrun` for DDP; gradient accumulation keeps the global batch on fewer GPUs.

    python train_imagenet.py prepare --data ~/imagenet/train --out data/in10 --classes 10
    python train_imagenet.py train --data data/in10 --out runs/in10 --preset SiT-B/2 --micro-batch 128
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint HOST:29500 train_imagenet.py train --data data/in256 --out runs/xl
    python train_imagenet.py train --synthetic --bench 20 --preset SiT-B/2 --encoder-weights random   # speed only
"""
import argparse, json, math, os, signal, time
from copy import deepcopy
from functools import lru_cache, partial

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import reg
from train_cifar import sit_flops                             # one FLOP rule for both scripts

SCALE, VAE = 0.18215, 'stabilityai/sd-vae-ft-ema'            # the SD-VAE latent scale (LDM) and the paper's VAE
EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')

# ----------------------------------------------------------------------------------------------------------------------
# 1. Preparation: ADM centre crops -> SD-VAE posteriors, in shards
# ----------------------------------------------------------------------------------------------------------------------

def center_crop(img, res):
    """ADM's crop (guided-diffusion image_datasets.py, center_crop_arr): halve with a BOX filter while the short side is
    >= 2 res (cheap and alias-free), BICUBIC-resize the short side to res, cut the centre square -> uint8 (res, res, 3)."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    k = res / min(img.size)
    a = np.asarray(img.resize(tuple(round(s * k) for s in img.size), resample=Image.BICUBIC))
    top, left = (a.shape[0] - res) // 2, (a.shape[1] - res) // 2
    return a[top:top + res, left:left + res]


def load_crops(batch, res, upscale):
    """DataLoader collate, run in the workers: [(file, label)] -> (uint8 (B, 3, res, res), labels (B,), problem or '').
    A bad file comes back as a message naming it (an exception in a worker would bury it in a traceback)."""
    crops = []
    for path, _ in batch:
        try:
            with Image.open(path) as im:
                im = im.convert('RGB')
        except Exception as e:
            return None, None, f"cannot read image {path} ({type(e).__name__}: {e}): delete or replace the file"
        if min(im.size) < res and not upscale:
            return None, None, (f"image {path} is {im.size[0]}x{im.size[1]}, smaller than --resolution {res}: pass "
                                f"--upscale to enlarge such images bicubically (as ADM does), or remove the file")
        crops.append(torch.from_numpy(center_crop(im, res).copy()).permute(2, 0, 1))
    return torch.stack(crops), torch.tensor([y for _, y in batch]), ''


def load_vae(name, device):
    """The SD-VAE as a frozen diffusers AutoencoderKL, from a hub name or a local folder (offline)."""
    try:
        from diffusers import AutoencoderKL
        return AutoencoderKL.from_pretrained(name).to(device).eval().requires_grad_(False)
    except Exception as e:                                     # no diffusers, offline, a wrong folder
        raise SystemExit(f"no SD-VAE from {name!r} ({type(e).__name__}: {str(e)[:150]}). It needs diffusers (pip install "
                         f"diffusers); offline, download config.json and diffusion_pytorch_model.safetensors of "
                         f"https://huggingface.co/{VAE} into a folder and pass it as --vae FOLDER") from None


def list_images(root, classes=None):
    """-> (class names, [(file, label)]) of an ImageFolder; `classes` 'N' keeps the first N sorted names, 'a,b' those."""
    found = sorted(e.name for e in os.scandir(root) if e.is_dir()) if os.path.isdir(root) else []
    if not found:
        raise SystemExit(f"--data {root!r} is not an ImageFolder (no class folders): pass a folder laid out as "
                         f"<data>/<class>/<image>, such as ImageNet's train folder")
    if classes and (missing := [c for c in classes.split(',') if c not in found and not classes.isdigit()]):
        raise SystemExit(f"--classes names folders that {root!r} lacks: {', '.join(missing[:5])}")
    found = found[:int(classes)] if classes and classes.isdigit() else sorted(classes.split(',')) if classes else found
    files = [(os.path.join(root, c, f), y) for y, c in enumerate(found)
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(EXTS)]
    if not files:
        raise SystemExit(f"no images ({', '.join(EXTS)}) in the class folders of {root!r}")
    return found, files


def shard_path(folder, i):
    return os.path.join(folder, f'shard_{i:05d}.pt')


def write_manifest(out, plan, rank):
    """manifest.json = the plan + the shards on disk. Shards are written atomically, so their presence is the truth;
    several ranks may rewrite this file, each through its own temporary name."""
    done = [i for i in range(len(plan['counts'])) if os.path.exists(shard_path(out, i))]
    with open(tmp := os.path.join(out, f'.manifest.{rank}.tmp'), 'w') as f:
        json.dump({**plan, 'done': done, 'complete': len(done) == len(plan['counts'])}, f, indent=1)
    os.replace(tmp, os.path.join(out, 'manifest.json'))


def prepare(args):
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device, (classes, files), size = local_device(args.device), list_images(args.data, args.classes), args.shard_size
    plan = dict(classes=classes, resolution=args.resolution, vae=args.vae or VAE, images=len(files),
                counts=[min(size, len(files) - s) for s in range(0, len(files), size)])
    m = os.path.join(args.out, 'manifest.json')
    if os.path.isfile(m) and {k: v for k, v in json.load(open(m)).items() if k in plan} != plan:
        raise SystemExit(f"{args.out!r} holds another preparation (classes, --resolution, --vae or --shard-size differ): "
                         f"pass another --out, or delete that folder")
    os.makedirs(args.out, exist_ok=True)
    todo = [i for i in range(rank, len(plan['counts']), world) if not os.path.exists(shard_path(args.out, i))]
    write_manifest(args.out, plan, rank)
    vae = load_vae(plan['vae'], device) if todo else None
    bar = tqdm(total=sum(plan['counts'][i] for i in todo), unit='img', disable=rank > 0, desc='prepare')
    for i in todo:
        parts = dict(mean=[], std=[], images=[], labels=[])    # mean, std: fp16 (N, 4, res/8, res/8); images: uint8
        for img, y, problem in torch.utils.data.DataLoader(files[i * size:(i + 1) * size], args.batch_size,
                num_workers=args.workers, collate_fn=partial(load_crops, res=args.resolution, upscale=args.upscale)):
            if problem:
                raise SystemExit(problem)
            with torch.no_grad():
                post = vae.encode(img.to(device).float() / 127.5 - 1).latent_dist          # the VAE takes [-1, 1]
            for k, v in zip(parts, (post.mean.half(), post.std.half(), img, y)):
                parts[k].append(v.cpu())
            bar.update(len(img))
        reg.save_checkpoint(shard_path(args.out, i), {k: torch.cat(v) for k, v in parts.items()})
        write_manifest(args.out, plan, rank)
    bar.close()

# ----------------------------------------------------------------------------------------------------------------------
# 2. Training data: memory-mapped shards, a global batch fixed by (seed, step)
# ----------------------------------------------------------------------------------------------------------------------

def load_prepared(folder):
    """The shards of a finished preparation, memory-mapped (full ImageNet need not fit in RAM); refuses a partial one."""
    if not os.path.isfile(m := os.path.join(folder, 'manifest.json')):
        raise SystemExit(f"{folder!r} has no manifest.json: run `python train_imagenet.py prepare --out {folder}` first")
    meta = json.load(open(m))
    if missing := [i for i in range(len(meta['counts'])) if not os.path.exists(shard_path(folder, i))]:
        raise SystemExit(f"the preparation in {folder!r} is incomplete ({len(missing)} of {len(meta['counts'])} shards "
                         f"missing, e.g. {shard_path(folder, missing[0])}): rerun the same `prepare` command to finish it")
    shards = [torch.load(shard_path(folder, i), mmap=True, weights_only=True) for i in range(len(meta['counts']))]
    for i, (s, c) in enumerate(zip(shards, meta['counts'])):
        if len(s['labels']) != c:
            raise SystemExit(f"{shard_path(folder, i)} holds {len(s['labels'])} images, the manifest says {c}: delete "
                             f"the shard and rerun `prepare`")
    return shards, meta


def synthetic(n, res, classes=1000):
    """Random data in the shards' layout, for --bench without a preparation."""
    g, h = torch.Generator().manual_seed(0), res // 8
    return [dict(mean=torch.randn(n, 4, h, h, generator=g).half(), std=torch.full((n, 4, h, h), 0.05).half(),
                 images=torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8),
                 labels=torch.randint(0, classes, (n,), generator=g))], dict(classes=list(range(classes)), resolution=res, vae=None)


def gather(shards, starts, idx):
    """Global indices -> [posterior mean, std, images, labels], each stacked from the shards that hold them."""
    s = torch.searchsorted(starts, idx, right=True) - 1
    rows = list(zip(s.tolist(), (idx - starts[s]).tolist()))
    return [torch.stack([shards[a][k][b] for a, b in rows]) for k in ('mean', 'std', 'images', 'labels')]


@lru_cache(maxsize=1)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def global_batch(n, size, seed, step):
    """The dataset indices of a step's global batch: a function of (seed, step) only, so all ranks agree on it."""
    epoch, k = divmod(step, n // size)
    return epoch_order(n, seed, epoch)[k * size:(k + 1) * size]

# ----------------------------------------------------------------------------------------------------------------------
# 3. Measuring: analytic FLOPs, timestamps that do not wait for the GPU
# ----------------------------------------------------------------------------------------------------------------------

def encoder_flops(enc):
    """Forward FLOPs per image of a frozen ViT encoder, by train_cifar.sit_flops' rule (2 per multiply-add, attention's
    QK^T and AV included, norms and elementwise ops not); 0 for a CNN. The SiT's training FLOPs are 3 x its forward."""
    net, N = enc.net, (enc.size // enc.net.patch_embed.patch_size[0]) ** 2 + enc.net.num_prefix_tokens if enc.vit else 0
    return 2 * N * sum(p.numel() for p in net.blocks.parameters()) + 4 * len(net.blocks) * N * N * enc.dim if N else 0


def stamp(device):
    """A timestamp that does not sync: a recorded CUDA event on GPUs, the host clock in ms elsewhere."""
    return time.perf_counter() * 1e3 if device.type != 'cuda' else (e := torch.cuda.Event(enable_timing=True)).record() or e


def ms(a, b):
    return b - a if isinstance(a, float) else a.elapsed_time(b)

# ----------------------------------------------------------------------------------------------------------------------
# 4. Training
# ----------------------------------------------------------------------------------------------------------------------

def local_device(name):
    """--device, or under torchrun this process's GPU (LOCAL_RANK)."""
    device = reg.pick_device(name)
    if device.type == 'cuda' and 'LOCAL_RANK' in os.environ:
        torch.cuda.set_device(device := torch.device('cuda', int(os.environ['LOCAL_RANK'])))
    return device


@torch.no_grad()
def sample_grid(ema, vae, path, steps, device, n=16):
    """A grid of EMA samples from fixed noise (SDE, few steps, no CFG), decoded through the VAE."""
    from torchvision.utils import save_image
    cfg, g = ema.cfg, torch.Generator().manual_seed(0)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)
    cls = torch.randn(n, cfg.encoder_dim, generator=g).to(device) if ema.entangled else None
    torch.manual_seed(0)                                       # training re-seeds its draws, so this perturbs nothing
    z, _ = reg.sample(ema, x, torch.arange(n, device=device) % cfg.num_classes, cls, steps=steps, null_label=cfg.num_classes)
    save_image((vae.decode(z / SCALE).sample + 1) / 2, path, nrow=int(math.sqrt(n)))


def train(args):
    rank, world, ddp = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)), 'RANK' in os.environ
    G = args.global_batch
    if G % ((micro := args.micro_batch or G // world) * world):
        raise SystemExit(f"--global-batch {G} is not a multiple of --micro-batch x processes ({micro} x {world}): pick a "
                         f"--micro-batch and a GPU count whose product divides {G}")
    device = local_device(args.device)
    cuda = device.type == 'cuda'
    dist.init_process_group('nccl' if cuda else 'gloo') if ddp else None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True       # TF32 matmuls: free speed
    shards, meta = synthetic(G, args.resolution) if args.synthetic else load_prepared(args.data)
    starts = torch.tensor([0] + [len(s['labels']) for s in shards]).cumsum(0)
    if (n := int(starts[-1])) < G:
        raise SystemExit(f"the data holds {n} images, fewer than --global-batch {G}: lower it or prepare more classes")
    latent, patch = meta['resolution'] // 8, reg.PRESETS[args.preset]['patch_size']
    torch.manual_seed(args.seed)                               # a 'random' encoder is the same on every rank
    enc = reg.load_encoder(args.encoder, latent // patch, args.encoder_weights, device)   # grid 16: 224 px (448 at 512)
    torch.manual_seed(args.seed)                               # the init does not depend on the encoder's draws
    model = reg.make_model(args.preset, args.method, input_size=latent, num_classes=len(meta['classes']),
                           encoder_dim=enc.dim).to(device)
    ema = deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=0, eps=1e-8, fused=cuda)
    scaler = torch.amp.GradScaler('cuda') if args.precision == 'fp16' and cuda else None
    run = None if args.bench else reg.Run(args.out)
    if run and reg.list_checkpoints(args.out) and not args.resume:
        raise SystemExit(f"{args.out!r} holds checkpoints already: pass --resume to continue that run, or another --out")
    state = run.resume(model, ema, opt, scaler) if run and args.resume else {}
    vae = load_vae(args.vae or meta['vae'], device) if rank == 0 and run and args.sample_every else None
    model = torch.compile(model) if args.compile else model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    start = state.get('step', 0)
    total = start + args.warmup + args.bench if args.bench else args.steps
    marks, times, clock = {}, [], (lambda: stamp(device)) if args.bench else (lambda: None)
    opt.register_step_pre_hook(lambda *_: marks.__setitem__('opt', clock()))        # --bench: where the optimiser starts

    def micro_loss(step, idx, pos):
        # Seeded by (seed, step, position in the global batch): the draws (flip, posterior noise, and reg_loss's t, noise
        # and label dropout) are the same however the global batch is spread over ranks (at equal --micro-batch).
        torch.manual_seed((args.seed * 1_000_003 + step) * 1_000_003 + pos)
        mean, std, img, y = [t.pin_memory().to(device, non_blocking=True) if cuda else t for t in gather(shards, starts, idx)]
        flip = torch.rand(len(y), device=device).view(-1, 1, 1, 1) < 0.5                 # the one augmentation (paper)
        mean, std, img = [torch.where(flip, a.flip(-1), a) for a in (mean, std, img)]     # image and posterior together
        x = (mean.float() + std.float() * torch.randn(mean.shape, device=device)) * SCALE  # a fresh latent (B, 4, h, w)
        with reg.autocast(device, args.precision):
            marks.setdefault('enc', []).append(clock())
            feats = enc(img)                                                               # (B, E), (B, T, E)
            marks['enc'].append(clock())
            return reg.reg_loss(model, x, y, feats, beta=args.beta, lam=args.lam)

    stop = []
    def on_signal(*_):                                         # Ctrl-C / SIGTERM: finish the step, save, exit
        stop.append(signal.signal(signal.SIGINT, signal.default_int_handler))            # a second Ctrl-C quits now
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(initial=start, total=total, unit='step', disable=rank > 0, dynamic_ncols=True)
    acc, rec, last = {}, {}, (start, time.perf_counter())
    try:
        for step in range(start, total):
            if args.bench and step == total - args.bench:
                t_bench = (torch.cuda.synchronize() if cuda else None) or time.perf_counter()
            lo = rank * (G // world)                                                       # this rank's slice
            idx, marks['enc'], marks['start'] = global_batch(n, G, args.seed, step)[lo:lo + G // world], [], clock()
            out = reg.train_step(model, ema, opt, [partial(micro_loss, step, idx[j:j + micro], lo + j)
                                                   for j in range(0, len(idx), micro)], args.clip, args.ema, scaler)
            times += [(marks['start'], marks['enc'], marks['opt'], clock())] if args.bench else []
            acc, done, _ = {k: acc.get(k, 0) + v.float() for k, v in out.items()}, step + 1, bar.update()
            if args.bench or not (done % args.log_every == 0 or done % args.ckpt_every == 0 or done == total
                                  or stop and world == 1):     # under DDP all ranks must agree to stop: at log steps
                continue
            vals = torch.stack([*acc.values(), torch.tensor(float(bool(stop)), device=device)]) / (done - last[0])
            dist.all_reduce(vals) if ddp else None                                          # the loop's only syncs
            rec, acc, now = dict(zip([*acc, 'stop'], (vals / world).tolist())), {}, time.perf_counter()
            rec['img_per_s'], last = (done - last[0]) * G / (now - last[1]), (done, now)
            if not all(map(math.isfinite, rec.values())):
                raise SystemExit(f"the loss or gradient became non-finite by step {done} ({rec}); nothing saved. Resume "
                                 f"from the last checkpoint in {args.out!r} with a lower --lr, or --precision fp32")
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            if rank == 0:
                run.log(step=done, **{k: v for k, v in rec.items() if k != 'stop'})
                if done % args.ckpt_every == 0 or done == total or rec['stop']:
                    run.save(done, model, ema, opt, scaler, classes=meta['classes'], resolution=meta['resolution'],
                             vae=meta['vae'], args=vars(args))
                if vae is not None and done % args.sample_every == 0:
                    os.makedirs(os.path.join(args.out, 'samples'), exist_ok=True)
                    sample_grid(ema, vae, os.path.join(args.out, 'samples', f'{done:07d}.png'), args.sample_steps, device)
            if rec['stop']:
                bar.write(f"stopped after step {done}, checkpoint saved: continue with --resume")
                break
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if args.bench:                                             # per step: start, encoder pairs, optimiser start, end
        ips = args.bench * G / ((torch.cuda.synchronize() if cuda else None) or time.perf_counter() - t_bench)
        t = np.array([(ms(a, d), sum(map(ms, e[::2], e[1::2])), ms(o, d)) for a, e, o, d in times[-args.bench:]]).mean(0)
        tflops = (3 * sit_flops(reg.unwrap(model).cfg, reg.unwrap(model).extra) + encoder_flops(enc)) * ips / world / 1e12
        rec = dict(images_per_s=ips, step_ms=t[0], encoder_ms=t[1], fwd_bwd_ms=t[0] - t[1] - t[2], optimizer_ms=t[2],
                   tflops_per_gpu=tflops, mfu=tflops / args.peak_tflops,
                   peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float('nan'))
        print(f"bench {args.preset} {meta['resolution']}px, {world} x {device.type}, batch {G} (micro {micro}): "
              + ", ".join(f"{k} {v:.4g}" for k, v in rec.items())) if rank == 0 else None
    dist.destroy_process_group() if ddp else None
    return rec

# ----------------------------------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub, common = p.add_subparsers(dest='command', required=True), argparse.ArgumentParser(add_help=False)
    common.add_argument('--device', default=None, help='default: cuda, then mps, then cpu; under torchrun cuda:LOCAL_RANK')
    common.add_argument('--resolution', type=int, default=256, help='image side; the paper: 256 (and 512). train reads '
                        'it from the preparation unless --synthetic')
    common.add_argument('--vae', default=None, help=f"default {VAE} (the paper's; train: the preparation's), or a local "
                        "folder with its config.json and weights (offline)")
    a = sub.add_parser('prepare', parents=[common], help='ImageFolder -> shards of centre crops + SD-VAE posteriors').add_argument
    a('--data', required=True, help='ImageFolder root, <data>/<class>/<image> (ImageNet: its train folder)')
    a('--out', required=True, help='folder for shard_NNNNN.pt files and manifest.json')
    a('--classes', default=None, help="'N': the first N class folders (sorted); or 'n01440764,n01443537'; default: all")
    a('--shard-size', type=int, default=10_000, help='images per shard; default 10K (2.1 GB at 256 px)')
    a('--batch-size', type=int, default=64, help='images per VAE call; default 64 (fits any GPU)')
    a('--workers', type=int, default=8, help='processes that decode and crop images; default 8 (0: in-process)')
    a('--upscale', action='store_true', help='enlarge images smaller than --resolution (ADM does; ImageNet has some at '
      '256, many at 512); default: refuse them, naming the file')
    a = sub.add_parser('train', parents=[common], help="train REG with the paper's recipe").add_argument
    a('--data', default=None, help='a finished `prepare` folder')
    a('--synthetic', action='store_true', help='random latents and images instead of --data (for --bench)')
    a('--out', default='runs/imagenet', help='run folder: checkpoints, log.jsonl, samples/; default runs/imagenet')
    a('--preset', default='SiT-XL/2', choices=list(reg.PRESETS), help="default SiT-XL/2 (the paper's best; B/2, L/2 too)")
    a('--method', default='reg', choices=list(reg.METHODS), help='reg (the paper), or a baseline / REG Sec. 4.3 ablation')
    a('--encoder', default='dinov2-b', help='frozen encoder; paper: DINOv2-B/14 (at 224 px for 256, 448 px for 512)')
    a('--encoder-weights', default=None, help="a local weights file (offline), 'random' (tests, --bench); default: hub")
    a('--beta', type=float, default=0.03, help='token loss weight (REG Eq. 9; paper 0.03)')
    a('--lam', type=float, default=0.5, help='alignment loss weight (REG Eq. 9; paper 0.5)')
    a('--lr', type=float, default=1e-4, help='AdamW learning rate, constant (paper 1e-4; betas 0.9/0.999, no decay)')
    a('--global-batch', type=int, default=256, help='images per optimiser step over all GPUs (paper 256)')
    a('--micro-batch', type=int, default=None, help='images per GPU per pass; accumulation = global / (micro x GPUs); '
      'default global / GPUs. Runs are equal across GPU counts at equal --micro-batch')
    a('--steps', type=int, default=400_000, help="optimiser steps; default 400K (the paper's tables; XL/2 best: 4M)")
    a('--ema', type=float, default=0.9999, help='EMA decay, every step (paper 0.9999)')
    a('--clip', type=float, default=1.0, help='gradient-norm clip (the release: 1.0)')
    a('--precision', default='bf16', choices=('bf16', 'fp16', 'fp32'), help='GPU autocast; the release used fp16, '
      'bf16 is safer; CPU runs fp32')
    a('--compile', action='store_true', help='torch.compile the SiT (off by default, so it can be stepped through)')
    a('--seed', type=int, default=0, help='fixes the init, the data order and every random draw; default 0')
    a('--resume', action='store_true', help='continue the latest checkpoint in --out, exactly')
    a('--log-every', type=int, default=100, help="steps between log.jsonl records (the loop's only syncs); default 100")
    a('--ckpt-every', type=int, default=10_000, help='steps between checkpoints (also at the end and on Ctrl-C; 3 kept)')
    a('--sample-every', type=int, default=10_000, help='steps between EMA sample grids; default 10K, 0 = off')
    a('--sample-steps', type=int, default=50, help="SDE steps for the grids; default 50 (the paper's 250 is for FID)")
    a('--bench', type=int, default=0, help='time N steps after --warmup steps, print the speed, save nothing')
    a('--warmup', type=int, default=5, help='untimed --bench steps first (compile, autotune); default 5')
    a('--peak-tflops', type=float, default=989.0, help='GPU peak for the MFU; default 989 (H100/H200 SXM, dense bf16)')
    return p


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parser().parse_args(args)
    if args.command == 'train' and not (args.data or args.synthetic):
        raise SystemExit('train needs --data (a `prepare` folder) or --synthetic')
    try:
        return prepare(args) if args.command == 'prepare' else train(args)
    except (ValueError, RuntimeError) as e:                    # reg raises these with messages that name the fix
        raise SystemExit(f"error: {e}") from None


if __name__ == '__main__':
    main()
