"""
Sample a REG / SiT checkpoint (ours or the official release) into a PNG grid, PNGs or an .npz for the ADM evaluator;
score FD_DINOv2 and REG's token consistency; time the sampler; export our weights in the release's layout.
  python sample.py runs/cifar/0050000.pt                                # grid, a row per class, SDE 250 steps, no CFG
  python sample.py SiT-XL-2-REG.pt --paper --npz                        # the paper's CFG setting, 50K samples for FID
  torchrun --nproc_per_node 8 sample.py SiT-XL-2-REG.pt --paper --npz   # the same on 8 GPUs (rank r: shards j % 8 == r)
  python sample.py runs/in256/0400000.pt --export SiT-B-2-REG.pt        # our EMA weights in the release's layout
Rerun an interrupted --npz command to resume it (at any --batch-size). Reproducibility: see --seed.
"""

import argparse
import atexit
import datetime
import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import reg

# the paper's CFG setting (REG Sec. 4): SDE, 250 steps, scale 2.3 for image and token, guidance interval [0, 0.85]
PAPER = dict(sampler="sde", sample_steps=250, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_low=0.0, guidance_high=0.85)

# the flags a sample depends on (with the weights, the config, the labels and the VAE): an output folder's
# settings.json must agree on all of them before samples are added. --batch-size is not one: it changes no sample.
SAMPLE_FLAGS = (
    "sampler",
    "sample_steps",
    "cfg_scale",
    "cls_cfg_scale",
    "guidance_low",
    "guidance_high",
    "seed",
    "precision",
    "tf32",
    "uint8",
    "labels_random",
    "encoder",
    "encoder_weights",
)
NOT_COMPARED = ("checkpoint",)  # settings.json notes the checkpoint's path; its weights are compared by fingerprint
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def fail(message):
    raise SystemExit(f"sample.py: {message}")


def check(ok, message):
    if not ok:
        fail(message)


def label_list(text):
    """--labels 1,2,3 -> [1, 2, 3]."""
    return [int(label) for label in text.split(",")]


def seed_of(*key):
    """A 63-bit seed from a key such as (seed, sample index), so no sample's noise depends on its batch or GPU."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# Checkpoints ----------------------------------------------------------------------------------------------------------


def read_checkpoint(path):
    """The file's contents: ours, the release's or a bare state dict (.pt), or a state dict (.safetensors)."""
    if not path.endswith(".safetensors"):
        return reg.load_checkpoint(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise ValueError(f"{path!r} cannot be read as safetensors ({type(e).__name__}: {str(e)[:120]})") from None


def pick_weights(checkpoint, which, path):
    """The state dict to sample: `which` ('ema' or 'model') of ours or the release's, or the file itself when it is a
    bare state dict; a file without SiT weights is refused in words."""
    if not isinstance(checkpoint, dict):
        kind = type(checkpoint).__name__
        raise ValueError(
            f"{path} holds a {kind}, not a checkpoint: pass train_*.py's NNNNNNN.pt, the release or a state dict"
        )
    bare = len(checkpoint) > 0 and all(torch.is_tensor(v) for v in checkpoint.values())
    weights = checkpoint if bare else checkpoint.get(which)
    if not isinstance(weights, dict):
        keys = sorted(map(str, checkpoint))[:8]
        raise ValueError(f"{path} has no {which!r} weights (its keys: {keys}): pick another --weights or checkpoint")
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}
    if not torch.is_tensor(weights.get("x_embedder.proj.weight")):
        part = "file" if bare else f"{which!r} entry"
        raise ValueError(f"{path}: its {part} holds no SiT weights (no x_embedder.proj.weight): pass a SiT checkpoint")
    return weights


def model_config(checkpoint, weights, encoder_depth):
    """Ours stores the config; the release's is read off the weights, its REPA block from its args."""
    if "config" in checkpoint:
        cfg = reg.config_from_dict(checkpoint["config"])
    else:
        cfg = reg.config_from_state_dict(weights)
    release_args = checkpoint.get("args")  # the release's argparse.Namespace (ours: a dict, no attributes)
    cfg.encoder_depth = encoder_depth or getattr(release_args, "encoder_depth", cfg.encoder_depth)
    return cfg


