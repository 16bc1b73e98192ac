"""
Sample a REG / SiT checkpoint (ours or the official release) into a PNG grid, PNGs or an .npz for the ADM evaluator;
score FD_DINOv2 and REG's token consistency; time the sampler.

  python sample.py runs/cifar/0050000.pt                              # grid, a row per class, SDE 250 steps, no CFG
  python sample.py SiT-XL-2-REG.pt --paper --npz --vae sd-vae-ft-ema  # the paper's CFG setting, 50K samples for FID
  torchrun --nproc_per_node 8 sample.py SiT-XL-2-REG.pt --paper --npz # the same on 8 GPUs (rank r: shards j % 8 == r)
  python sample.py last.pt --npz --num-samples 10000 --fd-ref cifar10-train --encoder dinov2-b
  python sample.py last.pt --bench 5 --steps 50                       # samples/s and network evaluations/s

Sample i starts from noise (image and token) that depends only on (--seed, i): batch size, shards, resumes and GPU
count leave ODE/Heun samples unchanged. The SDE's own noise is seeded per batch from (--seed, first index), so SDE
samples repeat for the same --batch-size and kind of device. Rerun an interrupted --npz command to resume it.
"""
import argparse, atexit, hashlib, json, os, time
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


def save_npz(path, **arrays):
    np.savez(path[:-4] + '.tmp.npz', **arrays)
    os.replace(path[:-4] + '.tmp.npz', path)                                      # atomic: whole or absent


def load_vae(path_or_name='stabilityai/sd-vae-ft-ema', device='cpu'):
    """The SD-VAE (diffusers AutoencoderKL) from a local folder, a weights file inside one, or the hub."""
    try:
        from diffusers import AutoencoderKL
        folder = os.path.dirname(path_or_name) if os.path.isfile(path_or_name) else path_or_name
        return AutoencoderKL.from_pretrained(folder).to(device).eval().requires_grad_(False)
    except ImportError:
        raise SystemExit("sample.py: latent models decode through the SD-VAE, which needs diffusers: pip install diffusers")
    except Exception as e:
        raise SystemExit(f"sample.py: cannot load the VAE {path_or_name!r} ({type(e).__name__}: {str(e)[:150]}). Offline? "
                         "Download config.json and diffusion_pytorch_model.safetensors of https://huggingface.co/"
                         "stabilityai/sd-vae-ft-ema into a folder and pass it as --vae FOLDER") from None


def load_model(args):
    """Ours (config stored), the release's (dict with 'ema', 'args': config read off the weights) or a bare state dict."""
    ck = reg.load_checkpoint(args.ckpt)
    bare = all(torch.is_tensor(v) for v in ck.values())
    if not bare and args.weights not in ck:
        raise ValueError(f"the checkpoint has no {args.weights!r} weights (keys: {sorted(ck)}): pick another --weights")
    sd = ck if bare else ck[args.weights]
    cfg = reg.SiTConfig(**ck['config']) if 'config' in ck else reg.config_from_state_dict(sd)
    if 'config' not in ck and hasattr(ck.get('args'), 'encoder_depth'):           # the release's argparse.Namespace
        cfg.encoder_depth = ck['args'].encoder_depth
    cfg.encoder_depth = args.encoder_depth or cfg.encoder_depth                   # what the weights cannot tell
    return reg.load_weights(reg.SiT(cfg), sd)


