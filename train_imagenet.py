"""
Train REG on ImageNet 256 or 512 in SD-VAE latent space (REG Sec. 4), from a class subset on one GPU to many nodes.
  prepare  ImageFolder -> ADM centre crops + SD-VAE posteriors (mean, std) in shards with a manifest.json; resumable
           (finished shards are kept); under torchrun each process encodes every WORLD_SIZE-th shard.
  train    the paper's recipe: SiT-XL/2, DINOv2-B, lambda 0.5, beta 0.03, AdamW 1e-4, batch 256, EMA 0.9999.
           `python` on one GPU, `torchrun` for DDP; gradient accumulation keeps the batch on fewer GPUs.
    python train_imagenet.py prepare --data-dir ~/imagenet/train --out data/in10 --classes 10 --upscale
    python train_imagenet.py train --data-dir data/in10 --out runs/in10 --model SiT-B/2 --micro-batch 64
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint HOST:29500 train_imagenet.py train --data-dir data/in256
"""

import argparse
import copy
import functools
import json
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.utils import save_image
from tqdm import tqdm

import reg

EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SHARD_KEYS = ("mean", "std", "images", "labels")  # what a shard holds, besides its `source` fingerprint
IDENTITY = ("classes", "resolution", "vae", "shard_size")  # what makes two preparations different
LOSSES = ("loss", "denoise", "denoise_cls", "align")  # the terms of reg.reg_loss
LOGGED = (*LOSSES, "grad_norm")  # means over each logging interval


# Flags: numbers are checked when parsed, so a bad value fails at once with the allowed range ------------------------


def resolution(text):
    value = reg.positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of 8 (the SD-VAE makes 8x smaller latents)")
    return value


# Prepare: ImageFolder -> shards of centre crops and SD-VAE posteriors ------------------------------------------------


def center_crop(image, res):
    """ADM's crop (guided-diffusion image_datasets.py, center_crop_arr): halve with a BOX filter while the short side
    is >= 2 res (cheap, alias-free), BICUBIC-resize the short side to res, cut the centre -> uint8 (res, res, 3)."""
    while min(image.size) >= 2 * res:
        half = tuple(side // 2 for side in image.size)
        image = image.resize(half, resample=Image.Resampling.BOX)
    scale = res / min(image.size)
    size = tuple(round(side * scale) for side in image.size)
    array = np.asarray(image.resize(size, resample=Image.Resampling.BICUBIC))
    top = (array.shape[0] - res) // 2
    left = (array.shape[1] - res) // 2
    return array[top : top + res, left : left + res]


def load_crops(batch, res, upscale):
    """DataLoader collate, run in the workers: [(file, label)] -> (uint8 (B, 3, res, res), labels (B,), problem or '').
    A bad file comes back as a message naming it: an exception in a worker would bury it in a traceback."""
    crops = []
    for path, _ in batch:
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except Exception as e:  # unreadable: truncated, corrupt, not an image
            fix = "replace or delete the file, then rerun the same command (finished shards are kept)"
            return None, None, f"image {path} cannot be read ({type(e).__name__}: {e}): {fix}"
        if min(image.size) < res and not upscale:
            width, height = image.size
            fix = "pass --upscale to enlarge such images bicubically (as ADM does), or delete the file and rerun"
            return None, None, f"image {path}: it is {width}x{height}, smaller than --resolution {res}: {fix}"
        crops.append(torch.from_numpy(center_crop(image, res).copy()).permute(2, 0, 1))
    labels = torch.tensor([label for _, label in batch])
    return torch.stack(crops), labels, ""


def list_images(root, classes=None):
    """-> (class names, [(file, label)]) of an ImageFolder; `classes`: 'N' = the first N sorted names, 'a,b' = those."""
    found = sorted(e.name for e in os.scandir(root) if e.is_dir()) if os.path.isdir(root) else []
    if not found:
        raise SystemExit(
            f"--data-dir {root!r} is not an ImageFolder (no class folders): pass a folder laid out as "
            "<data-dir>/<class>/<image>, such as ImageNet's train folder"
        )
    if classes and classes.isdigit():
        found = found[: int(classes)]
    elif classes:
        missing = sorted(set(classes.split(",")) - set(found))
        if missing:
            raise SystemExit(f"--classes names folders that {root!r} lacks: {', '.join(missing[:5])}")
        found = sorted(classes.split(","))
    files = []
    for label, name in enumerate(found):
        names = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(EXTS))
        files += [(os.path.join(root, name, f), label) for f in names]
    if not files:
        raise SystemExit(f"no images ({', '.join(EXTS)}) in the class folders of {root!r}")
    return found, files


