"""
Sample a REG / SiT checkpoint (ours or the official release) into a PNG grid, PNGs or an .npz for the ADM evaluator;
score FD_DINOv2 and REG's token consistency; time the sampler.
  python sample.py runs/cifar/0050000.pt                              # grid, a row per class, SDE 250 steps, no CFG
  python sample.py SiT-XL-2-REG.pt --paper --npz --vae sd-vae-ft-ema  # the paper's CFG setting, 50K samples for FID
  torchrun --nproc_per_node 8 sample.py SiT-XL-2-REG.pt --paper --npz # the same on 8 GPUs (rank r: shards j % 8 == r)
Rerun an interrupted --npz command to resume it. Reproducibility: see --seed.
"""
import argparse, atexit, datetime, hashlib, json, os, time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import reg

PAPER = dict(mode='sde', steps=250, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_low=0.0, guidance_high=0.85)

def check(ok, message):
    if not ok:
        raise SystemExit(f"sample.py: {message}")

def seed_of(*key):
    """A 63-bit seed from a key such as (seed, sample index), so no sample's noise depends on its batch or GPU."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], 'little') >> 1

def load_vae(path_or_name='stabilityai/sd-vae-ft-ema', device='cpu'):
    """The SD-VAE (diffusers AutoencoderKL) from a local folder, a weights file inside one, or the hub."""
    try:
        from diffusers import AutoencoderKL
        folder = os.path.dirname(path_or_name) if os.path.isfile(path_or_name) else path_or_name
        return AutoencoderKL.from_pretrained(folder).to(device).eval().requires_grad_(False)
    except Exception as e:                                                        # no diffusers, offline, bad folder
        raise SystemExit(f"sample.py: no SD-VAE from {path_or_name!r} ({type(e).__name__}: {str(e)[:120]}). It needs "
                         "diffusers (pip install diffusers); offline, put config.json and diffusion_pytorch_model."
                         "safetensors of hf.co/stabilityai/sd-vae-ft-ema in a folder, pass --vae FOLDER") from None

def load_model(args):
    """Ours (config stored), the release's (config read off the weights and its args) or a bare state dict."""
    ck = reg.load_checkpoint(args.ckpt)
    sd = ck if all(torch.is_tensor(v) for v in ck.values()) else ck.get(args.weights)     # a bare state dict, or pick
    if sd is None:
        raise ValueError(f"the checkpoint has no {args.weights!r} weights (keys: {sorted(ck)}): pick another --weights")
    cfg = reg.SiTConfig(**ck['config']) if 'config' in ck else reg.config_from_state_dict(sd)
    cfg.encoder_depth = args.encoder_depth or getattr(ck.get('args'), 'encoder_depth', cfg.encoder_depth)
    return reg.load_weights(reg.SiT(cfg), sd)

@torch.no_grad()
def generate(model, vae, enc, lo, hi, labels, args, device, bar):
    """Samples lo..hi-1 -> uint8 images (n, H, W, 3) and, given an encoder, each one's token consistency (n,)."""
    cfg, images, cos = model.cfg, [], []
    for first in range(lo, hi, args.batch_size):
        idx = range(first, min(first + args.batch_size, hi))
        gs = [torch.Generator().manual_seed(seed_of(args.seed, i)) for i in idx]  # x first, then the token
        x = torch.stack([torch.randn(cfg.in_channels, cfg.input_size, cfg.input_size, generator=g) for g in gs])
        c = torch.stack([torch.randn(cfg.encoder_dim, generator=g) for g in gs]).to(device) if model.entangled else None
        y = torch.tensor([labels[i % len(labels)] for i in idx], device=device)  # class-balanced: labels cycled
        noise = lambda u: torch.stack([torch.randn(u.shape[1:], generator=g, dtype=u.dtype) for g in gs]).to(u.device)
        with reg.autocast(device, args.precision):                                # SDE noise: per sample too
            x, c = reg.sample(model, x.to(device), y, c, args.steps, args.mode.replace('ode', 'euler'), args.cfg_scale,
                              args.cls_cfg_scale, (args.guidance_low, args.guidance_high), cfg.num_classes, noise=noise)
            x = (vae.decode(x / 0.18215).sample if vae else x).float().clamp(-1, 1)   # SD latents are scaled by 0.18215
        if enc:                                                                   # [REG] generated token vs the image's
            cos.append(torch.cosine_similarity(enc(x)[1].mean(1) if cfg.token == 'mean' else enc(x)[0], c).cpu())
        images.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        bar.update(len(idx))
    return torch.cat(images).numpy(), torch.cat(cos).numpy() if enc else None