def load_model(args):
    """-> (model on the CPU, the checkpoint's dict); any problem with the file ends the script with its reason."""
    try:
        checkpoint = read_checkpoint(args.ckpt)
        weights = pick_weights(checkpoint, args.weights, args.ckpt)
        cfg = model_config(checkpoint, weights, args.encoder_depth)
        model = reg.load_weights(reg.SiT(cfg), weights)
    except ValueError as e:
        fail(e)
    return model, checkpoint


def weights_fingerprint(model):
    """What makes two checkpoints the same model, whatever their path: a digest of the tensors in sorted key order."""
    state = model.state_dict()
    tensors = [state[k] for k in sorted(state)]
    return reg.fingerprint(*tensors)


def export_weights(model, path):
    """Our weights under the release's names (reg.rename_to_official). A .pt holds them as both 'ema' (what the
    release's generate.py reads) and 'model', with our config; a .safetensors holds the weights alone."""
    weights = {reg.rename_to_official(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".pt"):
        reg.save_checkpoint(path, dict(ema=weights, model=weights, config=asdict(model.cfg)))
    else:
        from safetensors.torch import save_file

        save_file(weights, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic, as save_checkpoint
    print(f"exported {len(weights)} tensors in the release's layout to {path}")
    return dict(path=path, tensors=len(weights))


# Sampling -------------------------------------------------------------------------------------------------------------


class SampleNoise:
    """The SDE's noise for a batch: row k is drawn from sample k's own generator, so it depends only on (seed, i)."""

    def __init__(self, generators):
        self.generators = generators

    def __call__(self, state):  # state (B, ...): the image or the token
        draws = [torch.randn(state.shape[1:], generator=g, dtype=state.dtype) for g in self.generators]
        return torch.stack(draws).to(state.device)


def start_noise(cfg, indices, seed):
    """Each sample's generator, seeded by (seed, i), and its draws at t = 1: first the image, then the token."""
    generators = [torch.Generator().manual_seed(seed_of(seed, i)) for i in indices]
    x = torch.stack([torch.randn(cfg.in_channels, cfg.input_size, cfg.input_size, generator=g) for g in generators])
    cls = None
    if cfg.entangled:
        cls = torch.stack([torch.randn(cfg.encoder_dim, generator=g) for g in generators])  # (B, E)
    return x, cls, generators


def draw_labels(indices, labels, seed, random_draw):
    """Class-balanced: sample i has labels[i % len(labels)]. random_draw (the release's draw, not balanced): a uniform
    pick from a generator seeded by (seed, i, 'label'), so shards, resumes and batch sizes still agree."""
    if not random_draw:
        return [labels[i % len(labels)] for i in indices]
    drawn = []
    for i in indices:
        generator = torch.Generator().manual_seed(seed_of(seed, i, "label"))
        pick = torch.randint(len(labels), (1,), generator=generator)
        drawn.append(labels[int(pick)])
    return drawn


def to_uint8(images, rule="round"):
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3). 'round': the nearest of the 256 levels (ours);
    'truncate': the release's generate.py, 255 (x + 1) / 2 clipped and cast, i.e. rounded down (half a level darker
    on average)."""
    if rule == "truncate":
        levels = (255.0 * ((images + 1) / 2)).clamp(0, 255)
    else:
        levels = ((images.clamp(-1, 1) + 1) * 127.5).round()
    return levels.to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def sample_batch(model, vae, indices, labels, args, device):
    """Samples `indices` -> (images in [-1, 1] (B, 3, H, W), the generated tokens (B, E) or None)."""
    cfg = model.cfg
    x, cls, generators = start_noise(cfg, indices, args.seed)
    x = x.to(device)
    if cls is not None:
        cls = cls.to(device)
    y = torch.tensor(draw_labels(indices, labels, args.seed, args.labels_random), device=device)
    noise = SampleNoise(generators)  # the SDE's noise: per sample too
    interval = (args.guidance_low, args.guidance_high)
    scales = (args.cfg_scale, args.cls_cfg_scale)
    with reg.autocast(device, args.precision):
        x, cls = reg.sample(
            model, x, y, cls, args.sample_steps, args.sampler, *scales, interval, cfg.num_classes, noise=noise
        )
        if vae is not None:
            x = vae.decode(x / reg.LATENT_SCALE).sample  # SD latents are scaled to unit variance (LDM)
    images = x.float().clamp(-1, 1)
    return images, cls


@torch.no_grad()
def token_consistency(cfg, encoder, images, cls):
    """REG's token consistency (B,): the cosine between the token the model generated and the encoder's token of the
    image it generated (what the token slot stands for: reg.token_target)."""
    real_token = reg.token_target(cfg, encoder(images))  # (B, E)
    return torch.cosine_similarity(real_token, cls.float(), dim=-1).cpu()


def generate(model, vae, encoder, first, last, labels, args, device, bar):
    """Samples first..last-1 -> uint8 images (n, H, W, 3) and, given an encoder, each one's token consistency (n,)."""
    images = []
    cosines = []
    for start in range(first, last, args.batch_size):
        indices = range(start, min(start + args.batch_size, last))
        batch, cls = sample_batch(model, vae, indices, labels, args, device)
        if encoder is not None:
            cosines.append(token_consistency(model.cfg, encoder, batch, cls))
        images.append(to_uint8(batch, args.uint8))
        bar.update(len(indices))
    cosines = torch.cat(cosines).numpy() if cosines else None
    return torch.cat(images).numpy(), cosines