def plan_shards(args):
    """-> (plan, the files of each shard). Each shard's `source` fingerprints the preparation's identity and its files
    (names relative to --data-dir, labels): a finished shard is kept on a rerun exactly when its source is unchanged."""
    classes, files = list_images(args.data_dir, args.classes)
    size = args.shard_size
    chunks = [files[start : start + size] for start in range(0, len(files), size)]
    identity = dict(classes=classes, resolution=args.resolution, vae=args.vae, shard_size=size)
    sources = []
    for chunk in chunks:
        names = [(os.path.relpath(path, args.data_dir), label) for path, label in chunk]
        sources.append(reg.fingerprint(identity, names))
    shards = [f"shard_{i:05d}.pt" for i in range(len(chunks))]
    plan = dict(identity, images=len(files), counts=[len(c) for c in chunks], shards=shards, sources=sources)
    return plan, chunks


def check_same_preparation(out, plan):
    """Refuse to write into a folder that holds another preparation (other classes, resolution, VAE or shard size).
    The image list may differ (an image fixed or removed): the shards it touches are made again."""
    path = os.path.join(out, "manifest.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path} cannot be read ({e}): writing it anew; the shards of this preparation are kept")
        return
    if "sources" not in manifest:
        raise SystemExit(
            f"{out!r} holds a preparation of an older train_imagenet.py: train on it, or prepare into a new --out"
        )
    differences = [f"{k} {str(manifest.get(k))[:60]} there, {str(plan[k])[:60]} now" for k in IDENTITY
                   if manifest.get(k) != plan[k]]  # fmt: skip
    if differences:
        raise SystemExit(
            f"{out!r} holds another preparation ({'; '.join(differences)}): pass another --out, or delete that folder"
        )


def shard_matches(path, source):
    """Whether `path` is a finished, readable shard made from `source` (a truncated or stale one is made again)."""
    if not os.path.isfile(path):
        return False
    try:
        shard = torch.load(path, mmap=True, weights_only=True)
    except Exception:
        return False
    return shard.get("source") == source


def write_manifest(out, plan, rank):
    """manifest.json = the plan + the shards that are done (each shard is written atomically)."""
    done = [name for name, source in zip(plan["shards"], plan["sources"])
            if shard_matches(os.path.join(out, name), source)]  # fmt: skip
    manifest = dict(plan, done=done, complete=len(done) == len(plan["shards"]))
    tmp = os.path.join(out, f".manifest.{rank}.tmp")  # processes may write it at once
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, "manifest.json"))


@torch.no_grad()
def encode_shard(files, vae, args, device, bar):
    """[(file, label)] -> dict(mean, std (N, 4, res/8, res/8) fp16, images (N, 3, res, res) uint8, labels (N,))."""
    collate = functools.partial(load_crops, res=args.resolution, upscale=args.upscale)
    loader = torch.utils.data.DataLoader(files, args.batch_size, num_workers=args.workers, collate_fn=collate)
    parts = {key: [] for key in SHARD_KEYS}
    for images, labels, problem in loader:
        if problem:
            raise SystemExit(problem)
        posterior = vae.encode(images.to(device).float() / 127.5 - 1).latent_dist  # the VAE takes [-1, 1]
        parts["mean"].append(posterior.mean.half().cpu())  # (B, 4, res/8, res/8)
        parts["std"].append(posterior.std.half().cpu())
        parts["images"].append(images)
        parts["labels"].append(labels)
        bar.update(len(images))
    return {key: torch.cat(values) for key, values in parts.items()}


