"""
Sample a REG / SiT checkpoint (ours, the official release's .pt, or a bare state dict) into a PNG grid or an .npz for
the ADM evaluator (which scores FID and FD).

  python sample.py runs/cifar/0050000.pt                               # grid.png: a row per class, SDE 250 steps
  python sample.py SiT-XL-2-REG.pt --paper --npz                       # the paper's CFG setting, 50K samples for FID
  torchrun --nproc_per_node 8 sample.py SiT-XL-2-REG.pt --paper --npz  # the same on 8 GPUs

The grid (default): grid.png in --out (reg.save_grid), a row per label (--labels 1 2 3, default the first 10 classes)
named on its left (the class names a checkpoint stores in its args, else the label), --per-row samples each, a title
naming the checkpoint, the sampler and the CFG scale. A progress bar counts the batches; a closing line says what was
written where. Latent models (4 channels) decode through the SD-VAE: --vae, else the one the checkpoint names
(train_imagenet.py's), else ema (the paper's). Samples that are not finite (a huge --cfg-scale) are refused before
anything is written. Samples are rounded to 8 bits (the release truncates: half a level darker on average); TF32 is
off, so float32 is float32.

--npz: samples_N.npz for the ADM evaluator (arr_0: uint8 (N, H, W, 3)); sample i has label i % K (or the i % n-th of
--labels: class-balanced, where the release draws labels at random). It is written through shard files of
--shard-size samples, each atomic: rerun an interrupted command to resume it, at any --batch-size. Under torchrun,
rank r samples the shards j with j % world == r and rank 0 merges them. settings.json in --out records what the
samples depend on (the sampler flags, the labels, the VAE, the config, a fingerprint of the weights' tensors) and
refuses to mix in samples of other settings or other weights, whatever the checkpoint's file name.

Reproducibility: sample i's noise (start image, start token, every SDE step) comes from a generator seeded by (--seed,
i) alone, so no sample depends on the batch size, the shards, the resumes or the number of GPUs (up to float rounding:
a kernel may add in another order for another batch size).
"""

import argparse
import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import reg

# the paper's CFG setting (REG Sec. 4): SDE, 250 steps, scale 2.3 for image and token, guidance interval [0, 0.85]
PAPER = dict(sampler="sde", sample_steps=250, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_low=0.0, guidance_high=0.85)
# what an --npz sample depends on besides the weights and the config: settings.json compares them. Not the batch size,
# shard size or device: no sample depends on them, so a run may resume with others.
SAMPLE_FLAGS = ("sampler", "sample_steps", "cfg_scale", "cls_cfg_scale", "guidance_low", "guidance_high", "seed")
SAMPLE_FLAGS += ("labels", "vae", "precision")


def check(ok, message):
    """Every problem ends the script in one line that says what to do, never in a traceback."""
    if not ok:
        raise SystemExit(f"sample.py: {message}")


# Sampling -------------------------------------------------------------------------------------------------------------


def sde_noise(generators, state):
    """reg.sample's `noise`: row k from sample k's own generator, on the CPU. On a GPU it travels through pinned
    memory with a non-blocking copy (the caching host allocator holds the buffer until the copy is done), so the
    sampler loop does not wait for the device at every step."""
    draws = torch.stack([torch.randn(state.shape[1:], generator=g, dtype=state.dtype) for g in generators])
    return (draws.pin_memory() if state.is_cuda else draws).to(state.device, non_blocking=True)


def generate(model, vae, indices, args, device):
    """Samples `indices` -> uint8 images (n, H, W, 3), class-balanced: sample i has label labels[i % len(labels)].
    Sample i's generator draws its start image, then its start token, then its SDE noise step by step. Non-finite
    samples (a huge --cfg-scale) end the run before they are written."""
    shape = (model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
    width = model.cfg.token_width if model.cfg.entangled else 0  # [REG] reg.sample: a token of width 0 stands for none
    interval = (args.guidance_low, args.guidance_high)
    sampling = (args.sample_steps, args.sampler, args.cfg_scale, args.cls_cfg_scale, interval)
    images = []
    batches = range(0, len(indices), args.batch_size)
    for start in tqdm(batches, desc=f"{len(indices)} samples", unit="batch", leave=False):
        batch = indices[start : start + args.batch_size]
        # sample i's own generator, seeded by a 64-bit hash of (seed, i): its draws do not depend on batch, shard or GPU
        generators = [torch.Generator().manual_seed(int(reg.fingerprint(args.seed, i), 16)) for i in batch]
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)  # (B, C, H, W)
        cls = torch.stack([torch.randn(width, generator=g) for g in generators]).to(device)  # [REG] (B, E)
        y = torch.tensor([args.labels[i % len(args.labels)] for i in batch], device=device)
        with reg.autocast(device, args.precision):
            noise = functools.partial(sde_noise, generators)
            x, cls = reg.sample(model, x, y, cls, *sampling, noise=noise)
            if vae is not None:
                x = vae.decode(x / reg.LATENT_SCALE).sample  # SD latents are scaled to unit variance (LDM)
        finite = bool(x.isfinite().all())
        check(finite, f"samples that are not finite (--cfg-scale {args.cfg_scale}?): lower the scales")
        levels = (255 * ((x.float().clamp(-1, 1) + 1) / 2)).round()  # to the nearest of 8 bits' levels
        images.append(levels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, 3)
    return np.concatenate(images)