def image_batches(src, size, batch=100):
    """uint8 (B, 3, H, W) batches from an (N, H, W, 3) array, an .npz holding arr_0, or a folder of images (resized)."""
    if isinstance(src, str) and src.endswith('.npz'):
        src = np.load(src)['arr_0']
    elif isinstance(src, str):
        src = sorted(str(f) for f in Path(src).rglob('*') if f.suffix.lower() in ('.png', '.jpg', '.jpeg')) or src
        check(not isinstance(src, str), f"--fd-ref {src!r} is no .npz, cifar10-train or folder of .png/.jpg images")
    for i in range(0, len(src), batch):
        b = [np.asarray(Image.open(f).convert('RGB').resize((size, size), Image.BICUBIC)) if isinstance(f, str) else f
             for f in src[i:i + batch]]
        yield torch.from_numpy(np.stack(b)).permute(0, 3, 1, 2)

def main(args):
    vars(args).update(PAPER if args.paper else {})
    check(0 <= args.guidance_low <= args.guidance_high <= 1, "need 0 <= --guidance-low <= --guidance-high <= 1")
    check(min(args.steps, args.batch_size, args.shard_size, args.per_row, args.num_samples) >= 1,
          "--steps, --batch-size, --shard-size, --per-row and --num-samples must be >= 1")
    if ddp := 'RANK' in os.environ:                                               # launched by torchrun
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo', timeout=datetime.timedelta(hours=12))
        atexit.register(dist.destroy_process_group)
    rank, world, device = int(os.getenv('RANK', 0)), int(os.getenv('WORLD_SIZE', 1)), reg.pick_device(args.device)
    try:                                                                          # reg's errors: one line, no trace
        model = load_model(args).to(device).eval()
        cfg, K = model.cfg, model.cfg.num_classes
        labels = args.labels or list(range(K if args.npz else min(K, 10)))     # grid: rows; npz: cycled
        check(all(0 <= l < K for l in labels), f"--labels {args.labels} must lie in 0..{K - 1} (the model's classes)")
        vae = load_vae(args.vae, device) if cfg.in_channels == 4 else None       # pixel models need no decoder
        check(not args.encoder or model.entangled, "token consistency needs a model with the REG token: drop --encoder")
        enc = reg.load_encoder(args.encoder, model.grid, args.encoder_weights, device) if args.encoder else None
        check(not enc or enc.dim == cfg.encoder_dim, f"--encoder is {enc and enc.dim}-d, the token {cfg.encoder_dim}-d")
        ref = args.data_dir if args.fd_ref == 'cifar10-train' else args.fd_ref    # FD reference: .npz or image folder
        check(not ref or os.path.exists(ref), f"--fd-ref {ref!r} (--data-dir for cifar10-train) does not exist")
        fd_enc = reg.load_encoder(args.fd_encoder, 16, args.fd_encoder_weights, device, '--fd-encoder-weights') if ref \
            else None
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"sample.py: {e}") from None
    stats, bar = dict(nfe=0), tqdm(disable=True)                                  # nfe: network evaluations x batch
    model.register_forward_pre_hook(lambda m, inputs: stats.update(nfe=stats['nfe'] + len(inputs[0])))
    run = lambda lo, hi: generate(model, vae, enc, lo, hi, labels, args, device, bar)
    if args.bench:
        run(0, args.batch_size)                                                   # warm-up
        stats['nfe'], t0, n = 0, time.time(), args.bench * args.batch_size
        run(0, n)
        dt, nfe = time.time() - t0, stats['nfe'] / n
        print(f"{n / dt:.3g} samples/s, {nfe * n / dt:.3g} NFE/s ({nfe:.0f} a sample; CFG doubles it in its interval)")
        return dict(samples_per_s=n / dt, nfe_per_s=nfe * n / dt, nfe_per_sample=nfe)
    out = args.out or os.path.join('samples', os.path.splitext(os.path.basename(args.ckpt))[0])
    keys = 'weights mode steps cfg_scale cls_cfg_scale guidance_low guidance_high seed batch_size precision encoder'
    new = {k: getattr(args, k) for k in keys.split()} | dict(ckpt=os.path.abspath(args.ckpt), labels=labels,
                                                             config=vars(cfg), vae=args.vae if vae else None)
    path = Path(out, 'settings.json')                                             # refuse to mix or overwrite samples
    old = json.loads(path.read_text()) if path.exists() else new
    diff = [f"{k}: {old.get(k)} there, {new.get(k)} now" for k in sorted(old | new) if old.get(k) != new.get(k)]
    check(not diff, f"{out} holds samples made with other settings ({'; '.join(diff)}): pass another --out")
    os.makedirs(os.path.join(out, 'png') if args.save_png else out, exist_ok=True)
    path.write_text(json.dumps(new, indent=1)) if rank == 0 else None
    N, S = args.num_samples if args.npz else len(labels) * args.per_row, args.shard_size
    shards = [(lo, min(lo + S, N)) for lo in range(0, N, S)]
    name = lambda lo, hi, tmp='': os.path.join(out, f'shard-{lo:07d}-{hi:07d}{tmp}.npz')
    todo = [s for j, s in enumerate(shards) if j % world == rank and not os.path.exists(name(*s))][:args.max_shards]
    with tqdm(total=sum(hi - lo for lo, hi in todo), unit='img', disable=rank > 0 or not todo) as bar:
        for lo, hi in todo:                                                       # finished shards are never redone
            images, cos = run(lo, hi)
            np.savez(name(lo, hi, '.tmp'), arr_0=images, **({} if cos is None else dict(cos=cos)))
            os.replace(name(lo, hi, '.tmp'), name(lo, hi))                        # atomic: a shard is whole or absent
            for k, a in enumerate(images if args.save_png else []):
                Image.fromarray(a).save(os.path.join(out, 'png', f'{lo + k:06d}.png'))
    dist.barrier() if ddp else None                                               # waits (<= 12 h) for the slowest
    done = sum(os.path.exists(name(*s)) for s in shards)
    if rank > 0 or done < len(shards):
        print(f"{done}/{len(shards)} shards in {out}: run the same command again to finish") if rank == 0 else None
        return dict(done=done, shards=len(shards))
    parts = [np.load(name(*s)) for s in shards]
    images = np.concatenate([p['arr_0'] for p in parts])                          # (N, H, W, 3) uint8
    R, H, W, final = len(labels), *images.shape[1:3], os.path.join(out, f'samples_{N}.npz' if args.npz else 'grid.png')
    if not args.npz:                                                              # sample i in row i % R (its label)
        Image.fromarray(images.reshape(-1, R, H, W, 3).transpose(1, 2, 0, 3, 4).reshape(R * H, -1, 3)).save(final)
    elif not os.path.exists(final):                                               # ADM: arr_0 uint8 (N, H, W, 3)
        np.savez(final + '.tmp.npz', arr_0=images)
        os.replace(final + '.tmp.npz', final)
    scores = dict(token_consistency=float(np.concatenate([p['cos'] for p in parts]).mean())) if enc else {}  # [REG]
    if fd_enc:
        key = repr((os.path.abspath(ref), args.fd_encoder, args.fd_encoder_weights, H))
        cache = os.path.join(out, f'fd-ref-{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt')   # reference stats once
        scores['fd'] = reg.frechet_distance(reg.encoder_stats(fd_enc, image_batches(images, H)),
                                            reg.encoder_stats(fd_enc, image_batches(ref, H), cache))
    print(f"wrote {len(images)} samples to {final}{' and ' + out + '/png' if args.save_png else ''}, settings.json"
          + ''.join(f", {k.replace('fd', 'FD_' + args.fd_encoder)} {v:.4f}" for k, v in scores.items()))
    return dict(path=final, samples=len(images), **scores)