def prepare(args):
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = reg.pick_device(args.device)
    plan, chunks = plan_shards(args)
    check_same_preparation(args.out, plan)
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, name) for name in plan["shards"]]
    todo = [i for i in range(rank, len(paths), world) if not shard_matches(paths[i], plan["sources"][i])]
    write_manifest(args.out, plan, rank)
    vae = reg.load_vae(args.vae, device) if todo else None
    bar = tqdm(total=sum(plan["counts"][i] for i in todo), unit="img", disable=rank > 0, desc="prepare")
    for i in todo:
        shard = encode_shard(chunks[i], vae, args, device, bar)
        shard["source"] = plan["sources"][i]
        reg.save_checkpoint(paths[i], shard)
        write_manifest(args.out, plan, rank)
    bar.close()
    return plan


# Train: the data ----------------------------------------------------------------------------------------------------


def load_shard(path):
    try:
        shard = torch.load(path, mmap=True, weights_only=True)  # memory-mapped: ImageNet need not fit in RAM
    except Exception as e:
        raise SystemExit(
            f"{path} cannot be read ({type(e).__name__}): it is truncated or corrupt. Rerun the `prepare` command "
            "that made this folder: it makes that shard again and keeps the others"
        ) from None
    return shard


def load_prepared(folder):
    """The shards of a finished preparation and its manifest; refuses a partial, corrupt or mixed one, naming the fix."""
    path = os.path.join(folder, "manifest.json")
    rerun = f"rerun the `prepare` command that made {folder!r} (it keeps the finished shards)"
    if not os.path.isfile(path):
        raise SystemExit(f"{folder!r} has no manifest.json: run `train_imagenet.py prepare --out {folder}` first")
    try:
        with open(path) as f:
            meta = json.load(f)
        paths = [os.path.join(folder, name) for name in meta["shards"]]
        counts = meta["counts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path} cannot be read ({type(e).__name__}: {e}): {rerun}") from None
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise SystemExit(
            f"the preparation in {folder!r} is incomplete ({len(missing)} of {len(paths)} shards missing, "
            f"e.g. {missing[0]}): {rerun}"
        )
    shards = [load_shard(p) for p in paths]
    sources = meta.get("sources") or [None] * len(paths)  # older preparations have none
    for p, shard, count, source in zip(paths, shards, counts, sources):
        if not set(SHARD_KEYS) <= set(shard) or len(shard["labels"]) != count or shard.get("source") != source:
            raise SystemExit(f"{p} does not belong to the preparation its manifest describes: {rerun}")
    return shards, meta


def synthetic(n, res, classes=1000):
    """Random data in the shards' layout, for --bench without a preparation."""
    g = torch.Generator().manual_seed(0)
    h = res // 8
    shard = dict(
        mean=torch.randn(n, 4, h, h, generator=g).half(),
        std=torch.full((n, 4, h, h), 0.05).half(),
        images=torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8),
        labels=torch.randint(0, classes, (n,), generator=g),
    )
    meta = dict(classes=[str(c) for c in range(classes)], counts=[n], shards=["synthetic"], resolution=res, vae=None)
    return [shard], meta


def data_fingerprint(meta):
    """What makes the training data the same, wherever its folder is: classes, counts, shard names and sources."""
    return reg.fingerprint(meta["classes"], meta["counts"], meta["shards"], meta.get("sources"), meta["resolution"])