class CountEvaluations:
    """Counts network evaluations (NFE), one per sample and forward pass, through a forward pre-hook."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, inputs):
        self.count += len(inputs[0])


def bench(model, vae, encoder, labels, args, device):
    """--bench: time `args.bench` batches after `args.warmup` untimed ones; writes no files."""
    counter = CountEvaluations(model)
    timer = reg.StepTimer(device)
    bar = tqdm(disable=True)
    batches = args.warmup + args.bench
    for _ in range(batches):
        timer.start()
        generate(model, vae, encoder, 0, args.batch_size, labels, args, device, bar)
        timer.mark("sample")
    counter.handle.remove()
    nfe_per_sample = counter.count / (batches * args.batch_size)  # CFG doubles it inside its interval
    flops_per_sample = nfe_per_sample * reg.model_flops(model.cfg, train=False)  # the SiT only, not the VAE
    report = timer.report(args.batch_size, flops_per_sample, device, args.warmup, args.peak_tflops)
    samples_per_s = report["images_per_s"]
    nfe_per_s = nfe_per_sample * samples_per_s
    mfu = f", MFU {report['mfu']:.1%}" if math.isfinite(report["mfu"]) else ""  # needs the GPU's peak
    print(
        f"{samples_per_s:.3g} samples/s, {nfe_per_s:.3g} NFE/s ({nfe_per_sample:.0f} a sample), "
        f"{report['ms_step']:.1f} ms a batch of {args.batch_size}, {report['tflops']:.3g} TFLOP/s{mfu}"
    )
    return dict(samples_per_s=samples_per_s, nfe_per_s=nfe_per_s, nfe_per_sample=nfe_per_sample, **report)


# Inputs and output folder ---------------------------------------------------------------------------------------------


def check_flags(args):
    """Refuse bad flags before anything is loaded or written."""
    check(args.guidance_low <= args.guidance_high, "need --guidance-low <= --guidance-high")  # each in [0, 1]
    check(args.npz or not args.labels_random, "--labels-random is for --npz (the grid has a row per label)")
    check(args.out is None or not os.path.isfile(args.out), f"--out {args.out} is a file: pass a folder")
    if args.export:
        check(args.export.endswith((".pt", ".safetensors")), f"--export {args.export}: name a .pt or .safetensors file")
        check(not os.path.exists(args.export), f"--export {args.export} exists: delete it or pass another name")


def pick_labels(args, num_classes):
    """--labels, else the grid's rows (the first 10 classes) or, for --npz, every class."""
    labels = args.labels or list(range(num_classes if args.npz else min(num_classes, 10)))
    inside = all(0 <= label < num_classes for label in labels)
    check(inside, f"--labels {args.labels} must lie in 0..{num_classes - 1} (the model's classes)")
    return labels