@torch.no_grad()
def generate(model, vae, enc, lo, hi, labels, args, device, bar, stats):
    """Samples lo..hi-1 -> uint8 images (n, H, W, 3) and, given an encoder, each one's token consistency (n,)."""
    cfg, images, cos = model.cfg, [], []
    def net(x, *rest):                                                            # counts network evaluations (--bench)
        stats['nfe'] += x.shape[0]
        return model(x, *rest)
    for first in range(lo, hi, args.batch_size):
        idx = range(first, min(first + args.batch_size, hi))
        gens = [torch.Generator().manual_seed(seed_of(args.seed, i)) for i in idx]
        x = torch.stack([torch.randn(cfg.in_channels, cfg.input_size, cfg.input_size, generator=g) for g in gens])
        c = torch.stack([torch.randn(cfg.encoder_dim, generator=g) for g in gens]).to(device) if model.entangled else None
        y = torch.tensor([labels[i % len(labels)] for i in idx], device=device)  # class-balanced: labels cycled
        torch.manual_seed(seed_of(args.seed, first, 'sde'))                       # reg.sample draws SDE noise globally
        with reg.autocast(device, args.precision):
            x, c = reg.sample(net, x.to(device), y, c, args.steps, 'euler' if args.mode == 'ode' else args.mode,
                              args.cfg_scale, args.cls_cfg_scale, (args.guidance_low, args.guidance_high), cfg.num_classes)
            x = (vae.decode(x / 0.18215).sample if vae else x).float().clamp(-1, 1)   # SD latents are scaled by 0.18215
        if enc:                                                                   # [REG] the generated token vs the image's
            f = enc(x)
            cos.append(torch.cosine_similarity(f[1].mean(1) if cfg.token == 'mean' else f[0], c.float()).cpu())
        images.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        bar.update(len(idx))
    return torch.cat(images).numpy(), torch.cat(cos).numpy() if enc else None


def image_batches(src, size, batch=100):
    """uint8 (B, 3, H, W) batches from an (N, H, W, 3) array, an .npz holding arr_0, or a folder of images (resized)."""
    if isinstance(src, str) and src.endswith('.npz'):
        src = np.load(src)['arr_0']
    elif isinstance(src, str):
        check(os.path.isdir(src), f"--fd-ref {src!r} is none of: a folder of images, an .npz, cifar10-train (--data-dir)")
        src = sorted(str(f) for f in Path(src).rglob('*') if f.suffix.lower() in ('.png', '.jpg', '.jpeg', '.webp'))
        check(src, "the --fd-ref folder holds no .png/.jpg/.webp images")
    for i in range(0, len(src), batch):
        b = [np.asarray(Image.open(f).convert('RGB').resize((size, size), Image.BICUBIC)) if isinstance(f, str) else f
             for f in src[i:i + batch]]
        yield torch.from_numpy(np.stack(b)).permute(0, 3, 1, 2)