@functools.lru_cache(maxsize=1)
def epoch_order(n, seed, epoch):
    """The data order of an epoch, from (seed, epoch) only: every process computes the same global batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_rows(step, rank, world, n, batch_size, seed):
    """The rows (indices into the concatenated shards) of process `rank`'s slice of the global batch of `step`: a
    function of the step alone, so a resumed run, and any number of processes, meet the same global batches."""
    steps_per_epoch = n // batch_size
    epoch = step // steps_per_epoch
    first = (step % steps_per_epoch) * batch_size
    per_process = batch_size // world
    start = first + rank * per_process
    return epoch_order(n, seed, epoch)[start : start + per_process]


def draw_seed(seed, step, position):
    """The seed of a micro-batch's random draws (latent, flips, t, noise, dropped labels), from the run's seed, the
    step and the micro-batch's position in the global batch: the same draws however the batch is spread over GPUs."""
    return (seed * 1_000_003 + step) * 1_000_003 + position


def get_batch(shards, starts, rows, device, args):
    """Rows -> x (B, 4, h, w): a fresh latent drawn from each stored posterior and scaled (LDM); y (B,) labels;
    the uint8 crops (B, 3, H, W) for the encoder. --flip mirrors image and posterior together."""
    shard_index = torch.searchsorted(starts, rows, right=True) - 1  # the shard of each row
    pairs = list(zip(shard_index.tolist(), (rows - starts[shard_index]).tolist()))  # (shard, row within it)
    batch = [torch.stack([shards[s][key][r] for s, r in pairs]) for key in SHARD_KEYS]
    if device.type == "cuda":
        batch = [t.pin_memory() for t in batch]
    mean, std, images, y = [t.to(device, non_blocking=True) for t in batch]
    if args.flip:  # our option: the release trains without augmentation
        flip = torch.rand(len(y), device=device).view(-1, 1, 1, 1) < 0.5
        mean = torch.where(flip, mean.flip(-1), mean)
        std = torch.where(flip, std.flip(-1), std)
        images = torch.where(flip, images.flip(-1), images)
    if args.unconditional:
        y = torch.zeros_like(y)  # one class
    noise = torch.randn(mean.shape, device=device)
    x = (mean.float() + std.float() * noise) * reg.LATENT_SCALE  # (B, 4, h, w), unit variance
    return x, y, images


# Train: setup -------------------------------------------------------------------------------------------------------