def parse_args(argv=None):
    p = argparse.ArgumentParser(epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('ckpt', help="our checkpoint (train_*.py's NNNNNNN.pt), the official SiT-XL/2+REG release, or a bare state dict")
    a('--weights', default='ema', choices=['ema', 'model'], help="which weights (default: ema, as the paper samples)")
    a('--encoder-depth', type=int, help="override the REPA block (default: the file's config or release args, else 8)")
    a('--mode', default='sde', choices=['sde', 'ode', 'heun'], help="sampler (default: sde, the paper's)")
    a('--steps', type=int, default=250, help="sampling steps (default: 250, the paper)")
    a('--cfg-scale', type=float, default=1.0, help="CFG scale (default: 1 = no CFG, the paper's main tables)")
    a('--cls-cfg-scale', type=float, help="[REG] the token's CFG scale (default: --cfg-scale, as the release)")
    a('--guidance-low', type=float, default=0.0, help="CFG only where t >= this (default: 0, the paper)")
    a('--guidance-high', type=float, default=1.0, help="CFG only where t <= this (default: 1; paper with CFG: 0.85)")
    a('--paper', action='store_true', help="the paper's CFG run: " + ', '.join(f'{k}={v}' for k, v in PAPER.items()))
    a('--seed', type=int, default=0, help="sample i's noise (start and SDE steps, image and token) depends only on "
      "(seed, i): samples ignore batching, shards, resumes and GPU count (default: 0)")
    a('--batch-size', type=int, default=64, help="samples per forward pass (default: 64)")
    a('--device', help="default: cuda, then mps, then cpu")
    a('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'], help="autocast on GPUs (default: fp32, exact)")
    a('--out', help="output folder (default: samples/<checkpoint name>); its settings.json keeps runs from mixing")
    a('--npz', action='store_true', help="write an .npz for the ADM evaluator; sample i has label i %% K (balanced)")
    a('--num-samples', type=int, default=50000, help="samples in --npz mode (default: 50000, the FID-50K protocol)")
    a('--shard-size', type=int, default=1000, help="samples per shard file; unit of resume, GPU split (default: 1000)")
    a('--max-shards', type=int, help="stop after this many new shards (default: no limit; run again to resume)")
    a('--labels', type=lambda s: list(map(int, s.split(','))), help="labels like 1,2,3 (default: grid 0..9, npz all)")
    a('--per-row', type=int, default=8, help="grid samples per label row (default: 8)")
    a('--save-png', action='store_true', help="also write each sample as <out>/png/NNNNNN.png")
    a('--vae', default='stabilityai/sd-vae-ft-ema', help="latent models' SD-VAE: hub name or folder (default: paper's)")
    a('--fd-ref', help="reference of the Frechet distance: a folder of images, an .npz with arr_0, or cifar10-train")
    a('--data-dir', default='data/cifar10/train', help="cifar10-train: its class folders (default: data/cifar10/train)")
    a('--fd-encoder', default='dinov2-l', help="FD features at 224px (default: dinov2-l, FD_DINOv2 of Stein et al.)")
    a('--fd-encoder-weights', help="weights file of --fd-encoder (default: fetch from the hub; 'random': tests)")
    a('--encoder', help="[REG] the training encoder, for token consistency (default: none, skip; paper: dinov2-b)")
    a('--encoder-weights', help="weights file of --encoder (default: fetch from the hub; 'random': tests)")
    a('--bench', type=int, default=0, help="time this many batches after a warm-up one; no files (default: 0, off)")
    return p.parse_args(argv)

if __name__ == '__main__':
    main(parse_args())
