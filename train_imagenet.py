"""
Train REG on ImageNet 256 or 512 in SD-VAE latent space (REG Sec. 4), from a class subset on one GPU to many nodes.

  prepare  ImageFolder -> ADM centre crops + SD-VAE posteriors (mean, std) in shard files, with a manifest.json. A rerun
           keeps every shard whose files are unchanged and makes the others; under torchrun each process encodes every
           WORLD_SIZE-th shard.
  train    the paper's recipe: SiT-XL/2, DINOv2-B, lambda 0.5, beta 0.03, AdamW 1e-4, batch 256, EMA 0.9999, clip 1.
           `python` on one GPU, `torchrun` for DDP; --micro-batch keeps the batch on fewer GPUs. A run folder that holds
           checkpoints continues from the newest, exactly, if the experiment is the same (--lr, --precision,
           --micro-batch ... may change). Every log record carries images/s, MFU and peak memory, so a short run is a
           benchmark (--steps 50 --log-every 10).

    python train_imagenet.py prepare --data-dir ~/imagenet/train --out data/in10 --classes 10
    torchrun --nproc_per_node 8 train_imagenet.py prepare --data-dir ~/imagenet/train --out data/in256
    python train_imagenet.py train --data-dir data/in10 --out runs/in10-b2 --model SiT-B/2 --micro-batch 64
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        train_imagenet.py train --data-dir data/in256 --out runs/xl2-reg --steps 4000000
    python train_imagenet.py train --data-dir data/in256 --out runs/xl2-reg --steps 4000000 --lr 5e-5  # continue it
"""

import argparse
import copy
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import reg

SHARD_KEYS = ("mean", "std", "images", "labels")  # what a shard holds, besides its `source`
# a resume refuses a change of these, which make the experiment (encoder_key: the encoder's weights, whatever their
# file or name; data_key: the preparation's sources); the others (lr, precision, micro-batch, ...) may change
MUST_MATCH = "model method beta lam batch_size seed encoder_key data_key".split()


# Prepare: ImageFolder -> shards of centre crops and SD-VAE posteriors ------------------------------------------------