def setup_processes(args):
    """-> rank, world, ddp, device. Under torchrun (RANK set): one process per GPU, DDP over NCCL (gloo on CPU)."""
    ddp = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = reg.pick_device(args.device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and later: free speed
    torch.backends.cudnn.allow_tf32 = True
    return rank, world, ddp, device


def batch_split(args, world):
    """-> (images per process and pass, passes per step): gradient accumulation keeps the batch on fewer GPUs."""
    micro = args.micro_batch or max(1, args.batch_size // world)
    if args.batch_size % (micro * world):
        raise SystemExit(
            f"--batch-size {args.batch_size} is not a multiple of --micro-batch x processes ({micro} x {world}): "
            f"pick a --micro-batch and a GPU count whose product divides {args.batch_size}"
        )
    return micro, args.batch_size // world // micro


def load_data(args):
    """-> shards, meta, the first row of each shard (and the total as the last entry)."""
    if args.synthetic:
        shards, meta = synthetic(args.batch_size, args.resolution)
    else:
        shards, meta = load_prepared(args.data_dir)
    starts = torch.tensor([0] + [len(s["labels"]) for s in shards]).cumsum(0)
    if starts[-1] < args.batch_size:
        raise SystemExit(
            f"the data holds {int(starts[-1])} images, fewer than --batch-size {args.batch_size}: "
            "lower it, or prepare more classes"
        )
    return shards, meta, starts


def setup_model(args, meta, device):
    """-> the frozen encoder (None for plain SiT), the SiT, its EMA, AdamW and the loss scaler (acts only for fp16)."""
    latent = meta["resolution"] // 8  # SD-VAE latents: 32 for 256 px
    grid = latent // reg.PRESETS[args.model]["patch_size"]  # DINOv2 at 14 x grid px: 224 for 256 px, 448 for 512
    needs_encoder = reg.SiTConfig(**reg.METHODS[args.method]).needs_encoder
    encoder = None
    if needs_encoder:
        torch.manual_seed(args.seed)  # a 'random' encoder is the same on every process
        encoder = reg.load_encoder(args.encoder, grid, args.encoder_weights, device)
    num_classes = 1 if args.unconditional else len(meta["classes"])
    encoder_dim = encoder.dim if encoder else 768
    torch.manual_seed(args.seed)  # the init does not depend on the encoder's draws
    model = reg.make_model(args.model, args.method, input_size=latent, num_classes=num_classes, encoder_dim=encoder_dim)
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0, eps=1e-8, fused=cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16" and cuda)
    return encoder, model, ema, opt, scaler


def experiment(args, data_id):
    """The settings that make a run this experiment: --resume refuses a change of any of them."""
    return dict(
        model=args.model, method=args.method, data=data_id, batch_size=args.batch_size, seed=args.seed,
        beta=args.beta, lam=args.lam, encoder=args.encoder, ema=args.ema, flip=args.flip,
        unconditional=args.unconditional,
    )  # fmt: skip


def resume(args, run, model, ema, opt, scaler, meta, rank):
    """-> the step to start from. Rank 0 checks the settings against the latest checkpoint, cuts the log back and loads
    everything; the other processes load the optimiser and scaler (DDP copies the weights from rank 0). The learning
    rate, clip and precision may change on resume (the advice after a non-finite loss); the change is logged."""
    found = reg.list_checkpoints(args.out)
    if found and not args.resume:
        raise SystemExit(f"{args.out!r} holds checkpoints already: pass --resume to continue it, or another --out")
    may_change = dict(lr=args.lr, clip=args.clip, precision=args.precision)
    if rank == 0:
        must_match = experiment(args, data_fingerprint(meta))
        state = run.resume(model, ema, opt, scaler, must_match=must_match, may_change=may_change)
    elif found:
        state = reg.load_checkpoint(found[-1])
        opt.load_state_dict(state["opt"])
        for group in opt.param_groups:
            group["lr"] = args.lr  # as rank 0 does
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    else:
        state = {}
    return state.get("step", 0)


def setup_run(args, meta, model, ema, opt, scaler, rank, device):
    """-> the run folder (rank 0 only; none for --bench), the step to start from, the VAE for sample grids (or None)."""
    if args.bench:
        return None, 0, None
    run = reg.Run(args.out, args.keep) if rank == 0 else None
    start = resume(args, run, model, ema, opt, scaler, meta, rank)
    if run is None:
        return None, start, None
    run.write_args(args)
    vae = reg.load_vae(args.vae or meta["vae"] or "ema", device) if args.sample_every else None
    return run, start, vae


def wrap_model(model, args, ddp):
    """torch.compile (--compile), then DDP (under torchrun; on the current device). Both after the resume: DDP copies
    rank 0's weights to the other processes when it wraps the model."""
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model


def checkpoint_extras(args, meta):
    """What a checkpoint carries besides the weights: the settings (with the data's fingerprint, checked on --resume),
    and the class names, resolution and VAE that sample.py reads."""
    classes = ["unconditional"] if args.unconditional else meta["classes"]
    settings = dict(vars(args), data=data_fingerprint(meta))
    return dict(args=settings, classes=classes, resolution=meta["resolution"], vae=meta["vae"])


# Train: logging, samples, speed ---------------------------------------------------------------------------------------


def reduce_record(sums, steps, stop_requested, ddp, world):
    """-> (the mean of each logged value over the last `steps` steps and over the processes, whether any process was
    asked to stop). One all_reduce: the loop's only synchronisation, with the GPU and with the other processes."""
    flag = torch.ones(1, device=sums["loss"].device) * float(stop_requested)
    values = torch.cat([torch.stack([sums[k] for k in LOGGED]) / steps, flag])
    if ddp:
        dist.all_reduce(values)
        values = values / world
    numbers = values.tolist()
    return dict(zip(LOGGED, numbers[:-1])), numbers[-1] > 0


def log(record, step, args, run, bar):
    """Stop on a non-finite value (before any checkpoint of this step), show the loss, append the record (rank 0)."""
    reg.check_finite(record, step, args.out)
    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
    if run:
        run.log(step=step, **record)


def zero_sums(device):
    return {key: torch.zeros((), device=device) for key in LOGGED}


def is_log_step(done, total, args, stop_now):
    """Log steps (also every checkpoint step, the last step, and a Ctrl-C without DDP) are where the loop syncs."""
    return done % args.log_every == 0 or done % args.ckpt_every == 0 or done == total or stop_now


@torch.no_grad()
def sample_grid(ema, vae, path, args, device, n=16):
    """A grid of EMA samples from fixed noise (no CFG), decoded through the VAE: the same noise at every grid."""
    cfg = ema.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)
    cls = torch.randn(n, cfg.encoder_dim, generator=g).to(device) if cfg.entangled else None
    y = torch.arange(n, device=device) % cfg.num_classes
    torch.manual_seed(0)  # the SDE's noise; training seeds every micro-batch itself, so this changes nothing there
    latents, _ = reg.sample(ema, x, y, cls, steps=args.sample_steps, mode=args.sampler, null_label=cfg.num_classes)
    images = vae.decode(latents / reg.LATENT_SCALE).sample  # (n, 3, H, W) in [-1, 1]
    save_image((images + 1) / 2, path, nrow=int(math.sqrt(n)))


class NoTimer:
    """reg.StepTimer's stand-in outside --bench: a long run keeps no per-step records and never waits for the GPU."""

    def start(self):
        pass

    def mark(self, phase):
        pass


def bench_report(timer, args, model, encoder, device, world):
    """--bench: medians of the timed steps per GPU; FLOPs per image = the SiT's training step (3x its forward) + the
    frozen encoder's forward (reg.model_flops' rule)."""
    flops_per_image = 3 * reg.model_flops(reg.unwrap(model).cfg) + reg.encoder_flops(encoder)
    report = timer.report(args.batch_size // world, flops_per_image, device, args.warmup, args.peak_tflops)
    report["images_per_s_all_gpus"] = report["images_per_s"] * world
    if int(os.environ.get("RANK", 0)) == 0:
        shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()]
        print(f"{args.model} {args.method}, batch {args.batch_size} on {world} process(es): " + ", ".join(shown))
    return report


def finish(args, run, record, timer, model, encoder, device, world, ddp):
    """After the loop: the --bench report, or the loss curves (losses.png); leave the process group."""
    if args.bench:
        record = bench_report(timer, args, model, encoder, device, world)
    if run:
        reg.plot_losses(os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "losses.png"))
    if ddp:
        dist.destroy_process_group()
    return record