def default_out(ckpt):
    """samples/<run folder>-<checkpoint name>: every run has a 0000300.pt, so the run's name comes first."""
    path = os.path.abspath(ckpt)
    run_name = os.path.basename(os.path.dirname(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("samples", f"{run_name}-{stem}")


def fd_reference(args):
    """The FD reference (an .npz holding arr_0 or a folder of images), or None without --fd-ref."""
    if not args.fd_ref:
        return None
    ref = args.data_dir if args.fd_ref == "cifar10-train" else args.fd_ref
    check(os.path.exists(ref), f"--fd-ref {ref!r} (--data-dir for cifar10-train) does not exist")
    has_images = ref.endswith(".npz") or any(f.suffix.lower() in IMAGE_SUFFIXES for f in Path(ref).rglob("*"))
    check(has_images, f"--fd-ref {ref!r} is no .npz with arr_0 and no folder of .png/.jpg images")
    return ref


def load_tools(args, model, vae_name, device):
    """The VAE (latent models), the encoder of the token consistency, the FD encoder: each only when asked for."""
    cfg = model.cfg
    check(not args.encoder or model.entangled, "token consistency needs a model with the REG token: drop --encoder")
    vae = None
    encoder = None
    fd_encoder = None
    try:
        if vae_name:
            vae = reg.load_vae(vae_name, device)
        if args.encoder:
            encoder = reg.load_encoder(args.encoder, cfg.grid, args.encoder_weights, device)
        if args.fd_ref:
            fd_encoder = reg.load_encoder(args.fd_encoder, 16, args.fd_encoder_weights, device, "--fd-encoder-weights")
    except (ValueError, RuntimeError) as e:
        fail(e)
    check(
        not encoder or encoder.dim == cfg.encoder_dim,
        f"--encoder is {encoder and encoder.dim}-d, the token {cfg.encoder_dim}-d",
    )
    return vae, encoder, fd_encoder


def claim_folder(out, settings, rank):
    """Refuse a folder whose samples came from other settings or other weights; else record ours in settings.json."""
    path = os.path.join(out, "settings.json")
    new = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    old = new
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    keys = sorted((set(old) | set(new)) - set(NOT_COMPARED))
    diff = [f"{k}: {old.get(k)} there, {new.get(k)} now" for k in keys if old.get(k) != new.get(k)]
    check(not diff, f"{out} holds samples made with other settings or weights ({'; '.join(diff)}): pass another --out")
    os.makedirs(out, exist_ok=True)
    if rank == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(new, f, indent=1)
        os.replace(path + ".tmp", path)


def shard_path(out, first, last, suffix=""):
    return os.path.join(out, f"shard-{first:07d}-{last:07d}{suffix}.npz")


def write_shards(model, vae, encoder, todo, labels, args, device, out, rank):
    """Sample and save each shard of `todo` (first, last): atomically, so a shard is whole or absent."""
    total = sum(last - first for first, last in todo)
    with tqdm(total=total, unit="img", disable=rank > 0 or not todo) as bar:
        for first, last in todo:
            images, cosines = generate(model, vae, encoder, first, last, labels, args, device, bar)
            arrays = dict(arr_0=images)
            if cosines is not None:
                arrays["cos"] = cosines
            np.savez(shard_path(out, first, last, ".tmp"), **arrays)
            os.replace(shard_path(out, first, last, ".tmp"), shard_path(out, first, last))
            if args.save_png:
                save_pngs(images, first, os.path.join(out, "png"))


def save_pngs(images, first, folder):
    os.makedirs(folder, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{first + k:06d}.png"))


def merge_shards(out, shards, final, rows, npz):
    """The shards -> grid.png (sample i in row i % rows, i.e. by its label) or samples_N.npz (ADM: arr_0, uint8,
    (N, H, W, 3); the token consistencies as `cos`). Returns (images, cosines or None)."""
    parts = [np.load(shard_path(out, *shard)) for shard in shards]
    images = np.concatenate([part["arr_0"] for part in parts])  # (N, H, W, 3) uint8
    cosines = None
    if "cos" in parts[0]:
        cosines = np.concatenate([part["cos"] for part in parts])
    H, W = images.shape[1:3]
    if not npz:
        grid = images.reshape(-1, rows, H, W, 3).transpose(1, 2, 0, 3, 4).reshape(rows * H, -1, 3)
        Image.fromarray(grid).save(final)
        return images, cosines
    arrays = dict(arr_0=images)
    if cosines is not None:
        arrays["cos"] = cosines
    np.savez(final + ".tmp.npz", **arrays)
    os.replace(final + ".tmp.npz", final)
    return images, cosines


def image_files(folder):
    return sorted(str(f) for f in Path(folder).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)


def as_array(item, size):
    """An (H, W, 3) uint8 array, or an image file read as one at size x size."""
    if not isinstance(item, str):
        return item
    image = Image.open(item).convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def image_batches(source, size, batch=100):
    """uint8 (B, 3, H, W) batches from an (N, H, W, 3) array, an .npz holding arr_0, or a folder of images (resized)."""
    if isinstance(source, str) and source.endswith(".npz"):
        source = np.load(source)["arr_0"]
    elif isinstance(source, str):
        source = image_files(source)
    for first in range(0, len(source), batch):
        arrays = [as_array(item, size) for item in source[first : first + batch]]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def scores(images, cosines, fd_encoder, ref, out, args):
    """REG's token consistency (given --encoder) and the Frechet distance to --fd-ref (given it)."""
    result = {}
    if cosines is not None:
        result["token_consistency"] = float(cosines.mean())
    if fd_encoder is not None:
        size = images.shape[1]
        key = repr((os.path.abspath(ref), args.fd_encoder, args.fd_encoder_weights, size))
        cache = os.path.join(out, f"fd-ref-{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt")  # reference once
        generated = reg.encoder_stats(fd_encoder, image_batches(images, size))
        reference = reg.encoder_stats(fd_encoder, image_batches(ref, size), cache)
        result["fd"] = reg.frechet_distance(generated, reference)
    return result


def setup_distributed():
    """Under torchrun (RANK set): one process per GPU in a process group -> (ddp, rank, world size)."""
    if "RANK" not in os.environ:
        return False, 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))  # the barrier waits for the slowest
    atexit.register(dist.destroy_process_group)
    return True, dist.get_rank(), dist.get_world_size()


# main -----------------------------------------------------------------------------------------------------------------


def main(args):
    if args.paper:
        vars(args).update(PAPER)
    check_flags(args)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # the release's default is on; off here (exact float32)
    torch.backends.cudnn.allow_tf32 = args.tf32
    ddp, rank, world = setup_distributed()
    device = reg.pick_device(args.device)

    # Model
    model, checkpoint = load_model(args)
    if args.export:
        return export_weights(model, args.export)
    model = model.to(device).eval()
    labels = pick_labels(args, model.cfg.num_classes)
    latent = model.cfg.in_channels == 4
    check(latent or args.vae is None, "--vae decodes latent models (4 channels); this one makes pixels: drop --vae")
    vae_name = None
    if latent:  # latent models: --vae, else the checkpoint's, else the paper's
        vae_name = args.vae or checkpoint.get("vae") or "ema"
    ref = fd_reference(args)
    vae, encoder, fd_encoder = load_tools(args, model, vae_name, device)
    if args.bench:
        return bench(model, vae, encoder, labels, args, device)

    # Output folder
    out = args.out or default_out(args.ckpt)
    settings = {k: getattr(args, k) for k in SAMPLE_FLAGS}
    fingerprint = weights_fingerprint(model)  # the weights, not the path: a replaced file is another model
    settings.update(labels=labels, config=asdict(model.cfg), vae=vae_name, weights=fingerprint)
    settings.update(checkpoint=os.path.abspath(args.ckpt))
    claim_folder(out, settings, rank)
    N = args.num_samples if args.npz else len(labels) * args.per_row
    final = os.path.join(out, f"samples_{N}.npz" if args.npz else "grid.png")
    shards = [(first, min(first + args.shard_size, N)) for first in range(0, N, args.shard_size)]

    # Sample: shards are the unit of resume and of the split over GPUs (rank r takes shards j % world == r)
    finished = args.npz and os.path.isfile(final)  # merged before (its shards may be gone): nothing to sample
    todo = []
    if not finished:
        mine = [shard for j, shard in enumerate(shards) if j % world == rank]
        todo = [shard for shard in mine if not os.path.exists(shard_path(out, *shard))][: args.max_shards]
    write_shards(model, vae, encoder, todo, labels, args, device, out, rank)
    if ddp:
        dist.barrier()

    # Merge and score
    return finish(out, shards, final, labels, fd_encoder, ref, rank, finished, args)


def finish(out, shards, final, labels, fd_encoder, ref, rank, finished, args):
    """Rank 0, all shards present: merge them (then delete them unless --keep-shards), score, report."""
    done = sum(os.path.exists(shard_path(out, *shard)) for shard in shards)
    if rank > 0:
        return dict(done=done, shards=len(shards))
    if not finished and done < len(shards):
        print(f"{done}/{len(shards)} shards in {out}: run the same command again to finish")
        return dict(done=done, shards=len(shards))
    if finished:
        merged = np.load(final)
        images = merged["arr_0"]
        cosines = merged["cos"] if "cos" in merged else None
    else:
        images, cosines = merge_shards(out, shards, final, len(labels), args.npz)
    if not args.keep_shards:
        for shard in shards:
            Path(shard_path(out, *shard)).unlink(missing_ok=True)
    result = scores(images, cosines, fd_encoder, ref, out, args)
    pngs = f" and {out}/png" if args.save_png else ""
    named = [f", {k.replace('fd', 'FD_' + args.fd_encoder)} {v:.4f}" for k, v in result.items()]
    print(f"wrote {len(images)} samples to {final}{pngs}, settings.json" + "".join(named))
    return dict(path=final, samples=len(images), **result)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("ckpt", help="our checkpoint (train_*.py's NNNNNNN.pt), the official SiT-XL/2+REG release, a bare state dict, "
      "or a .safetensors of one")  # fmt: skip
    a("--weights", default="ema", choices=["ema", "model"], help="which weights (default: ema, as the paper samples)")
    a(
        "--encoder-depth",
        type=reg.positive_int,
        help="the REPA block (default: the file's config or the release's args, else 8)",
    )
    a("--sampler", default="sde", choices=["sde", "euler", "heun"], help="default: sde (Euler-Maruyama, the paper's)")
    a("--sample-steps", type=reg.positive_int, default=250, help="sampler steps (default: 250, the paper's)")
    a("--cfg-scale", type=float, default=1.0, help="CFG scale (default: 1 = no CFG, the paper's main tables)")
    a("--cls-cfg-scale", type=float, help="the REG token's CFG scale (default: --cfg-scale, as the release)")
    a("--guidance-low", type=reg.unit_float, default=0.0, help="CFG only where t >= this (default: 0, the paper)")
    a("--guidance-high", type=reg.unit_float, default=1.0, help="CFG only where t <= this (default: 1; paper: 0.85)")
    a(
        "--paper",
        action="store_true",
        help="the paper's CFG run, over the flags: " + ", ".join(f"{k}={v}" for k, v in PAPER.items()),
    )
    a("--seed", type=reg.nonneg_int, default=0, help="sample i's noise (start and SDE steps, image and token) depends only on "
      "(seed, i): the same noise whatever the batch size, shards, resumes or GPU count (default: 0)")  # fmt: skip
    a("--batch-size", type=reg.positive_int, default=64, help="samples per forward pass; no sample depends on it")
    a("--device", help="default: cuda, then mps, then cpu")
    a("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast on GPUs (default: fp32, exact)")
    a("--tf32", action="store_true", help="TF32 matmuls (and cuDNN convolutions) on GPUs, the release's default "
      "(default: off, exact float32)")  # fmt: skip
    a("--out", help="output folder (default: samples/<run folder>-<checkpoint name>); its settings.json keeps "
      "samples of other settings or weights from mixing")  # fmt: skip
    a("--npz", action="store_true", help="write samples_N.npz for the ADM evaluator; sample i has label i %% K")
    a("--num-samples", type=reg.positive_int, default=50000, help="samples in --npz mode (default: 50000, FID-50K)")
    a(
        "--shard-size",
        type=reg.positive_int,
        default=1000,
        help="samples per shard file; unit of resume, GPU split (default: 1000)",
    )
    a("--max-shards", type=reg.positive_int, help="stop after this many new shards (rerun to resume)")
    a("--keep-shards", action="store_true", help="keep the shard files after merging them (default: delete them)")
    a("--labels", type=label_list, help="labels like 1,2,3 (default: grid 0..9, npz all classes)")
    a("--labels-random", action="store_true", help="--npz: labels drawn at random per sample from (seed, i), as the "
      "release draws them, not class-balanced (default: off)")  # fmt: skip
    a("--uint8", default="round", choices=["round", "truncate"], help="to 8 bits: round to the nearest level, or "
      "truncate 255 (x + 1) / 2 as the release's generate.py (default: round)")  # fmt: skip
    a("--per-row", type=reg.positive_int, default=8, help="grid samples per label row (default: 8)")
    a("--save-png", action="store_true", help="also write each sample as <out>/png/NNNNNN.png")
    a("--vae", help="latent models' SD-VAE: ema, mse or a folder (default: the checkpoint's, else ema, the paper's)")
    a("--fd-ref", help="reference of the Frechet distance: a folder of images, an .npz with arr_0, or cifar10-train")
    a("--data-dir", default="data/cifar10/train", help="cifar10-train: its class folders (default: data/cifar10/train)")
    a("--fd-encoder", default="dinov2-l", help="FD features at 224px (default: dinov2-l, FD_DINOv2 of Stein et al.)")
    a("--fd-encoder-weights", help="weights file of --fd-encoder (default: fetch from the hub; 'random': tests)")
    a("--encoder", help="the training encoder, for REG's token consistency (default: none, skip; paper: dinov2-b)")
    a("--encoder-weights", help="weights file of --encoder (default: fetch from the hub; 'random': tests)")
    a("--bench", type=reg.nonneg_int, default=0, help="time this many batches after --warmup ones; no files")
    a("--warmup", type=reg.nonneg_int, default=1, help="--bench: untimed batches first (default: 1)")
    a("--peak-tflops", type=reg.nonneg_float, default=0, help="--bench: peak TFLOP/s for the MFU (default: by name)")
    a("--export", help="write the weights in the release's layout to this .pt or .safetensors file, and exit")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
