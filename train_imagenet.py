"""
Train REG on ImageNet 256 or 512 in SD-VAE latent space (REG Sec. 4), from a class subset on one GPU to many nodes.
  prepare  ImageFolder -> ADM centre crops + SD-VAE posteriors (mean, std) in shards with a manifest.json; resumable
           (finished shards are skipped); under torchrun each process encodes every WORLD_SIZE-th shard.
  train    the paper's recipe: SiT-XL/2, DINOv2-B, lambda 0.5, beta 0.03, AdamW 1e-4, global batch 256, EMA 0.9999.
           `python` on one GPU, `torchrun` for DDP; gradient accumulation keeps the global batch on fewer GPUs.
    python train_imagenet.py prepare --data ~/imagenet/train --out data/in10 --classes 10
    python train_imagenet.py train --data data/in10 --out runs/in10 --preset SiT-B/2 --micro-batch 128
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint HOST:29500 train_imagenet.py train --data data/in256
"""
import argparse, copy, json, math, os, signal, time
from functools import lru_cache, partial

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import reg
from sample import load_vae                                # imports diffusers only when called

SCALE, VAE = 0.18215, 'stabilityai/sd-vae-ft-ema'        # the SD-VAE latent scale (LDM) and the paper's VAE
EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
MUST_MATCH = ('method', 'encoder', 'beta', 'lam', 'lr', 'global_batch', 'ema', 'seed')  # equal on --resume