# Train ----------------------------------------------------------------------------------------------------------------


def train(args):
    # Processes, data, model and optimiser
    rank, world, ddp, device = setup_processes(args)
    shards, meta, starts = load_data(args)
    encoder, model, ema, opt, scaler = setup_model(args, meta, device)
    # Run folder and resume (rank 0 writes every file; --bench writes none)
    run, start, vae = setup_run(args, meta, model, ema, opt, scaler, rank, device)
    model = wrap_model(model, args, ddp)
    # Train
    micro_batch, accum = batch_split(args, world)
    total = args.warmup + args.bench if args.bench else args.steps
    timer = reg.StepTimer(device) if args.bench else NoTimer()  # StepTimer waits for the GPU at each mark
    sums = zero_sums(device)
    logged = (start, time.perf_counter())  # the step and time of the last log
    record, stopping = {}, False
    with tqdm(initial=start, total=total, unit="step", disable=rank > 0) as bar, reg.GracefulStop() as stop:
        for step in range(start, total):
            timer.start()
            rows = batch_rows(step, rank, world, int(starts[-1]), args.batch_size, args.seed)
            for micro in range(accum):
                first = micro * micro_batch
                torch.manual_seed(draw_seed(args.seed, step, rank * len(rows) + first))
                x, y, images = get_batch(shards, starts, rows[first : first + micro_batch], device, args)
                timer.mark("data")
                with reg.autocast(device, args.precision):
                    feats = encoder(images) if encoder else None  # (B, E), (B, T, E)
                timer.mark("encoder")
                sync = not ddp or micro == accum - 1  # DDP averages the gradients once, after the last micro-batch
                with nullcontext() if sync else model.no_sync():
                    with reg.autocast(device, args.precision):
                        losses = reg.reg_loss(model, x, y, feats, beta=args.beta, lam=args.lam)
                    scaler.scale(losses["loss"] / accum).backward()
                for key in LOSSES:
                    sums[key] += losses[key].detach() / accum  # on the device: no sync
                timer.mark("fwd_bwd")
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            scaler.step(opt)  # fp16: skipped when the gradient overflowed (the scaler then lowers its scale)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            reg.ema_update(ema, model, args.ema)
            sums["grad_norm"] += torch.nan_to_num(grad_norm, posinf=0.0) if scaler.is_enabled() else grad_norm
            timer.mark("optimizer")
            bar.update()
            # Periodic jobs: log (where the processes also agree on a Ctrl-C), samples, checkpoint
            done = step + 1
            if is_log_step(done, total, args, stop.requested and not ddp):
                record, stopping = reduce_record(sums, done - logged[0], stop.requested, ddp, world)
                record["images_per_s"] = (done - logged[0]) * args.batch_size / (time.perf_counter() - logged[1])
                logged = (done, time.perf_counter())
                sums = zero_sums(device)
                log(record, done, args, run, bar)
            if vae is not None and done % args.sample_every == 0:
                sample_grid(ema, vae, os.path.join(args.out, f"samples_{done:07d}.png"), args, device)
            if run and (done % args.ckpt_every == 0 or done == total or stopping):
                run.save(done, model, ema, opt, scaler, **checkpoint_extras(args, meta))
            if stopping:  # GracefulStop has said how to continue
                break
    return finish(args, run, record, timer, model, encoder, device, world, ddp)