def center_crop(image, res):
    """ADM's crop (guided-diffusion image_datasets.py, center_crop_arr): halve with a BOX filter while the short side
    is >= 2 res (cheap, alias-free), BICUBIC-resize the short side to res (enlarging a smaller image, as ADM does),
    cut the centre -> uint8 (res, res, 3)."""
    while min(image.size) >= 2 * res:
        half = tuple(side // 2 for side in image.size)
        image = image.resize(half, resample=Image.Resampling.BOX)
    scale = res / min(image.size)
    size = tuple(round(side * scale) for side in image.size)
    array = np.asarray(image.resize(size, resample=Image.Resampling.BICUBIC))
    top = (array.shape[0] - res) // 2
    left = (array.shape[1] - res) // 2
    return array[top : top + res, left : left + res]


def load_crop(path, res):
    """One image file -> its crop, uint8 (3, res, res); a file that cannot be read is an error naming it."""
    image = Image.fromarray(reg.read_image(path))  # 16-bit files scaled, unreadable ones named
    return torch.from_numpy(center_crop(image, res).copy()).permute(2, 0, 1)


def list_images(root, first_classes):
    """-> (class names, files) of an ImageFolder. A file is (name under root, label, size, mtime_ns): what a shard's
    source records, so an image replaced under the same name changes the source of its shard."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"--data-dir {root} is not an ImageFolder: put the images in one folder per class")
    files = []
    for label, name in enumerate(classes[:first_classes]):
        for file in sorted(os.listdir(os.path.join(root, name))):
            if file.lower().endswith(reg.IMAGE_SUFFIXES):
                stat = os.stat(os.path.join(root, name, file))
                files.append((f"{name}/{file}", label, stat.st_size, stat.st_mtime_ns))
    if not files:
        raise ValueError(f"no images ({', '.join(reg.IMAGE_SUFFIXES)}) in the class folders of {root}")
    return classes[:first_classes], files


def read_shard(path, source):
    """The shard file at `path`, memory-mapped (ImageNet need not fit in RAM), if it is readable and made from
    `source`; else None (missing, truncated, or made from other files)."""
    try:
        shard = torch.load(path, mmap=True, weights_only=True)
    except Exception:
        return None
    return shard if shard.get("source") == source else None


@torch.no_grad()
def encode_shard(files, source, vae, args):
    """files -> a shard: mean, std (N, 4, res/8, res/8) fp16, images (N, 3, res, res) uint8, labels (N,), and the
    `source` (what it was made from). Threads decode and crop (PIL releases the GIL); the VAE encodes 32 at a time."""
    paths = [os.path.join(args.data_dir, file[0]) for file in files]
    with ThreadPoolExecutor(8) as pool:
        images = torch.stack(list(pool.map(load_crop, paths, [args.resolution] * len(paths))))  # (N, 3, res, res)
    posteriors = [vae.encode(batch.to(vae.device) / 127.5 - 1).latent_dist for batch in images.split(32)]
    mean = torch.cat([posterior.mean.half().cpu() for posterior in posteriors])
    std = torch.cat([posterior.std.half().cpu() for posterior in posteriors])
    return dict(mean=mean, std=std, images=images, labels=torch.tensor([file[1] for file in files]), source=source)


def prepare(args):
    rank = int(os.environ.get("RANK", 0))
    classes, files = list_images(args.data_dir, args.classes)
    identity = dict(classes=classes, resolution=args.resolution, shard_size=args.shard_size)
    path = Path(args.out, "manifest.json")
    made = path.is_file() and any(Path(args.out).glob("shard_*.pt"))  # a folder without shards may start over
    other = json.loads(path.read_text()) if made else identity
    if {key: other.get(key) for key in identity} != identity:
        raise ValueError(f"{args.out} holds another preparation: pass another --out, or delete that folder")
    vae = os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae  # where sample.py finds it
    autoencoder = reg.load_vae(vae, reg.pick_device())  # before any file is written; under torchrun cuda:LOCAL_RANK
    vae_key = reg.fingerprint(*autoencoder.state_dict().values())  # its weights, whatever their folder
    chunks = [files[start : start + args.shard_size] for start in range(0, len(files), args.shard_size)]
    sources = [reg.fingerprint(identity, vae_key, chunk) for chunk in chunks]  # what each shard is made from
    names = [f"shard_{i:05d}.pt" for i in range(len(chunks))]
    manifest = dict(identity, vae=vae, vae_key=vae_key, counts=[len(c) for c in chunks], shards=names, sources=sources)
    # Then the manifest: `train` refuses an unfinished preparation by its missing shards, a preparation of other
    # classes, resolution or shard size into this folder is refused once it has a shard, and other images or VAE
    # weights remake the shards they change.
    os.makedirs(args.out, exist_ok=True)
    Path(f"{path}.{rank}").write_text(json.dumps(manifest, indent=1))
    os.replace(f"{path}.{rank}", path)  # atomic
    for i in range(rank, len(chunks), int(os.environ.get("WORLD_SIZE", 1))):  # under torchrun: every WORLD_SIZE-th
        shard_path = os.path.join(args.out, names[i])
        if read_shard(shard_path, sources[i]) is None:
            reg.save_checkpoint(shard_path, encode_shard(chunks[i], sources[i], autoencoder, args))  # atomic
            print(f"{shard_path}: {len(chunks[i])} images")


# Train: the data ----------------------------------------------------------------------------------------------------


def load_prepared(folder, batch_size):
    """The shards of a finished preparation, the first row of each (and the count of rows, last), and its manifest:
    every shard must be there, with the source it lists, and hold a batch."""
    path = Path(folder, "manifest.json")
    command = f"python train_imagenet.py prepare --data-dir <ImageFolder> --out {folder}"
    if not path.is_file():
        raise ValueError(f"{folder} holds no manifest.json: run prepare first, {command}")
    manifest = json.loads(path.read_text())
    shards = []
    for name, source in zip(manifest["shards"], manifest["sources"]):
        shards.append(read_shard(os.path.join(folder, name), source))
        if shards[-1] is None:
            raise ValueError(f"{folder}/{name} is missing, truncated or stale: rerun the `prepare` that made {folder}")
    starts = torch.tensor([0] + [len(shard["labels"]) for shard in shards]).cumsum(0)  # (shards + 1,)
    if starts[-1] < batch_size:
        raise ValueError(f"{folder} holds {int(starts[-1])} images, fewer than --batch-size {batch_size}")
    return shards, starts, manifest


@functools.lru_cache(maxsize=1)
def epoch_order(n, seed, epoch):
    """The data order of an epoch, from (seed, epoch) only: every process computes the same global batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_rows(step, rank, world, n, batch_size, seed):
    """The rows (indices into the concatenated shards) of process `rank`'s slice of the global batch of `step`: a
    function of the step alone, so a resumed run, and any number of processes, meet the same global batches."""
    steps_per_epoch = n // batch_size
    per_process = batch_size // world
    start = (step % steps_per_epoch) * batch_size + rank * per_process
    return epoch_order(n, seed, step // steps_per_epoch)[start : start + per_process]


def draw_seed(seed, step, position):
    """The seed of a micro-batch's random draws (latent, t, noise, dropped labels), from the run's seed, the
    step and the micro-batch's position in the global batch: the same draws however the batch is spread over GPUs."""
    return (seed * 1_000_003 + step) * 1_000_003 + position


def gather(shards, starts, rows, pin):
    """Rows -> a micro-batch's host tensors: mean, std, images, labels (SHARD_KEYS), pinned for a GPU (then its copy
    need not wait). The rows of each shard are read with one index (memory-mapped). Runs in the loader's thread, during
    the step before."""
    rows = rows.sort().values  # grouped by shard (the order within a micro-batch changes nothing)
    shard_of_row = torch.searchsorted(starts, rows, right=True) - 1  # (B,)
    parts = []
    for s in shard_of_row.unique().tolist():
        parts.append([shards[s][key][rows[shard_of_row == s] - starts[s]] for key in SHARD_KEYS])
    columns = [torch.cat(column) for column in zip(*parts)]
    return [column.pin_memory() for column in columns] if pin else columns


def get_batch(host, device):
    """A gathered micro-batch -> x (B, 4, h, w): a fresh latent drawn from each stored posterior and scaled (LDM); y
    (B,) labels; the uint8 crops (B, 3, H, W) for the encoder. The copies to a GPU do not wait (pinned memory)."""
    mean, std, images, y = [column.to(device, non_blocking=True) for column in host]
    noise = torch.randn(mean.shape, device=device)
    x = (mean.float() + std.float() * noise) * reg.LATENT_SCALE  # (B, 4, h, w), about unit variance
    return x, y, images


# Train ----------------------------------------------------------------------------------------------------------------


def processes(args):
    """torchrun's process (RANK of WORLD_SIZE, one per GPU; DDP wherever RANK is set, one process too), its device,
    the split of the global batch (micro-batches of `micro` images, `accum` of them per step) and whether DDP is on."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    micro = args.micro_batch or args.batch_size // world
    accum = args.batch_size // max(micro * world, 1)
    if micro * world * accum != args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is no multiple of --micro-batch x GPUs ({micro} x {world})")
    device = reg.pick_device(args.device)
    if "RANK" in os.environ:  # NCCL for the GPU's tensors; gloo for the CPU's (the stop flag: agreeing never waits)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return rank, world, micro, accum, device, dist.is_initialized()


def train(args):
    rank, world, micro, accum, device, ddp = processes(args)
    # Data: the shards stay memory-mapped on the host; a thread gathers a step's micro-batches during the step before
    shards, starts, manifest = load_prepared(args.data_dir, args.batch_size)
    n = int(starts[-1])
    # Model and optimiser
    encoder, model, ema, opt, scaler = build(args, manifest["resolution"] // 8, len(manifest["classes"]), device)
    encoder_key = reg.fingerprint(*encoder.state_dict().values()) if encoder else None  # its weights, not their path
    settings = dict(vars(args), data_key=reg.fingerprint(manifest["sources"]), encoder_key=encoder_key)
    extras = {key: manifest[key] for key in ("classes", "resolution", "vae")}  # what sample.py reads
    # Resume
    step = 0
    if reg.checkpoints(args.out):  # a run folder with checkpoints continues, if it is the same experiment
        step = reg.resume(args.out, settings, MUST_MATCH, model, ema, opt, scaler)["step"]
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model  # after the resume: copies rank 0's
    if rank == 0:
        print(f"{n} images stay on the host, memory-mapped; micro-batches of {micro} go to {device} one ahead")
    # Train
    flops_per_image = 3 * reg.model_flops(model.cfg)  # the SiT's training step (not the frozen encoder)
    sums = {}  # running sums since the last log, on the device: the loop waits for the device only at logs
    last = (step, time.perf_counter())  # the step and time of the last log record
    pin = device.type == "cuda"  # pinned host memory (torch pins it in this GPU's context, from any thread)
    rows_of = functools.partial(batch_rows, rank=rank, world=world, n=n, batch_size=args.batch_size, seed=args.seed)
    with reg.GracefulStop() as stop, ThreadPoolExecutor(1) as loader:  # one thread, a step ahead
        ahead = [loader.submit(gather, shards, starts, rows, pin) for rows in rows_of(step).split(micro)]
        while step < args.steps:
            waited = time.perf_counter()
            batch = [future.result() for future in ahead]  # gathered during the last step
            reg.add_to(sums, dict(data_wait_s=time.perf_counter() - waited), 1.0)  # input as the bottleneck
            ahead = [loader.submit(gather, shards, starts, rows, pin) for rows in rows_of(step + 1).split(micro)]
            for m, host in enumerate(batch):
                torch.manual_seed(draw_seed(args.seed, step, rank * micro * accum + m * micro))
                x, y, images = get_batch(host, device)
                # DDP averages the gradients once, after the last micro-batch
                with net.no_sync() if ddp and m < accum - 1 else nullcontext():
                    with reg.autocast(device, args.precision):
                        feats = encoder(images) if encoder else None  # (B, E), (B, T, E)
                        losses = reg.reg_loss(net, x, y, feats, beta=args.beta, lam=args.lam)
                    scaler.scale(losses["loss"] / accum).backward()
                reg.add_to(sums, losses, 1 / accum)  # each micro-batch's share of the step's mean
            grad_norm, skipped = reg.optimizer_step(model, ema, opt, scaler)  # clip 1.0, AdamW, EMA 0.9999 (paper)
            reg.add_to(sums, dict(grad_norm=grad_norm, skipped=skipped), 1.0)
            stopping = stop.requested
            if ddp:  # the processes agree whether to stop (SIGTERM reaches them at different steps); gloo, no wait
                flag = torch.tensor([float(stopping)])
                dist.all_reduce(flag)
                stopping = bool(flag > 0)
            step += 1
            # Periodic jobs: log (also before every checkpoint, so a non-finite run is never saved), save
            save = step % args.ckpt_every == 0 or step == args.steps or stopping
            if save or step % args.log_every == 0:
                last = reg.log_interval(args.out, step, sums, last, micro * accum, flops_per_image, device)
            if save and rank == 0:
                reg.save_training_state(args.out, step, model, ema, opt, scaler, settings, **extras)
            if stopping:  # GracefulStop has said how to continue
                break
    if rank == 0:
        print(f"{'stopped' if stop.requested else 'done'} at step {step}: {args.out} holds the checkpoints, log.jsonl")
    if ddp:
        dist.destroy_process_group()


def build(args, latent, num_classes, device):
    """The frozen encoder (None for plain SiT), the SiT on latents of side `latent` (32 for 256 px), its EMA, fused
    AdamW (the paper's: betas 0.9/0.999, no weight decay) and the GradScaler (fp16 only; on a CPU it scales fp32:
    tests)."""
    patch = reg.PRESETS[args.model]["patch_size"]
    if latent % patch:
        fix = f"pick a --model with a smaller patch, or prepare a --resolution that is a multiple of {8 * patch}"
        raise ValueError(f"{args.model}'s {patch}x{patch} patches do not tile the {latent}x{latent} latents: {fix}")
    torch.manual_seed(args.seed)  # a 'random' encoder (tests) is the same on every process
    needs_encoder = reg.SiTConfig(**reg.METHODS[args.method]).needs_encoder
    grid = latent // patch  # DINOv2 at 14 x grid px: 224 for 256 px, 448 for 512
    encoder = reg.load_encoder(args.encoder, grid, args.encoder_weights, device) if needs_encoder else None
    torch.manual_seed(args.seed)  # the init does not depend on the encoder's draws
    overrides = dict(input_size=latent, num_classes=num_classes, encoder_dim=encoder.dim if encoder else 768)
    model = reg.make_model(args.model, args.method, **overrides).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    fused = device.type in ("cuda", "cpu")  # one kernel for all parameters, and fp16's scaler never waits for it
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 parts on GPUs (as train_cifar.py)
    torch.backends.cudnn.allow_tf32 = True
    return encoder, model, ema, opt, scaler


# Command line ---------------------------------------------------------------------------------------------------------


def resolution(text):
    if reg.positive_int(text) % 8:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of 8 (the SD-VAE makes 8x smaller latents)")
    return int(text)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    a = commands.add_parser("prepare", help="ImageFolder -> ADM crops + SD-VAE posteriors, in shards").add_argument
    a("--data-dir", required=True, help="ImageFolder root, <data-dir>/<class>/<image> (ImageNet: its train folder)")
    a("--out", required=True, help="folder for the shard_NNNNN.pt files and manifest.json")
    a("--classes", type=reg.positive_int, help="the first N class folders (sorted); default all (the paper: 1,000)")
    a("--resolution", type=resolution, default=256, help="image side, a multiple of 8; default 256 (paper: 256, 512)")
    a("--vae", default="ema", help="SD-VAE: ema (default: the paper's sd-vae-ft-ema), mse, or a folder (offline)")
    a("--shard-size", type=reg.positive_int, default=10_000, help="images per shard; default 10K (2.1 GB at 256 px)")
    a = commands.add_parser("train", help="train REG with the paper's recipe on a prepared folder").add_argument
    a("--data-dir", required=True, help="a finished `prepare` folder")
    a("--out", default="runs/imagenet", help="run folder: log.jsonl and checkpoints; default runs/imagenet")
    a("--model", default="SiT-XL/2", choices=reg.PRESETS, metavar="PRESET", help="SiT-Ti/2 ... XL/8; default SiT-XL/2")
    a("--method", default="reg", choices=reg.METHODS, help="reg (the paper; default); sit, repa, reg-noalign")
    a("--encoder", default="dinov2-b", help="frozen encoder; default dinov2-b (the paper's DINOv2-B/14)")
    a("--encoder-weights", help="a local weights file (offline), or 'random' (tests); default: the hub")
    a("--beta", type=reg.nonneg_float, default=0.03, help="token loss weight; default 0.03 (REG Sec. 3)")
    a("--lam", type=reg.nonneg_float, default=0.5, help="alignment loss weight; default 0.5 (REG Sec. 3, REPA)")
    a("--lr", type=reg.positive_float, default=1e-4, help="AdamW learning rate; default 1e-4 (the paper)")
    a("--batch-size", type=reg.positive_int, default=256, help="images per step over all GPUs; default 256 (paper)")
    a("--micro-batch", type=reg.positive_int, help="images per GPU and pass; default batch / GPUs (no accumulation)")
    a("--steps", type=reg.positive_int, default=400_000, help="optimiser steps; default 400K (the paper's tables)")
    a("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="GPU autocast; default bf16 (release fp16)")
    a("--seed", type=reg.nonneg_int, default=0, help="fixes the init, the data order and every random draw; default 0")
    a("--log-every", type=reg.positive_int, default=100, help="steps between log records (interval means); default 100")
    a("--ckpt-every", type=reg.positive_int, default=10_000, help="steps between checkpoints; default 10K")
    a("--device", help="default cuda, then mps, then cpu; under torchrun cuda:LOCAL_RANK")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.command == "prepare":
            return prepare(args)
        with reg.lock_folder(args.out) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():  # one trainer
            return train(args)
    except (ValueError, RuntimeError, OSError) as e:  # reg raises these with messages that name the fix
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