def center_crop(img, res):
    """ADM's crop (guided-diffusion image_datasets.py, center_crop_arr): halve with a BOX filter while the short side
    is >= 2 res (cheap, alias-free), BICUBIC-resize the short side to res, cut the centre -> uint8 (res, res, 3)."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    a = np.asarray(img.resize(tuple(round(s * res / min(img.size)) for s in img.size), resample=Image.BICUBIC))
    top, left = (a.shape[0] - res) // 2, (a.shape[1] - res) // 2
    return a[top:top + res, left:left + res]

def load_crops(batch, res, upscale):
    """DataLoader collate, run in the workers: [(file, label)] -> (uint8 (B, 3, res, res), labels (B,), problem or '').
    A bad file comes back as a message naming it: an exception in a worker would bury it in a traceback."""
    crops = []
    for path, _ in batch:
        try:
            if min((im := Image.open(path).convert('RGB')).size) < res and not upscale:
                raise ValueError(f"it is {im.size[0]}x{im.size[1]}, smaller than --resolution {res}: pass --upscale to "
                                 f"enlarge such images bicubically (as ADM does), or remove the file")
        except Exception as e:                             # unreadable, or too small
            return None, None, f"image {path}: {e}"
        crops.append(torch.from_numpy(center_crop(im, res).copy()).permute(2, 0, 1))
    return torch.stack(crops), torch.tensor([y for _, y in batch]), ''

def list_images(root, classes=None):
    """-> (class names, [(file, label)]) of an ImageFolder; `classes`: 'N' = the first N sorted names, 'a,b' = those."""
    if not (found := sorted(e.name for e in os.scandir(root) if e.is_dir()) if os.path.isdir(root) else []):
        raise SystemExit(f"--data {root!r} is not an ImageFolder (no class folders): pass a folder laid out as "
                         f"<data>/<class>/<image>, such as ImageNet's train folder")
    if classes and not classes.isdigit() and (missing := sorted(set(classes.split(',')) - set(found))):
        raise SystemExit(f"--classes names folders that {root!r} lacks: {', '.join(missing[:5])}")
    found = found[:int(classes)] if classes and classes.isdigit() else sorted(classes.split(',')) if classes else found
    if not (files := [(os.path.join(root, c, f), y) for y, c in enumerate(found)
                      for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(EXTS)]):
        raise SystemExit(f"no images ({', '.join(EXTS)}) in the class folders of {root!r}")
    return found, files

def write_manifest(out, plan, rank):
    """manifest.json = the plan + the shards on disk (each written atomically, so its presence is the truth)."""
    done = [f for f in plan['shards'] if os.path.exists(os.path.join(out, f))]
    with open(tmp := os.path.join(out, f'.manifest.{rank}.tmp'), 'w') as f:      # ranks may write it at once
        json.dump({**plan, 'done': done, 'complete': len(done) == len(plan['shards'])}, f, indent=1)
    os.replace(tmp, os.path.join(out, 'manifest.json'))

def prepare(args):
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device, (classes, files), size = reg.pick_device(args.device), list_images(args.data, args.classes), args.shard_size
    plan = dict(classes=classes, resolution=args.resolution, vae=args.vae or VAE, images=len(files),
                counts=[min(size, len(files) - s) for s in range(0, len(files), size)])
    plan['shards'] = [f'shard_{i:05d}.pt' for i in range(len(plan['counts']))]
    if os.path.isfile(m := os.path.join(args.out, 'manifest.json')) and \
            {k: v for k, v in json.load(open(m)).items() if k in plan} != plan:  # classes, resolution, VAE, shard size
        raise SystemExit(f"{args.out!r} holds another preparation: pass another --out, or delete that folder")
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, f) for f in plan['shards']]
    todo = [i for i in range(rank, len(paths), world) if not os.path.exists(paths[i])]
    write_manifest(args.out, plan, rank)
    vae = load_vae(plan['vae'], device) if todo else None
    bar = tqdm(total=sum(plan['counts'][i] for i in todo), unit='img', disable=rank > 0, desc='prepare')
    for i in todo:
        parts = []
        for img, y, problem in torch.utils.data.DataLoader(files[i * size:(i + 1) * size], args.batch_size,
                num_workers=args.workers, collate_fn=partial(load_crops, res=args.resolution, upscale=args.upscale)):
            if problem:
                raise SystemExit(problem)
            with torch.no_grad():
                post = vae.encode(img.to(device).float() / 127.5 - 1).latent_dist      # the VAE takes [-1, 1]
            parts.append((post.mean.half().cpu(), post.std.half().cpu(), img, y))     # (B, 4, res/8, res/8) fp16
            bar.update(len(img))
        reg.save_checkpoint(paths[i], dict(zip(('mean', 'std', 'images', 'labels'), map(torch.cat, zip(*parts)))))
        write_manifest(args.out, plan, rank)

def load_prepared(folder):
    """The shards of a finished preparation, memory-mapped (ImageNet need not fit in RAM); refuses a partial one."""
    if not os.path.isfile(m := os.path.join(folder, 'manifest.json')):
        raise SystemExit(f"{folder!r} has no manifest.json: run `train_imagenet.py prepare --out {folder}` first")
    meta = json.load(open(m))
    paths = [os.path.join(folder, f) for f in meta['shards']]
    if missing := [p for p in paths if not os.path.exists(p)]:
        raise SystemExit(f"the preparation in {folder!r} is incomplete ({len(missing)} of {len(paths)} shards missing, "
                         f"e.g. {missing[0]}): rerun the same `prepare` command to finish it")
    shards = [torch.load(p, mmap=True, weights_only=True) for p in paths]
    if bad := [p for p, s, c in zip(paths, shards, meta['counts']) if len(s['labels']) != c]:
        raise SystemExit(f"{bad[0]} holds another number of images than the manifest says: delete it, rerun `prepare`")
    return shards, meta

def synthetic(n, res, classes=1000):
    """Random data in the shards' layout, for --bench without a preparation."""
    g, h = torch.Generator().manual_seed(0), res // 8
    return [dict(mean=torch.randn(n, 4, h, h, generator=g).half(), std=torch.full((n, 4, h, h), 0.05).half(),
                 images=torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8),
                 labels=torch.randint(0, classes, (n,), generator=g))], dict(classes=[*range(classes)], resolution=res)

@lru_cache(maxsize=1)
def epoch_order(n, seed, epoch):
    """The data order of an epoch, from (seed, epoch) only: every rank computes the same global batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

def encoder_flops(enc):
    """Forward FLOPs per image of the frozen ViT by reg.model_flops' rule; 0 for a CNN or no encoder (plain SiT)."""
    if not (enc and enc.vit):
        return 0
    net, N = enc.net, (enc.size // enc.net.patch_embed.patch_size[0]) ** 2 + enc.net.num_prefix_tokens
    return 2 * N * sum(p.numel() for p in net.blocks.parameters()) + 4 * len(net.blocks) * N * N * enc.dim

@torch.no_grad()
def sample_grid(ema, vae, path, steps, device, n=16):
    """A grid of EMA samples from fixed noise (SDE, few steps, no CFG), decoded through the VAE."""
    from torchvision.utils import save_image
    cfg, g = ema.cfg, torch.Generator().manual_seed(0)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)
    cls = torch.randn(n, cfg.encoder_dim, generator=g).to(device) if ema.entangled else None
    torch.manual_seed(0)                                   # training re-seeds its draws, so this perturbs nothing
    z, _ = reg.sample(ema, x, torch.arange(n, device=device) % cfg.num_classes, cls, steps, null_label=cfg.num_classes)
    save_image((vae.decode(z / SCALE).sample + 1) / 2, path, nrow=int(math.sqrt(n)))