def main(args):
    vars(args).update(PAPER if args.paper else {})
    check(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    check(0 <= args.guidance_low <= args.guidance_high <= 1,
          f"the guidance interval [{args.guidance_low}, {args.guidance_high}] needs 0 <= low <= high <= 1")
    check(min(args.batch_size, args.shard_size, args.per_row, args.num_samples) >= 1, "sizes and counts must be >= 1")
    args.cls_cfg_scale = args.cfg_scale if args.cls_cfg_scale is None else args.cls_cfg_scale
    ddp = 'RANK' in os.environ                                                    # launched by torchrun
    if ddp:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
        atexit.register(dist.destroy_process_group)
        torch.cuda.set_device(int(os.environ['LOCAL_RANK'])) if torch.cuda.is_available() else None
    rank, world, device = dist.get_rank() if ddp else 0, dist.get_world_size() if ddp else 1, reg.pick_device(args.device)
    try:                                                                          # reg's errors: one line, no trace
        model = load_model(args).to(device).eval()
        cfg, K = model.cfg, model.cfg.num_classes
        labels = [int(s) for s in args.labels.split(',')] if args.labels else list(range(K if args.npz else min(K, 10)))
        check(all(0 <= l < K for l in labels), f"--labels {args.labels} must lie in 0..{K - 1} (the model's classes)")
        vae = load_vae(args.vae, device) if cfg.in_channels == 4 else None       # pixel models need no decoder
        check(not args.encoder or model.entangled, "token consistency needs a model with the REG token: drop --encoder")
        torch.manual_seed(args.seed)                                              # encoders with weights 'random' (tests)
        enc = reg.load_encoder(args.encoder, model.grid, args.encoder_weights, device) if args.encoder else None
        check(not enc or enc.dim == cfg.encoder_dim, f"--encoder is {enc and enc.dim}-d, the token {cfg.encoder_dim}-d")
        fd_enc = reg.load_encoder(args.fd_encoder, 16, args.fd_encoder_weights, device) if args.fd_ref else None  # 224px
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"sample.py: {e}") from None
    stats, bar = dict(nfe=0), tqdm(disable=True)
    run = lambda lo, hi: generate(model, vae, enc, lo, hi, labels, args, device, bar, stats)
    if args.bench:
        run(0, args.batch_size)                                                   # warm-up
        stats['nfe'], t0, n = 0, time.time(), args.bench * args.batch_size
        run(0, n)
        r = dict(samples_per_s=n / (time.time() - t0), nfe_per_s=stats['nfe'] / (time.time() - t0), nfe=stats['nfe'] / n)
        print(f"{r['samples_per_s']:.3f} samples/s, {r['nfe_per_s']:.1f} NFE/s ({r['nfe']:.0f} per sample; CFG doubles the "
              f"batch inside the guidance interval only): {args.mode}, {args.steps} steps, batch {args.batch_size}")
        return r
    out = args.out or os.path.join('samples', os.path.splitext(os.path.basename(args.ckpt))[0])
    keys = 'weights mode steps cfg_scale cls_cfg_scale guidance_low guidance_high seed batch_size shard_size precision encoder'
    new = json.loads(json.dumps({k: getattr(args, k) for k in keys.split()} | dict(
        ckpt=os.path.abspath(args.ckpt), labels=labels, config=vars(cfg), vae=args.vae if vae else None)))
    path = Path(out, 'settings.json')                                             # refuse to mix or overwrite samples
    old = json.loads(path.read_text()) if path.exists() else new
    diff = [f"{k}: {old.get(k)} there, {new.get(k)} now" for k in sorted(old | new) if old.get(k) != new.get(k)]
    check(not diff, f"{out} holds samples made with other settings ({'; '.join(diff)}): pass another --out")
    os.makedirs(os.path.join(out, 'png'), exist_ok=True)
    path.write_text(json.dumps(new, indent=1)) if rank == 0 else None
    N, S = args.num_samples if args.npz else len(labels) * args.per_row, args.shard_size
    shards = [(lo, min(lo + S, N)) for lo in range(0, N, S)]
    name = lambda lo, hi: os.path.join(out, f'shard-{lo:07d}-{hi:07d}.npz')
    todo = [s for j, s in enumerate(shards) if j % world == rank and not os.path.exists(name(*s))][:args.max_shards]
    bar = tqdm(total=sum(hi - lo for lo, hi in todo), unit='img', disable=rank > 0)
    for lo, hi in todo:                                                           # finished shards are never redone
        images, cos = run(lo, hi)
        save_npz(name(lo, hi), arr_0=images, **({} if cos is None else dict(cos=cos)))
        for k, a in enumerate(images if args.save_png else []):
            Image.fromarray(a).save(os.path.join(out, 'png', f'{lo + k:06d}.png'))
    bar.close()
    dist.barrier() if ddp else None
    done = sum(os.path.exists(name(*s)) for s in shards)
    if rank > 0 or done < len(shards):
        print(f"{done}/{len(shards)} shards in {out}: run the same command again to finish") if rank == 0 else None
        return dict(done=done, shards=len(shards))
    parts = [np.load(name(*s)) for s in shards]
    images, cos = np.concatenate([p['arr_0'] for p in parts]), np.concatenate([p['cos'] for p in parts]) if enc else None
    (R, H, W), final = (len(labels), *images.shape[1:3]), os.path.join(out, f'samples_{N}.npz' if args.npz else 'grid.png')
    if not args.npz:                                                              # sample i in row i % R (its label)
        Image.fromarray(images.reshape(-1, R, H, W, 3).transpose(1, 2, 0, 3, 4).reshape(R * H, -1, 3)).save(final)
    elif not os.path.exists(final):
        save_npz(final, arr_0=images)                                             # ADM: arr_0 uint8 (N, H, W, 3)
    scores = {} if cos is None else {f'token consistency ({args.encoder})': float(cos.mean())}  # [REG] mean cosine
    if fd_enc:                                                                    # torchvision's CIFAR-10, else JPEG folders
        tv = os.path.isdir(os.path.join(args.data_dir, 'cifar-10-batches-py'))
        cifar = lambda: __import__('torchvision').datasets.CIFAR10(args.data_dir).data if tv else f'{args.data_dir}/train'
        key = repr((os.path.abspath(args.fd_ref), os.path.abspath(args.data_dir), args.fd_encoder, args.fd_encoder_weights, H))
        cache = os.path.join(out, f'fd-ref-{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt')   # reference stats once
        ref = reg.encoder_stats(fd_enc, image_batches(cifar() if args.fd_ref == 'cifar10-train' else args.fd_ref, H), cache)
        scores[f'FD_{args.fd_encoder}'] = reg.frechet_distance(reg.encoder_stats(fd_enc, image_batches(images, H)), ref)
    print(f"wrote {final}{' and ' + out + '/png' if args.save_png else ''}: {len(images)} samples, {args.mode} {args.steps} "
          f"steps, cfg {args.cfg_scale}/{args.cls_cfg_scale} on [{args.guidance_low}, {args.guidance_high}]"
          + ''.join(f", {k} {v:.4f}" for k, v in scores.items()))
    return dict(path=final, samples=len(images), **scores)