# Files ----------------------------------------------------------------------------------------------------------------


def save_npz(path, arrays):
    """Atomically: a kill leaves the file whole or absent, so a shard that exists is a finished one (a failed write's
    temporary file is overwritten by the next try)."""
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def claim_folder(out, model, args, rank):
    """Refuse a folder whose samples came from other settings or weights (a fingerprint of the tensors, not the path:
    a checkpoint replaced by another model's is refused, the same weights elsewhere continue); else record ours in
    settings.json, each rank through its own temporary file, so that no reader meets half a file."""
    settings = dict({k: vars(args)[k] for k in SAMPLE_FLAGS}, config=vars(model.cfg))
    settings["weights"] = reg.fingerprint(*model.state_dict().values())
    path = os.path.join(out, "settings.json")
    old = json.loads(Path(path).read_text()) if os.path.isfile(path) else settings
    diff = [f"{k}: {old.get(k)} there, {v} now" for k, v in settings.items() if old.get(k) != v]
    check(not diff, f"{out} holds samples made with other settings or weights ({'; '.join(diff)}): pass another --out")
    Path(f"{path}.{rank}").write_text(json.dumps(settings, indent=1))
    os.replace(f"{path}.{rank}", path)


# main -----------------------------------------------------------------------------------------------------------------


def sample_grid(model, vae, args, device, stored, path):
    """The grid: sample i in row i % rows, column i // rows (by its label, as in the .npz), rows named by the classes
    the checkpoint's training args store, else by their labels. -> the images."""
    rows = len(args.labels)
    images = generate(model, vae, range(rows * args.per_row), args, device)
    classes = stored.get("args", {}).get("classes") if isinstance(stored.get("args"), dict) else None
    names = [str(classes[y]) if classes else str(y) for y in args.labels]
    tiles = torch.from_numpy(images).view(args.per_row, rows, *images.shape[1:])  # (K, R, H, W, 3)
    tiles = tiles.permute(1, 0, 4, 2, 3).float() / 255  # (R, K, 3, H, W) in [0, 1]
    title = f"{Path(args.ckpt).name}: {args.sampler}, {args.sample_steps} steps, CFG scale {args.cfg_scale}"
    reg.save_grid(path, tiles, names, title=title)
    return images


def sample_npz(model, vae, args, device, out):
    """Sample the shards shard-FFFFFFF-LLLLLLL.npz that are missing (under torchrun, rank r the shards j with
    j % world == r; the other ranks exit after theirs); then rank 0 merges them into samples_N.npz and removes them.
    -> (its path, its images). The files are the state: a shard that exists is
    finished (written atomically), and a rerun after the merge reads samples_N.npz and samples nothing."""
    rank = int(os.environ.get("RANK", 0))  # torchrun's
    world = int(os.environ.get("WORLD_SIZE", 1))
    claim_folder(out, model, args, rank)
    final = os.path.join(out, f"samples_{args.num_samples}.npz")
    shards = [range(i, min(i + args.shard_size, args.num_samples)) for i in range(0, args.num_samples, args.shard_size)]
    paths = [os.path.join(out, f"shard-{shard.start:07d}-{shard.stop:07d}.npz") for shard in shards]
    for j, shard in enumerate(shards):
        if j % world != rank or os.path.isfile(paths[j]) or os.path.isfile(final):
            continue
        save_npz(paths[j], dict(arr_0=generate(model, vae, shard, args, device)))
        print(f"shard {j + 1}/{len(shards)}: {paths[j]}")
    if rank > 0:
        raise SystemExit(0)  # done: rank 0 merges
    while not os.path.isfile(final) and not all(os.path.isfile(path) for path in paths):
        time.sleep(10)  # the other ranks' shards (torchrun stops every rank when one fails)
    if not os.path.isfile(final):
        parts = [np.load(path) for path in paths]
        save_npz(final, {key: np.concatenate([part[key] for part in parts]) for key in parts[0].files})
        for path in paths:
            os.remove(path)
    return final, np.load(final)["arr_0"]