def train(args):
    rank, world, ddp = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)), 'RANK' in os.environ
    if (G := args.global_batch) % ((micro := args.micro_batch or max(1, G // world)) * world):
        raise SystemExit(f"--global-batch {G} is not a multiple of --micro-batch x processes ({micro} x {world}): "
                         f"pick a --micro-batch and a GPU count whose product divides {G}")
    cuda = (device := reg.pick_device(args.device)).type == 'cuda'
    if ddp:
        dist.init_process_group('nccl' if cuda else 'gloo')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # TF32 matmuls: free speed
    shards, meta = synthetic(G, args.resolution) if args.synthetic else load_prepared(args.data)
    if (n := int((starts := torch.tensor([0] + [len(s['labels']) for s in shards]).cumsum(0))[-1])) < G:
        raise SystemExit(f"the data holds {n} images, fewer than --global-batch {G}: lower it or prepare more classes")
    torch.manual_seed(args.seed)                           # a 'random' encoder is the same on every rank
    grid = (latent := meta['resolution'] // 8) // reg.PRESETS[args.preset]['patch_size']  # DINOv2 at 224 px for 256 px
    enc = reg.load_encoder(args.encoder, grid, args.encoder_weights, device) if args.method != 'sit' else None  # (448: 512)
    torch.manual_seed(args.seed)                           # the init does not depend on the encoder's draws
    model = reg.make_model(args.preset, args.method, input_size=latent, num_classes=len(meta['classes']),
                           encoder_dim=enc.dim if enc else 768).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=0, eps=1e-8, fused=cuda)
    scaler = torch.amp.GradScaler('cuda') if args.precision == 'fp16' and cuda else None
    run = None if args.bench or rank else reg.Run(args.out)                          # only rank 0 writes files
    if (found := [] if args.bench else reg.list_checkpoints(args.out)) and not args.resume:
        raise SystemExit(f"{args.out!r} holds checkpoints already: pass --resume to continue it, or another --out")
    state = (run.resume(model, ema, opt, scaler, must_match={k: getattr(args, k) for k in MUST_MATCH}) if run else
             reg.load_checkpoint(found[-1])) if found else {}  # rank 0 also checks the flags and trims the log
    if found and not run:                                  # other ranks: DDP copies the weights from rank 0
        opt.load_state_dict(state['opt']), scaler and scaler.load_state_dict(state['scaler'])
    start = state.get('step', 0)
    vae = load_vae(args.vae or meta.get('vae'), device) if run and args.sample_every else None
    model = torch.compile(model) if args.compile else model
    model = torch.nn.parallel.DistributedDataParallel(model) if ddp else model          # on the current device
    total = start + args.warmup + args.bench if args.bench else args.steps
    marks, times, event = {}, [], lambda: (e := torch.cuda.Event(enable_timing=True)).record() or e  # does not sync
    clock = (event if cuda else lambda: time.perf_counter() * 1e3) if args.bench else lambda: None
    opt.register_step_pre_hook(lambda *_: marks.__setitem__('opt', clock()))    # --bench: where the optimiser starts
    def micro_loss(step, idx, pos):
        # Seeded by (seed, step, position in the global batch): the same draws however the batch is spread over ranks
        torch.manual_seed((args.seed * 1_000_003 + step) * 1_000_003 + pos)
        s = torch.searchsorted(starts, idx, right=True) - 1                           # the shard of each image
        rows = list(zip(s.tolist(), (idx - starts[s]).tolist()))                      # (shard, row) pairs
        batch = [torch.stack([shards[a][k][b] for a, b in rows]) for k in ('mean', 'std', 'images', 'labels')]
        mean, std, img, y = [t.pin_memory().to(device, non_blocking=True) if cuda else t for t in batch]
        flip = torch.rand(len(y), device=device).view(-1, 1, 1, 1) < 0.5             # the one augmentation (paper)
        mean, std, img = [torch.where(flip, a.flip(-1), a) for a in (mean, std, img)] # image and posterior together
        x = (mean.float() + std.float() * torch.randn(mean.shape, device=device)) * SCALE  # a fresh latent (B, 4, h, w)
        with reg.autocast(device, args.precision):
            marks['enc'] += [clock()]
            feats = enc(img) if enc else None                                          # (B, E), (B, T, E)
            marks['enc'] += [clock()]
            return reg.reg_loss(model, x, y, feats, beta=args.beta, lam=args.lam)
    stop = []                                              # Ctrl-C / SIGTERM: finish the step, save, exit
    handlers = {s: signal.signal(s, lambda *_: stop.append(signal.signal(signal.SIGINT, signal.default_int_handler)))
                for s in (signal.SIGINT, signal.SIGTERM)}  # (and a second Ctrl-C quits at once)
    bar = tqdm(initial=start, total=total, unit='step', disable=rank > 0, dynamic_ncols=True)
    acc, rec, last, lo, per = {}, {}, (start, time.perf_counter()), rank * (G // world), G // world  # my slice
    try:
        for step in range(start, total):
            if args.bench and step == total - args.bench:
                t_bench = (torch.cuda.synchronize() if cuda else None) or time.perf_counter()
            epoch, k = divmod(step, n // G)
            idx, marks['enc'], marks['start'] = epoch_order(n, args.seed, epoch)[k * G + lo:][:per], [], clock()
            out = reg.train_step(model, ema, opt, [partial(micro_loss, step, idx[j:j + micro], lo + j)
                                                   for j in range(0, per, micro)], args.clip, args.ema, scaler)
            times += [(marks['start'], marks['enc'], marks['opt'], clock())] if args.bench else []
            acc = {k: acc.get(k, 0) + v.float() for k, v in out.items()}                # summed on the device
            done = step + 1
            bar.update()
            if args.bench or done % args.log_every and done % args.ckpt_every and done < total and (ddp or not stop):
                continue                                   # a log step; under DDP the ranks agree on a stop only here
            vals = torch.stack([*acc.values(), torch.tensor(float(bool(stop)), device=device)]) / (done - last[0])
            if ddp:
                dist.all_reduce(vals)                                                  # the loop's only syncs
            rec, acc, now = dict(zip([*acc, 'stop'], (vals / world).tolist())), {}, time.perf_counter()
            rec['img_per_s'], last = (done - last[0]) * G / (now - last[1]), (done, now)
            if not all(map(math.isfinite, rec.values())):
                raise SystemExit(f"non-finite loss or gradient by step {done} ({rec}); nothing saved. Resume from the "
                                 f"last checkpoint in {args.out!r} with a lower --lr, or --precision fp32")
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            if run:
                run.log(step=done, **{k: v for k, v in rec.items() if k != 'stop'})
                if done % args.ckpt_every == 0 or done == total or rec['stop']:  # 'config' and 'classes' for sample.py
                    run.save(done, model, ema, opt, scaler, classes=meta['classes'], resolution=meta['resolution'],
                             vae=meta.get('vae'), args=vars(args))
                if vae is not None and done % args.sample_every == 0:
                    sample_grid(ema, vae, os.path.join(args.out, f'samples_{done:07d}.png'), args.sample_steps, device)
            if rec['stop']:
                bar.write(f"stopped after step {done}, checkpoint saved: continue with --resume")
                break
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if args.bench:                                         # per step: start, encoder (start, end) pairs, optimiser, end
        ips = args.bench * G / ((torch.cuda.synchronize() if cuda else None) or time.perf_counter() - t_bench)
        ms = lambda a, b: b - a if isinstance(a, float) else a.elapsed_time(b)
        t = np.mean([(ms(a, d), sum(map(ms, e[::2], e[1::2])), ms(o, d)) for a, e, o, d in times[-args.bench:]], 0)
        tflops = (3 * reg.model_flops(reg.unwrap(model).cfg) + encoder_flops(enc)) * ips / world / 1e12
        rec = dict(images_per_s=ips, step_ms=t[0], encoder_ms=t[1], fwd_bwd_ms=t[0] - t[1] - t[2], optimizer_ms=t[2],
                   tflops_per_gpu=tflops, mfu=tflops / args.peak_tflops,
                   peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float('nan'))
        if rank == 0:
            print(f"{args.preset}, batch {G} on {world}: " + ", ".join(f"{k} {v:.4g}" for k, v in rec.items()))
    dist.destroy_process_group() if ddp else None
    return rec

def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub, common = p.add_subparsers(dest='command', required=True), argparse.ArgumentParser(add_help=False)
    common.add_argument('--device', default=None, help='default cuda, then mps, then cpu; torchrun: cuda:LOCAL_RANK')
    common.add_argument('--resolution', type=int, default=256, help='image side, paper 256 (and 512); train: --data\'s')
    common.add_argument('--vae', default=None, help=f"default {VAE} (train: --data's); offline: a folder of its files")
    a = sub.add_parser('prepare', parents=[common], help='ImageFolder -> crops + SD-VAE latents').add_argument
    a('--data', required=True, help='ImageFolder root, <data>/<class>/<image> (ImageNet: its train folder)')
    a('--out', required=True, help='folder for shard_NNNNN.pt files and manifest.json')
    a('--classes', default=None, help="'N': the first N class folders (sorted), or 'n01440764,n01443537'; default all")
    a('--shard-size', type=int, default=10_000, help='images per shard; default 10K (2.1 GB at 256 px)')
    a('--batch-size', type=int, default=64, help='images per VAE call; default 64 (fits any GPU)')
    a('--workers', type=int, default=8, help='processes that decode and crop images; default 8 (0: in-process)')
    a('--upscale', action='store_true', help='enlarge images below --resolution as ADM does (default: refuse them)')
    a = (t := sub.add_parser('train', parents=[common], help="train REG with the paper's recipe")).add_argument
    (g := t.add_mutually_exclusive_group(required=True)).add_argument('--data', help='a finished `prepare` folder')
    g.add_argument('--synthetic', action='store_true', help='random latents and images instead of --data (for --bench)')
    a('--out', default='runs/imagenet', help='run folder: checkpoints, log.jsonl, sample grids; default runs/imagenet')
    a('--preset', default='SiT-XL/2', choices=list(reg.PRESETS), help="default SiT-XL/2 (paper's best; also B/2, L/2)")
    a('--method', default='reg', choices=list(reg.METHODS), help='reg (the paper), a baseline, a REG Sec. 4 ablation')
    a('--encoder', default='dinov2-b', help='frozen encoder; paper: DINOv2-B/14, at 224 px for 256, 448 px for 512')
    a('--encoder-weights', default=None, help="a local weights file (offline), 'random' (tests, --bench); default: hub")
    a('--beta', type=float, default=0.03, help='token loss weight (REG Sec. 3; paper 0.03)')
    a('--lam', type=float, default=0.5, help='alignment loss weight (REG Sec. 3 / REPA; paper 0.5)')
    a('--lr', type=float, default=1e-4, help='AdamW learning rate, constant (paper 1e-4; betas 0.9/0.999, no decay)')
    a('--global-batch', type=int, default=256, help='images per optimiser step over all GPUs (paper 256)')
    a('--micro-batch', type=int, help='images per GPU and pass (default global / GPUs); accumulation fills the rest')
    a('--steps', type=int, default=400_000, help="optimiser steps; default 400K (the paper's tables; XL/2 best: 4M)")
    a('--ema', type=float, default=0.9999, help='EMA decay, every step (paper 0.9999)')
    a('--clip', type=float, default=1.0, help='gradient-norm clip (the release: 1.0)')
    a('--precision', default='bf16', choices=('bf16', 'fp16', 'fp32'), help='GPU autocast (release fp16; bf16 safer)')
    a('--compile', action='store_true', help='torch.compile the SiT (off by default, so it can be stepped through)')
    a('--seed', type=int, default=0, help='fixes the init, the data order and every random draw; default 0')
    a('--resume', action='store_true', help='continue the latest checkpoint in --out, exactly')
    a('--log-every', type=int, default=100, help="steps between log.jsonl records (the loop's only syncs); default 100")
    a('--ckpt-every', type=int, default=10_000, help='steps between checkpoints (also at the end, on Ctrl-C; 3 kept)')
    a('--sample-every', type=int, default=10_000, help='steps between EMA sample grids; default 10K, 0 = off')
    a('--sample-steps', type=int, default=50, help="SDE steps for the grids; default 50 (the paper's 250 is for FID)")
    a('--bench', type=int, default=0, help='time N steps after --warmup ones, print the speed, save nothing (with --synthetic: no data needed)')
    a('--warmup', type=int, default=5, help='untimed --bench steps first (compile, autotune); default 5')
    a('--peak-tflops', type=float, default=989.0, help='GPU peak for the MFU; default 989 (H100/H200 SXM, dense bf16)')
    return p

def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parser().parse_args(args)
    try:
        return prepare(args) if args.command == 'prepare' else train(args)
    except (ValueError, RuntimeError) as e:                # reg raises these with messages that name the fix
        raise SystemExit(f"error: {e}") from None

if __name__ == '__main__':
    main()