def parse_args(argv=None):
    p = argparse.ArgumentParser(epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('ckpt', help="our checkpoint (train_*.py's NNNNNNN.pt), the official SiT-XL/2+REG release, or a bare state dict")
    a('--weights', default='ema', choices=['ema', 'model'], help="which weights (default: ema, as the paper samples)")
    a('--encoder-depth', type=int, help="override the REPA block (default: the file's config or release args, else 8)")
    a('--mode', default='sde', choices=['sde', 'ode', 'heun'], help="sampler (default: sde, the paper's Euler-Maruyama)")
    a('--steps', type=int, default=250, help="sampling steps (default: 250, the paper)")
    a('--cfg-scale', type=float, default=1.0, help="CFG scale (default: 1 = no CFG, the paper's main tables)")
    a('--cls-cfg-scale', type=float, help="[REG] the token's CFG scale (default: --cfg-scale, as the release)")
    a('--guidance-low', type=float, default=0.0, help="CFG only where t >= this (default: 0, the paper)")
    a('--guidance-high', type=float, default=1.0, help="CFG only where t <= this (default: 1; the paper's CFG runs: 0.85)")
    a('--paper', action='store_true', help="the paper's CFG setting: " + ', '.join(f'{k}={v}' for k, v in PAPER.items()))
    a('--seed', type=int, default=0, help="sample i's noise depends only on (seed, i) (default: 0)")
    a('--batch-size', type=int, default=64, help="samples per forward pass (default: 64)")
    a('--device', help="default: cuda, then mps, then cpu")
    a('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'], help="autocast on GPUs (default: fp32, exact)")
    a('--out', help="output folder (default: samples/<checkpoint name>); its settings.json keeps runs from mixing")
    a('--npz', action='store_true', help="write an .npz for the ADM evaluator; sample i has label i %% K (class-balanced)")
    a('--num-samples', type=int, default=50000, help="samples in --npz mode (default: 50000, the FID-50K protocol)")
    a('--shard-size', type=int, default=1000, help="samples per shard file, the unit of resume and GPU split (default: 1000)")
    a('--max-shards', type=int, help="stop after this many new shards (default: no limit; run again to resume)")
    a('--labels', help="comma-separated class labels, e.g. 1,2,3 (default: grid 0..9, --npz all classes)")
    a('--per-row', type=int, default=8, help="grid samples per label row (default: 8)")
    a('--save-png', action='store_true', help="also write each sample as <out>/png/NNNNNN.png")
    a('--vae', default='stabilityai/sd-vae-ft-ema', help="SD-VAE of latent models: hub name or local folder (default: the paper's)")
    a('--fd-ref', help="reference of the Frechet distance: a folder of images, an .npz with arr_0, or cifar10-train")
    a('--data-dir', default='data/cifar10', help="cifar10-train: torchvision's CIFAR-10 or JPEG folders (default: data/cifar10)")
    a('--fd-encoder', default='dinov2-l', help="feature space of the FD (default: dinov2-l, FD_DINOv2 of Stein et al. 2023)")
    a('--fd-encoder-weights', help="local weights file of --fd-encoder (default: fetch from the hub; 'random' for tests)")
    a('--encoder', help="[REG] the model's training encoder for token consistency (default: none = skip; paper: dinov2-b)")
    a('--encoder-weights', help="local weights file of --encoder (default: fetch from the hub; 'random' for tests)")
    a('--bench', type=int, default=0, help="time this many batches after a warm-up batch; writes nothing (default: 0 = off)")
    return p.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