# Command line ---------------------------------------------------------------------------------------------------------


def add_prepare_flags(p):
    a = p.add_argument
    a("--data-dir", required=True, help="ImageFolder root, <data-dir>/<class>/<image> (ImageNet: its train folder)")
    a("--out", required=True, help="folder for the shard_NNNNN.pt files and manifest.json")
    a("--classes", help="'N': the first N class folders (sorted), or 'n01440764,n01443537'; default all")
    a("--resolution", type=resolution, default=256, help="image side, a multiple of 8; paper 256 (and 512)")
    a("--vae", default="ema", help="SD-VAE: ema (the paper's sd-vae-ft-ema), mse, or a folder (offline)")
    a("--shard-size", type=reg.positive_int, default=10_000, help="images per shard; default 10K (2.1 GB at 256 px)")
    a("--batch-size", type=reg.positive_int, default=64, help="images per VAE call; default 64 (fits any GPU)")
    a("--workers", type=reg.nonneg_int, default=8, help="processes that decode and crop; default 8 (0: in-process)")
    a("--upscale", action="store_true", help="enlarge images below --resolution as ADM does (default: refuse)")
    a("--device", help="default cuda, then mps, then cpu; under torchrun cuda:LOCAL_RANK")


def add_recipe_flags(p):
    a = p.add_argument
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", help="a finished `prepare` folder")
    data.add_argument("--synthetic", action="store_true", help="random latents and images instead (for --bench)")
    a(
        "--model",
        default="SiT-XL/2",
        choices=list(reg.PRESETS),
        metavar="PRESET",
        help="SiT-Ti/2 ... SiT-XL/8 (reg.PRESETS); default SiT-XL/2 (the paper's best)",
    )
    a("--method", default="reg", choices=list(reg.METHODS), help="reg (the paper), a baseline, a REG Sec. 4 ablation")
    a("--encoder", default="dinov2-b", help="frozen encoder; paper: DINOv2-B/14 (224 px for 256, 448 for 512)")
    a("--encoder-weights", help="a local weights file (offline), 'random' (tests, --bench); default: the hub")
    a("--beta", type=reg.nonneg_float, default=0.03, help="token loss weight (REG Sec. 3; paper 0.03)")
    a("--lam", type=reg.nonneg_float, default=0.5, help="alignment loss weight (REG Sec. 3 / REPA; paper 0.5)")
    a("--lr", type=reg.positive_float, default=1e-4, help="AdamW learning rate (paper 1e-4); may change on --resume")
    a("--batch-size", type=reg.positive_int, default=256, help="images per optimiser step over all GPUs (paper 256)")
    a("--micro-batch", type=reg.positive_int, help="images per GPU and pass (default: batch / GPUs)")
    a("--steps", type=reg.positive_int, default=400_000, help="optimiser steps; default 400K (the paper's tables)")
    a("--ema", type=reg.unit_float, default=0.9999, help="EMA decay, every step (paper 0.9999)")
    a("--clip", type=reg.positive_float, default=1.0, help="gradient-norm clip (the release: 1.0)")
    a("--flip", action="store_true", help="random horizontal flips (ours: the release trains without)")
    a("--unconditional", action="store_true", help="every label 0: one class")
    a("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="GPU autocast (release fp16)")
    a("--seed", type=reg.nonneg_int, default=0, help="fixes the init, the data order and every draw; default 0")
    a("--resolution", type=resolution, default=256, help="image side of --synthetic data (--data-dir has its own)")


def add_run_flags(p):
    a = p.add_argument
    a("--out", default="runs/imagenet", help="run folder: args.json, log.jsonl, checkpoints, grids, losses.png")
    a("--resume", action="store_true", help="continue the latest checkpoint in --out, exactly")
    a("--keep", type=reg.nonneg_int, default=3, help="checkpoints kept (the latest); default 3, 0 = all")
    a("--log-every", type=reg.positive_int, default=100, help="steps between log records (the only syncs); default 100")
    a("--ckpt-every", type=reg.positive_int, default=10_000, help="steps between checkpoints (and at the end); 10K")
    a(
        "--sample-every",
        type=reg.nonneg_int,
        default=10_000,
        help="steps between EMA sample grids; default 10K, 0 = off",
    )
    a("--sample-steps", type=reg.positive_int, default=50, help="sampler steps of the grids; default 50 (FID: 250)")
    a("--sampler", default="sde", choices=("sde", "euler", "heun"), help="sampler of the grids (paper: sde)")
    a("--vae", help="SD-VAE that decodes the grids: ema, mse or a folder; default: --data-dir's")
    a("--compile", action="store_true", help="torch.compile the SiT (off by default, so it can be stepped through)")
    a("--bench", type=reg.nonneg_int, default=0, help="time N steps after --warmup ones, print the speed, save nothing")
    a("--warmup", type=reg.nonneg_int, default=5, help="untimed --bench steps first (compile, autotune); default 5")
    a("--peak-tflops", type=reg.nonneg_float, default=0, help="GPU peak for the MFU; 0: by name (reg.PEAK_TFLOPS)")
    a("--device", help="default cuda, then mps, then cpu; under torchrun cuda:LOCAL_RANK")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    add_prepare_flags(commands.add_parser("prepare", help="ImageFolder -> ADM crops + SD-VAE posteriors, in shards"))
    train_parser = commands.add_parser("train", help="train REG with the paper's recipe on a prepared folder")
    add_recipe_flags(train_parser)
    add_run_flags(train_parser)
    return p


def main(args=None):
    if not isinstance(args, argparse.Namespace):
        args = parser().parse_args(args)
    try:
        if args.command == "prepare":
            return prepare(args)
        return train(args)
    except (ValueError, RuntimeError) as e:  # reg raises these with messages that name the fix
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