def main(args):
    """Refuse bad flags, then run; every error ends in one line that says what to fix, never in a traceback: reg's
    (ValueError, RuntimeError), a folder that cannot be written (a full disk, read-only, under a file) and Ctrl-C."""
    vars(args).update(PAPER if args.paper else {})  # --paper overrides the sampler flags
    check(args.out is None or not os.path.isfile(args.out), f"--out {args.out} is a file: pass a folder")
    # TF32 matmuls and convolutions (the release's default on GPUs, cuDNN's too) off, so float32 is float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return run(args)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"sample.py: {e}") from None
    except OSError as e:
        raise SystemExit(f"sample.py: cannot write ({e}): free disk space or pass a writable folder as --out") from None
    except KeyboardInterrupt:
        raise SystemExit("sample.py: stopped; the finished .npz shards are kept: the same command goes on") from None


def run(args):
    """Load the model, sample the grid (default) or the .npz."""
    device = reg.pick_device(args.device)
    model = reg.load_model(args.ckpt).to(device)  # the EMA weights, as the paper samples
    stored = reg.load_checkpoint(args.ckpt)  # its training args may name the classes and the VAE
    cfg = model.cfg
    check(cfg.in_channels == 4 or not args.vae, "--vae decodes latents; this model makes pixels: drop --vae")
    # the labels: the grid's rows (by default the first 10 classes), or for --npz the pool (by default every class)
    args.labels = args.labels or list(range(cfg.num_classes if args.npz else min(10, cfg.num_classes)))
    check(max(args.labels) < cfg.num_classes, f"--labels must lie in 0..{cfg.num_classes - 1}, the model's classes")
    # latent models: --vae, else the VAE the checkpoint names (train_imagenet.py's), else the paper's
    args.vae = (args.vae or stored.get("vae") or "ema") if cfg.in_channels == 4 else None
    vae = reg.load_vae(args.vae, device) if args.vae else None
    out = args.out or os.path.join("samples", f"{Path(args.ckpt).resolve().parent.name}-{Path(args.ckpt).stem}")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    if args.npz:
        path, images = sample_npz(model, vae, args, device, out)
    else:
        path = os.path.join(out, "grid.png")
        images = sample_grid(model, vae, args, device, stored, path)
    result = dict(path=path, samples=len(images), seconds=round(time.perf_counter() - start, 1))
    print(f"wrote {path}: {len(images)} samples in {result['seconds']} s")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("ckpt", help="train_*.py's NNNNNNN.pt, the official SiT-XL/2+REG release's .pt, or a state dict")
    a("--sampler", default="sde", choices=["sde", "euler"], help="sde (Euler-Maruyama, the paper's) or euler (ODE)")
    a("--sample-steps", type=reg.positive_int, default=250, help="sampler steps (default: 250, the paper's)")
    a("--cfg-scale", type=reg.finite_float, default=1.0, help="CFG scale: 1 conditional, 0 unconditional (default: 1)")
    a("--cls-cfg-scale", type=reg.finite_float, help="the REG token's CFG scale (default: --cfg-scale, as the release)")
    a("--guidance-low", type=reg.unit_float, default=0.0, help="CFG only where t >= this (default: 0)")
    a("--guidance-high", type=reg.unit_float, default=1.0, help="CFG only where t <= this (default: 1; paper: 0.85)")
    a("--paper", action="store_true", help=f"the paper's CFG setting, over the sampler flags: {PAPER}")
    a("--seed", type=reg.nonneg_int, default=0, help="sample i's noise depends on (seed, i) only (default: 0)")
    a("--batch-size", type=reg.positive_int, default=64, help="samples per forward pass; no sample depends on it")
    a("--device", help="default: cuda (under torchrun: cuda:LOCAL_RANK), then mps, then cpu")
    a("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast on GPUs (default: fp32, exact)")
    a("--out", help="output folder (default: samples/<run folder>-<checkpoint name>)")
    a("--labels", type=reg.nonneg_int, nargs="+", help="labels, e.g. 1 2 3 (default: grid 0..9, --npz all classes)")
    a("--per-row", type=reg.positive_int, default=8, help="grid: samples per label row (default: 8)")
    a("--npz", action="store_true", help="write samples_N.npz for the ADM evaluator; sample i has label i %% K")
    a("--num-samples", type=reg.positive_int, default=50000, help="--npz: samples (default: 50000, FID-50K)")
    a("--shard-size", type=reg.positive_int, default=1000, help="--npz: samples per shard, the unit of resume (1000)")
    a("--vae", help="latent models: ema, mse or a local folder (default: the checkpoint's, else ema, the paper's)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
