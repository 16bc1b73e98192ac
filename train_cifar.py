"""
Train REG (or a baseline: --method sit / repa / reg-noalign / ...) on CIFAR-10 or any ImageFolder, in pixel space.

GPU, about an hour on one H100-class card (SiT-B/2 on 32x32 pixels, DINOv2 ViT-B/14 at 224px as the frozen encoder):
    python train_cifar.py --data-dir data/cifar10
CPU, learning within minutes (tiny model, the encoder run once into a feature cache, a subset, small batches):
    OMP_NUM_THREADS=1 python train_cifar.py --data-dir cifar/train --model SiT-Ti/4 --limit 1000 --batch-size 32 \\
        --steps 1500 --lr 1e-3 --ema 0.995 --cache-features --encoder tf_efficientnet_lite0 --encoder-weights <file>
What REG adds, in one command (sit, repa and reg with the same model, data, seed and budget; ~6 min on one H100, est.):
    python train_cifar.py --compare --data-dir cifar/train --encoder tf_efficientnet_lite0 --encoder-weights <file> \\
        --fd-encoder tf_efficientnet_lite0 --fd-encoder-weights <file>
"""

import argparse
import copy
import functools
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.utils import save_image
from tqdm import tqdm

import reg

# what makes a run another experiment: --resume refuses a change of these (and of the training images' fingerprint)
MUST_MATCH = ("model", "method", "beta", "lam", "batch_size", "seed", "encoder", "limit", "holdout", "projector_dim",
              "unconditional")  # fmt: skip
# what --resume may change (printed and logged): the NaN advice is "lower --lr"; the micro-batch is a memory setting
MAY_CHANGE = ("lr", "micro_batch")
# --compare: the three arms, and the defaults it uses unless a flag says otherwise (the reasoning: README, "Comparison")
COMPARE_METHODS = ("sit", "repa", "reg")
COMPARE_DEFAULTS = dict(model="SiT-S/2", batch_size=256, steps=2000, lr=3e-4, ema=0.995, limit=10000,
                        cache_features=True, eval_every=500, sample_every=500, eval_n=2000, log_every=50)  # fmt: skip
BINS = 10  # t bins of the held-out loss (minRF's diagnostic)
STRIP_FRAMES = 8  # clean-image estimates per sampling strip, from t = 1 to the end


@dataclass
class Data:
    """The images of a run, on the device: the N training images first, then the held-out ones (never trained on)."""

    images: torch.Tensor  # (N + holdout, 3, H, W) uint8
    labels: torch.Tensor  # (N + holdout,)
    classes: list
    n_train: int  # N
    fingerprint: str  # of the training images and labels: what --resume checks
    encoder: object = None  # the frozen encoder (None for plain SiT, or when the cache serves training and no probe)
    cache: object = None  # (2 flips, N + holdout, 1+T, E) float16 encoder features: a numpy memmap or a device tensor
    feature_dim: int = 768  # E


@dataclass
class Probe:
    """What the periodic jobs reuse: fixed noise for the grids, the held-out batch, the FD encoder and its reference."""

    grid_x: torch.Tensor  # (rows * 8, 3, H, W) start noise of the sample grid
    grid_cls: torch.Tensor  # (rows * 8, E) start noise of the token
    grid_y: torch.Tensor  # (rows * 8,) a row per class
    held_x: torch.Tensor = None  # (holdout, 3, H, W) in [-1, 1], unflipped
    held_y: torch.Tensor = None  # (holdout,)
    held_feats: tuple = None  # their encoder features (None for plain SiT)
    fd_encoder: object = None
    fd_reference: tuple = None  # mean and covariance of the FD encoder's class token over the training images
    centroids: torch.Tensor = None  # (K, E) mean real token per class, for where generated tokens land


# ----------------------------------------------------------------------------------------------------------------------
# Data


def split_indices(n, holdout, limit):
    """A fixed random order of the n images (seed 0, the same for every --seed): the first `holdout` are held out, the
    next `limit` (0 = all the rest) are the training set. -> (training indices, held-out indices), each sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    if holdout >= n:
        raise SystemExit(f"--holdout {holdout} leaves none of the {n} images for training: lower it")
    rest = order[holdout:]
    if limit > len(rest):
        raise SystemExit(f"--limit {limit} exceeds the {len(rest)} images left after --holdout {holdout}: lower it")
    train = rest[:limit] if limit else rest
    return train.sort().values.tolist(), order[:holdout].sort().values.tolist()


def read_folder(d):
    """An ImageFolder's file paths, labels and class names; refuses images nested deeper than one folder per class."""
    ds = ImageFolder(d)  # an empty class folder: FileNotFoundError naming it
    for path, _ in ds.samples:
        if os.path.dirname(os.path.dirname(path)) != os.path.normpath(d):
            raise SystemExit(
                f"--data-dir {d}: images must sit directly in one folder per class, not deeper ({path}): "
                f"point --data-dir at the folder that holds the class folders (e.g. {d}/train)"
            )
    return [p for p, _ in ds.samples], [y for _, y in ds.samples], ds.classes


def read_images(paths):
    """-> uint8 array (n, H, W, 3); every image must have the first one's size."""
    arrays = []
    for path in paths:  # an unreadable file: PIL's OSError names it
        arrays.append(np.asarray(Image.open(path).convert("RGB")))
        if arrays[-1].shape != arrays[0].shape:
            got = f"{arrays[-1].shape[1]}x{arrays[-1].shape[0]}"
            first = f"{arrays[0].shape[1]}x{arrays[0].shape[0]}"
            raise SystemExit(f"images differ in size: {path} is {got}, {paths[0]} {first}: resize them to one size")
    return np.stack(arrays)


def download_cifar(d):
    """CIFAR-10's training set via torchvision -> uint8 array (50000, 32, 32, 3), labels, class names."""
    try:
        ds = CIFAR10(d, train=True, download=True)
    except Exception as e:
        raise SystemExit(
            f"could not get CIFAR-10 into --data-dir {d} ({type(e).__name__}: {str(e)[:120]}). Offline? Put an "
            "ImageFolder there (one folder of same-size images per class), or download "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into {d}"
        ) from None
    return ds.data, ds.targets, ds.classes


def load_data(args, device):
    """--data-dir: an ImageFolder, else CIFAR-10 (downloaded there). --holdout images are set aside first, then --limit
    of the rest are the training set. -> Data with the images on the device."""
    d = args.data_dir
    folder = os.path.isdir(d) and any(e.is_dir() and e.name != "cifar-10-batches-py" for e in os.scandir(d))
    if folder:
        paths, all_labels, classes = read_folder(d)
        train, held = split_indices(len(paths), args.holdout, args.limit)
        arrays = read_images([paths[i] for i in train + held])
    else:
        all_arrays, all_labels, classes = download_cifar(d)
        train, held = split_indices(len(all_arrays), args.holdout, args.limit)
        arrays = all_arrays[train + held]
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()  # (N + holdout, 3, H, W) uint8
    labels = torch.tensor([all_labels[i] for i in train + held])
    n = len(train)
    if n < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {n} training images: lower it")
    fingerprint = reg.fingerprint(images[:n], labels[:n])
    return Data(images.to(device), labels.to(device), classes, n, fingerprint)


def to_pixels(u8, flip):
    """uint8 (B, 3, H, W) -> float in [-1, 1], mirrored where flip (B,) is 1 (the only augmentation)."""
    mirrored = torch.where(flip.view(-1, 1, 1, 1).bool(), u8.flip(-1), u8)
    return mirrored.float() / 127.5 - 1


@functools.lru_cache(maxsize=1)
def epoch_order(seed, epoch, n):
    """Epoch `epoch`'s permutation of the n training images and a flip per image, from a generator seeded by (seed,
    epoch): the same on every run, resumed or not."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    flips = torch.randint(0, 2, (n,), generator=g)
    return perm, flips


def batch_at(step, data, args, ctx):
    """The batch of optimiser step `step`, a pure function of the step (so a resumed run meets exactly the batches the
    uninterrupted run met) -> x (B, 3, H, W) in [-1, 1], y (B,), feats (class token (B, E), patches (B, T, E)) or None."""
    per_epoch = data.n_train // args.batch_size
    perm, flips = epoch_order(args.seed, step // per_epoch, data.n_train)
    start = (step % per_epoch) * args.batch_size
    idx = perm[start : start + args.batch_size]  # (B,)
    flip = flips[idx]  # (B,)
    device = data.images.device
    idx_on_device = idx.to(device, non_blocking=True)  # non_blocking: no wait for the GPU's queue (no host sync)
    flip_on_device = flip.to(device, non_blocking=True)
    x = to_pixels(data.images[idx_on_device], flip_on_device)  # (B, 3, H, W)
    y = data.labels[idx_on_device]  # (B,)
    feats = features_of(data, x, flip, idx, ctx)
    return x, y, feats


def features_of(data, x, flip, idx, ctx):
    """The frozen encoder's features of images x (= images idx mirrored where flip): a cache read, or the encoder."""
    if data.cache is not None:
        return read_cache(data.cache, flip, idx, x.device)
    if data.encoder is None:  # plain SiT
        return None
    with ctx:
        return data.encoder(x)


def read_cache(cache, flip, idx, device):
    """Rows (flip, index) of the feature cache -> (class token (B, E), patches (B, T, E)) float32 on the device."""
    if torch.is_tensor(cache):  # held in GPU memory: a gather on the device
        rows = cache[flip.to(cache.device, non_blocking=True), idx.to(cache.device, non_blocking=True)]
    else:  # a memmap: numpy reads just these rows
        rows = torch.from_numpy(cache[flip.numpy(), idx.numpy()])
    rows = rows.to(device, non_blocking=True).float()  # (B, 1+T, E)
    return rows[:, 0], rows[:, 1:]


# ----------------------------------------------------------------------------------------------------------------------
# Encoders and the feature cache


def load_encoder_seeded(name, grid, weights, device, flag, seed):
    """reg.load_encoder with the global RNG forked and seeded: 'random' weights (tests) are a function of the seed, and
    loading never shifts the training RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return reg.load_encoder(name, grid, weights, device, flag)


def setup_data(args, device, ctx):
    """The images (load_data), the frozen encoder and its feature cache (setup_features), and --unconditional's
    single class (after the cache, whose key holds the real labels)."""
    data = load_data(args, device)
    grid = data.images.shape[-1] // reg.PRESETS[args.model]["patch_size"]
    setup_features(args, data, grid, ctx)
    if args.unconditional:  # one class: every label 0
        data.labels = torch.zeros_like(data.labels)
        data.classes = ["all"]
    return data


def setup_features(args, data, grid, ctx):
    """Load the frozen encoder when the method or the probes need it; with --cache-features, open (or build) the cache
    of its features over every image and its mirror, and keep the encoder only where the token probe needs it."""
    cfg = reg.SiTConfig(**reg.METHODS[args.method])
    if not cfg.needs_encoder:  # plain SiT: no encoder is loaded
        return
    device = data.images.device
    encoder = load_encoder_seeded(args.encoder, grid, args.encoder_weights, device, "--encoder-weights", args.seed)
    data.encoder = encoder
    data.feature_dim = encoder.dim
    if args.cache_features:
        data.cache = open_cache(args, data, encoder, ctx)
        if not (cfg.entangled and args.eval_every):  # the token-consistency probe runs the encoder on samples
            data.encoder = None


def open_cache(args, data, encoder, ctx):
    """The feature cache of these images under this encoder, built on first use. Its name carries a fingerprint of
    the content (the images, their labels, the encoder's weights, the grid, the encoder's input size), so different
    data never share a cache; the key is also stored beside it (.json) and checked."""
    state = list(encoder.state_dict().values())
    key = reg.fingerprint(data.images, data.labels, *state, args.encoder, encoder.grid, encoder.size)
    name = args.encoder.replace("/", "_")
    path = os.path.join(args.cache_dir or args.data_dir, f"feats-{name}-{key}.npy")
    shape = (2, len(data.images), 1 + encoder.grid**2, encoder.dim)
    about = dict(key=key, encoder=args.encoder, weights=args.encoder_weights, grid=encoder.grid, size=encoder.size,
                 images=len(data.images), shape=list(shape))  # fmt: skip
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path[:-4] + ".json", "w") as f:
            json.dump(about, f, indent=1)
        build_cache(path, encoder, data.images, shape, args.batch_size, ctx)
    stored = {}
    if os.path.isfile(path[:-4] + ".json"):
        with open(path[:-4] + ".json") as f:
            stored = json.load(f)
    cache = np.load(path, mmap_mode="r")
    if stored.get("key") != key or cache.shape != shape:
        raise ValueError(
            f"feature cache {path} does not belong to these images and this encoder (stored key "
            f"{stored.get('key')}, shape {cache.shape}; expected {key}, {shape}): delete it and its .json, or pass "
            "another --cache-dir"
        )
    return to_device_if_it_fits(cache, data.images.device)


@torch.no_grad()
def build_cache(path, encoder, images, shape, batch_size, ctx):
    """Run the frozen encoder once over every image and its mirror into (2, N, 1+T, E) float16 = [class token;
    patches]. Written to a temporary file and renamed, so a cache is whole or absent; Ctrl-C removes the partial file."""
    print(f"feature cache: encoding {len(images)} images x 2 flips -> {path} ({2 * np.prod(shape) / 1e9:.2f} GB)")
    start = time.perf_counter()
    store = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=np.float16, shape=shape)
    try:
        for f in (0, 1):
            for i in tqdm(range(0, shape[1], batch_size), desc=f"encoding (flip={f})"):
                u8 = images[i : i + batch_size]
                flip = torch.full((len(u8),), f, device=u8.device)
                with ctx:
                    cls, patches = encoder(to_pixels(u8, flip))  # (b, E), (b, T, E)
                rows = torch.cat([cls[:, None], patches], dim=1)  # (b, 1+T, E)
                store[f, i : i + batch_size] = rows.half().cpu().numpy()  # the copy syncs the device
    except KeyboardInterrupt:
        del store
        os.remove(path + ".tmp")
        raise SystemExit("interrupted while building the feature cache; the partial file was removed: run the same "
                         "command again to build it (or drop --cache-features)") from None  # fmt: skip
    store.flush()
    del store
    os.replace(path + ".tmp", path)
    print(f"feature cache: built in {time.perf_counter() - start:.0f} s; training now skips the encoder")


def to_device_if_it_fits(cache, device):
    """On a GPU, copy the cache into GPU memory when it takes under half the free memory (a batch is then a gather on
    the device, not a host read and a copy); elsewhere, or when too large, keep the memmap."""
    if device.type != "cuda":
        return cache
    free_bytes = torch.cuda.mem_get_info(device)[0]
    if cache.nbytes > free_bytes // 2:
        print(f"feature cache: {cache.nbytes / 1e9:.1f} GB, too large for GPU memory: read from disk per batch")
        return cache
    on_device = torch.empty(cache.shape, dtype=torch.float16, device=device)
    for i in range(0, cache.shape[1], 1024):  # in slices, so host memory never holds the whole cache
        on_device[:, i : i + 1024] = torch.from_numpy(np.ascontiguousarray(cache[:, i : i + 1024])).to(device)
    return on_device


# ----------------------------------------------------------------------------------------------------------------------
# Training


def main(args):
    """The command line's entry: one training run, or --compare; reg's errors (which name the fix) become one line."""
    try:
        if args.compare:
            return compare(args)
        return train(args)
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def train(args):
    """One run: the recipe, read top to bottom."""
    # Data
    device = reg.pick_device(args.device)
    ctx = reg.autocast(device, args.precision)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 parts on GPUs
    torch.backends.cudnn.allow_tf32 = True
    data = setup_data(args, device, ctx)
    size = data.images.shape[-1]
    # Model and optimiser
    torch.manual_seed(args.seed)  # the init does not depend on which encoder path ran
    model = reg.make_model(args.model, args.method, input_size=size, in_channels=3, num_classes=len(data.classes),
                           encoder_dim=data.feature_dim, **projector(args)).to(device)  # fmt: skip
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0, fused=cuda)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16" and cuda)  # acts only for fp16
    net = torch.compile(model) if args.compile else model
    if args.bench:
        return bench(args, net, model, ema, opt, scaler, data, ctx)
    # Resume
    out = args.out or os.path.join("runs", f"cifar-{args.method}-{args.model.replace('/', '-')}")
    run = reg.Run(out, args.keep)
    step = resume(args, run, data, model, ema, opt, scaler)
    run.write_args(args)
    probe = setup_probe(args, data, model, ctx) if args.sample_every or args.eval_every else None
    print(f"run {out}: {args.method}, {args.model}, {data.n_train} images {size}x{size}, {len(data.classes)} "
          f"classes, {device}, from step {step}")  # fmt: skip
    # Train
    sums = {}  # running sums of the losses since the last log, on the device (no host sync)
    last_log = (step, time.perf_counter())
    weight = args.micro_batch / args.batch_size  # each micro-batch's share of the batch mean
    with reg.GracefulStop() as stop:
        while step < args.steps and not stop.requested:
            x, y, feats = batch_at(step, data, args, ctx)
            for i in range(0, args.batch_size, args.micro_batch):
                part = slice(i, i + args.micro_batch)
                part_feats = None if feats is None else (feats[0][part], feats[1][part])
                with ctx:
                    losses = reg.reg_loss(net, x[part], y[part], part_feats, beta=args.beta, lam=args.lam)
                scaler.scale(losses["loss"] * weight).backward()  # gradients add up over the micro-batches
                add_to(sums, losses, weight)
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the paper's clip
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            reg.ema_update(ema, model, args.ema)
            add_to(sums, dict(grad_norm=grad_norm), 1.0)
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                last_log = log_interval(args, run, sums, step, last_log)
            if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                save_samples(args, ema, probe, out, step)
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                evaluate(args, ema, data, probe, run, step)
            if step % args.ckpt_every == 0 or step == args.steps or stop.requested:
                save(args, run, data, sums, step - last_log[0], step, model, ema, opt, scaler)
    finish(args, run)
    return out


def projector(args):
    """--projector-dim as a make_model override; 0 keeps the preset's width."""
    if args.projector_dim:
        return dict(projector_dim=args.projector_dim)
    return {}


def resume(args, run, data, model, ema, opt, scaler):
    """Continue the latest checkpoint of --out with --resume (refusing another experiment; --lr may change), or start
    a new run in an empty folder. -> the step to start from."""
    if reg.list_checkpoints(run.folder) and not args.resume:
        raise SystemExit(f"{run.folder} holds checkpoints already: pass --resume to continue that run, or --out another "
                         "folder")  # fmt: skip
    must_match = {k: getattr(args, k) for k in MUST_MATCH}
    must_match["data_fingerprint"] = data.fingerprint  # the same images and labels, wherever --data-dir now points
    may_change = {k: getattr(args, k) for k in MAY_CHANGE}
    state = run.resume(model, ema, opt, scaler, must_match=must_match, may_change=may_change)
    return state.get("step", 0)


def add_to(sums, losses, weight):
    """sums[k] += weight * losses[k], on the device: the loop syncs with the host only at log steps and saves."""
    for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + weight * v.detach().float()


def interval_means(sums, steps):
    """The mean of each loss over the `steps` steps since the last log (a host sync)."""
    return {k: round(float(v) / max(steps, 1), 6) for k, v in sums.items()}


def log_interval(args, run, sums, step, last_log):
    """Log the interval's mean losses, grad norm and images/s; stop on a non-finite value. -> the new (step, time)."""
    last_step, last_time = last_log
    record = interval_means(sums, step - last_step)
    reg.check_finite(record, step, run.folder)
    now = time.perf_counter()
    record["img_per_s"] = round((step - last_step) * args.batch_size / (now - last_time), 1)
    run.log(step=step, **record)
    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
    sums.clear()
    return step, now


def save(args, run, data, sums, steps, step, model, ema, opt, scaler):
    """A checkpoint, after checking the losses since the last log are finite (a NaN is never saved)."""
    reg.check_finite(interval_means(sums, steps), step, run.folder)
    settings = dict(vars(args), data_fingerprint=data.fingerprint)  # for the checks on resume
    run.save(step, model, ema, opt, scaler, args=settings)


def finish(args, run):
    """The plots of a run: losses.png, and t_bins.png when it evaluated."""
    log_path = os.path.join(run.folder, "log.jsonl")
    plots = [reg.plot_losses(log_path, os.path.join(run.folder, "losses.png"))]
    if args.eval_every:
        plots.append(reg.plot_t_bins(log_path, os.path.join(run.folder, "t_bins.png")))
    print("plots: " + ", ".join(p for p in plots if p))


def bench(args, net, model, ema, opt, scaler, data, ctx):
    """--bench N: time N steps after --warmup steps, split into data (images and the encoder, or the cache read),
    forward+backward and optimiser (reg.StepTimer); print and return the medians."""
    device = data.images.device
    timer = reg.StepTimer(device)
    weight = args.micro_batch / args.batch_size
    for step in range(args.warmup + args.bench):
        timer.start()
        x, y, feats = batch_at(step, data, args, ctx)
        timer.mark("data")
        for i in range(0, args.batch_size, args.micro_batch):
            part = slice(i, i + args.micro_batch)
            part_feats = None if feats is None else (feats[0][part], feats[1][part])
            with ctx:
                losses = reg.reg_loss(net, x[part], y[part], part_feats, beta=args.beta, lam=args.lam)
            scaler.scale(losses["loss"] * weight).backward()
        timer.mark("fwd_bwd")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        reg.ema_update(ema, model, args.ema)
        timer.mark("optimizer")
    live_encoder = data.encoder if data.cache is None else None
    flops_per_image = 3 * reg.model_flops(model.cfg) + reg.encoder_flops(live_encoder)  # backward = 2x forward
    report = timer.report(args.batch_size, flops_per_image, device, args.warmup, args.peak_tflops)
    print(f"bench {args.model} {args.method}, batch {args.batch_size}: "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))  # fmt: skip
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Samples, evaluation and the diagnostics of issue 10


def setup_probe(args, data, model, ctx):
    """Fixed noise for the sample grids (a row per class; 8 rows unconditional), the held-out batch with its features,
    and for evaluation the FD encoder, its reference statistics and the class centroids of the real tokens."""
    device = data.images.device
    classes = len(data.classes)
    rows = classes if classes > 1 else 8
    fixed = torch.Generator().manual_seed(args.seed)  # the same noise for every grid
    grid_x = torch.randn(rows * 8, *data.images.shape[1:], generator=fixed).to(device)
    grid_cls = torch.randn(rows * 8, data.feature_dim, generator=fixed).to(device)
    grid_y = torch.arange(rows, device=device).repeat_interleave(8) % classes
    probe = Probe(grid_x, grid_cls, grid_y)
    if args.eval_every:
        held = torch.arange(data.n_train, len(data.images))  # the held-out images, after the training ones
        no_flip = torch.zeros_like(held)
        probe.held_x = to_pixels(data.images[held.to(device)], no_flip.to(device))
        probe.held_y = data.labels[held.to(device)]
        probe.held_feats = features_of(data, probe.held_x, no_flip, held, ctx)
        probe.fd_encoder = load_encoder_seeded(args.fd_encoder, 16, args.fd_encoder_weights, device,
                                               "--fd-encoder-weights", args.seed)  # fmt: skip
        reference = fd_reference(args, data, probe.fd_encoder)
        probe.fd_reference = tuple(part.to(device) for part in reference)  # FD's eigendecompositions run there
    if args.eval_every and model.entangled:
        probe.centroids = token_centroids(data, model.cfg, ctx)
    return probe


def fd_reference(args, data, encoder):
    """Mean and covariance of the FD encoder's class token over the training images, cached under a fingerprint of
    the images and the encoder's weights."""
    training = data.images[: data.n_train]
    key = reg.fingerprint(training, *encoder.state_dict().values(), args.fd_encoder)
    path = os.path.join(args.cache_dir or args.data_dir, f"stats-{args.fd_encoder.replace('/', '_')}-{key}.pt")
    return reg.encoder_stats(encoder, training.split(args.batch_size), cache=path)


def token_centroids(data, cfg, ctx):
    """The mean real token of each class (K, E) over the training images (unflipped), from the cache or the encoder."""
    tokens = []
    for idx in torch.arange(data.n_train).split(1024):
        no_flip = torch.zeros_like(idx)
        x = to_pixels(data.images[idx.to(data.images.device)], no_flip.to(data.images.device))
        feats = features_of(data, x, no_flip, idx, ctx)
        tokens.append(reg.token_target(cfg, feats).float().cpu())
    return reg.class_centroids(torch.cat(tokens), data.labels[: data.n_train].cpu(), len(data.classes))


def generate(args, ema, x, y, cls, trace=None):
    """EMA samples in [-1, 1] and their tokens (None without one); the RNG is forked and seeded, so sampling never
    perturbs training (exact resume)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), reg.autocast(x.device, args.precision):
        torch.manual_seed(args.seed)
        images, tokens = reg.sample(ema, x, y, cls if ema.entangled else None, steps=args.sample_steps,
                                    mode=args.sampler, cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale,
                                    null_label=ema.cfg.num_classes, trace=trace)  # fmt: skip
    return images.float().clamp(-1, 1), tokens


def save_samples(args, ema, probe, out, step):
    """samples_NNNNNNN.png: the EMA's grid from fixed noise (a row per class). strip_NNNNNNN.png: for the first sample
    of each row, the model's estimate of the clean image at 8 times along the sampler's path (t = 1 -> 0)."""
    trace = []
    images, _ = generate(args, ema, probe.grid_x, probe.grid_y, probe.grid_cls, trace)
    save_image((images + 1) / 2, os.path.join(out, f"samples_{step:07d}.png"), nrow=8)
    frames = reg.strip_frames(trace, STRIP_FRAMES)[::8]  # (rows, frames, 3, H, W)
    strip = (frames.flatten(0, 1).clamp(-1, 1) + 1) / 2
    save_image(strip, os.path.join(out, f"strip_{step:07d}.png"), nrow=STRIP_FRAMES)


def fd_samples(args, ema, data):
    """--eval-n EMA samples (the classes in turn), as uint8, with their labels and generated tokens (or None)."""
    device = data.images.device
    g = torch.Generator().manual_seed(args.seed + 1)  # not the grids' noise
    images, tokens, labels = [], [], []
    for i in range(0, args.eval_n, args.batch_size):
        n = min(args.batch_size, args.eval_n - i)
        x = torch.randn(n, *data.images.shape[1:], generator=g).to(device)
        cls = torch.randn(n, data.feature_dim, generator=g).to(device)
        y = torch.arange(i, i + n, device=device) % len(data.classes)
        sample, token = generate(args, ema, x, y, cls)
        images.append(((sample + 1) * 127.5).round().to(torch.uint8))  # (n, 3, H, W)
        tokens.append(token)
        labels.append(y)
    has_token = tokens[0] is not None
    return torch.cat(images), torch.cat(tokens) if has_token else None, torch.cat(labels)


@torch.no_grad()
def evaluate(args, ema, data, probe, run, step):
    """Log the held-out loss per t bin, FD of --eval-n EMA samples vs the training set (and of each half: the spread
    is the evaluation noise), and for an entangled token where generated tokens land and how consistent they are."""
    with reg.autocast(data.images.device, args.precision):
        bins = reg.loss_per_t_bin(ema, probe.held_x, probe.held_y, probe.held_feats, bins=BINS, seed=args.seed)
    images, tokens, labels = fd_samples(args, ema, data)
    features = torch.cat([probe.fd_encoder(part)[0] for part in images.split(args.batch_size)]).double()  # (n, E)
    half = len(features) // 2
    fds = {}
    for name, part in (("fd", features), ("fd_a", features[:half]), ("fd_b", features[half:])):
        stats = (part.mean(0), torch.cov(part.T))  # as reg.encoder_stats, the encoder run once for all three
        fds[name] = round(reg.frechet_distance(stats, probe.fd_reference), 4)
    record = dict(step=step, **fds, fd_encoder=args.fd_encoder, eval_n=args.eval_n, bin_t=bins["t"],
                  bin_denoise=bins["denoise"], bin_denoise_cls=bins["denoise_cls"])  # fmt: skip
    if ema.entangled:
        record.update(reg.token_landing(tokens, labels, probe.centroids))
        record["token_consistency"] = token_consistency(data, ema.cfg, images, tokens, args.batch_size)
    run.log(**record)
    shown = {k: v for k, v in record.items() if isinstance(v, float)}
    tqdm.write(f"step {step}: FD_{args.fd_encoder} ({args.eval_n} EMA samples vs the training set) "
               + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))  # fmt: skip
    if args.save_npz:  # the ADM evaluator's format
        np.savez(os.path.join(run.folder, f"samples_{step:07d}.npz"), arr_0=images.permute(0, 2, 3, 1).cpu().numpy())


def token_consistency(data, cfg, images, tokens, batch_size):
    """Mean cosine between the token the model generated and the frozen encoder's token of the image it generated."""
    real = [reg.token_target(cfg, data.encoder(part)) for part in images.split(batch_size)]
    cosine = F.cosine_similarity(torch.cat(real).float(), tokens.float(), dim=-1)
    return round(float(cosine.mean()), 4)


# ----------------------------------------------------------------------------------------------------------------------
# The comparison (issue 10)


def compare(args):
    """--compare: sit, repa and reg with the same model, data, seed(s) and budget, each into <out>/<method> (or
    <out>/<method>-seed<s> with several --seeds), evaluated at the same steps; <out>/compare.png draws FD over steps
    for every run and the last evaluation's held-out loss per t bin."""
    out = args.out or os.path.join("runs", f"cifar-compare-{args.model.replace('/', '-')}")
    seeds = args.seeds or [args.seed]
    logs = {}
    for seed in seeds:
        for method in COMPARE_METHODS:
            name = method if len(seeds) == 1 else f"{method} seed {seed}"
            folder = os.path.join(out, method if len(seeds) == 1 else f"{method}-seed{seed}")
            arm = argparse.Namespace(**dict(vars(args), method=method, seed=seed, out=folder, compare=False))
            train(arm)
            logs[name] = os.path.join(folder, "log.jsonl")
    png = reg.plot_comparison(logs, os.path.join(out, "compare.png"), key="fd")
    for name, path in logs.items():
        last = [r for r in reg.read_log(path) if "fd" in r][-1]
        print(f"{name:>12}: step {last['step']}, FD {last['fd']:.2f} (halves {last['fd_a']:.2f}, {last['fd_b']:.2f})")
    print(f"comparison: {png}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Command line: every numeric flag is checked here, with its allowed range in the error


def seed_list(text):
    """argparse type: comma-separated seeds >= 0, e.g. 0,1,2."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1") from None
    if min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be integers >= 0")
    return seeds


def check_args(p, args):
    """The checks that involve two flags (argparse's error: the usage line and the message, exit status 2)."""
    if args.micro_batch is None:
        args.micro_batch = args.batch_size
    if args.batch_size % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --batch-size {args.batch_size}")
    if args.eval_every and args.eval_n < 4:
        p.error(f"--eval-n {args.eval_n}: give at least 4 (FD is also computed on each half of the samples)")
    if args.eval_every and args.holdout < 1:
        p.error("--eval-every needs held-out images for the loss per t bin: --holdout >= 1")
    if args.compare and not args.eval_every:
        p.error("--compare compares evaluations: give --eval-every >= 1")
    if args.seeds and not args.compare:
        p.error("--seeds is for --compare; a single run takes --seed")
    if args.compare and args.bench:
        p.error("--bench times one method: drop --compare")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data-dir", default="data/cifar10", help="an ImageFolder (a folder per class), or where CIFAR-10 is or goes")
    a("--limit", type=reg.nonneg_int, default=0, help="train on a fixed random subset of this many images; 0 = all")
    a("--holdout", type=reg.nonneg_int, default=256, help="images set aside before --limit, never trained on: the "
      "held-out batch of the loss per t bin; default 256")  # fmt: skip
    a("--unconditional", action="store_true", help="every label 0 (one class); the grids show rows of samples")
    a("--model", default="SiT-B/2", choices=list(reg.PRESETS), help="default SiT-B/2 (~1 h on a GPU); CPU: SiT-Ti/4")
    a("--method", default="reg", choices=list(reg.METHODS), help="reg (the paper), repa, sit, or a REG Sec. 4 ablation")
    a("--beta", type=reg.nonneg_float, default=0.03, help="token loss weight (REG Sec. 3; paper 0.03)")
    a("--lam", type=reg.nonneg_float, default=0.5, help="alignment loss weight (REG Sec. 3 / REPA; paper 0.5)")
    a("--projector-dim", type=reg.nonneg_int, default=0, help="REPA projector width; 0 = the preset's (2048; Ti: 256)")
    a("--encoder", default="dinov2-b", help="frozen encoder: dinov2-{s,b,l,g}[-reg] or a timm name; paper dinov2-b")
    a("--encoder-weights", default=None, help="a local weights file (offline), or 'random' (tests); default: the hub")
    a("--cache-features", action="store_true", help="encode the data once (both flips, float16) and train without it")
    a("--cache-dir", default=None, help="where feature caches and FD reference statistics go; default --data-dir")
    a("--steps", type=reg.positive_int, default=40000, help="optimiser steps; default 40k (SiT-B/2: ~1 h, est.)")
    a("--batch-size", type=reg.positive_int, default=128, help="images per optimiser step; default 128")
    a("--micro-batch", type=reg.positive_int, default=None, help="images per forward pass (gradient accumulation fills "
      "the batch; must divide --batch-size); default --batch-size")  # fmt: skip
    a("--lr", type=reg.positive_float, default=1e-4, help="AdamW learning rate (paper 1e-4; betas 0.9/0.999, no weight "
      "decay); 1e-3 for SiT-Ti on a CPU; may change on --resume")  # fmt: skip
    a("--ema", type=reg.unit_float, default=0.9999, help="EMA decay per step; 0.9999 (paper); 0.995: short runs")
    a("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="GPU autocast; fp16 adds a GradScaler")
    a("--compile", action="store_true", help="torch.compile the SiT (off by default, so it can be stepped through)")
    a("--device", default=None, help="default: cuda, then mps, then cpu")
    a("--seed", type=reg.nonneg_int, default=0, help="seeds the init, the data order and the sample noise; default 0")
    a("--out", default=None, help="run folder; default runs/cifar-<method>-<model> (--compare: runs/cifar-compare-"
      "<model>, a folder per method inside)")  # fmt: skip
    a("--resume", action="store_true", help="continue the latest checkpoint in --out, exactly")
    a("--keep", type=reg.nonneg_int, default=3, help="checkpoints kept; default 3, 0 = all")
    a("--log-every", type=reg.positive_int, default=100, help="steps per log.jsonl record (means over the interval; the "
      "loop's only host syncs); default 100")  # fmt: skip
    a("--ckpt-every", type=reg.positive_int, default=5000, help="steps between checkpoints (also at the end, on Ctrl-C "
      "and SIGTERM); default 5000")  # fmt: skip
    a("--sample-every", type=reg.nonneg_int, default=2500, help="steps between EMA sample grids and sampling strips; "
      "default 2500, 0 = off")  # fmt: skip
    a("--sampler", default="euler", choices=["euler", "heun", "sde"], help="default euler (fast; the paper's: sde)")
    a("--sample-steps", type=reg.positive_int, default=50, help="sampler steps; default 50 (speed; the paper's 250)")
    a("--cfg-scale", type=reg.nonneg_float, default=1.0, help="classifier-free guidance scale; default 1 (none)")
    a("--cls-cfg-scale", type=float, default=None, help="the token's guidance scale; default --cfg-scale; <= 0: none")
    a("--eval-every", type=reg.nonneg_int, default=0, help="steps between evaluations (FD, loss per t bin, token "
      "landing); default 0 = off")  # fmt: skip
    a("--eval-n", type=reg.positive_int, default=5000, help="EMA samples per FD evaluation (>= 4); default 5000")
    a("--fd-encoder", default="dinov2-l", help="the FD feature space; default dinov2-l (FD_DINOv2, Stein et al. 2023)")
    a("--fd-encoder-weights", default=None, help="a local weights file for --fd-encoder; default: the hub")
    a("--save-npz", action="store_true", help="also save the FD samples as .npz (arr_0 uint8 NHWC, the ADM format)")
    a("--compare", action="store_true", help="train sit, repa and reg in turn with the same settings and draw "
      f"compare.png; its defaults: {COMPARE_DEFAULTS} (any flag given wins)")  # fmt: skip
    a("--seeds", type=seed_list, default=None, help="--compare: seeds to run each method with, e.g. 0,1")
    a("--bench", type=reg.nonneg_int, default=0, help="time this many steps after --warmup, print, exit")
    a("--warmup", type=reg.nonneg_int, default=3, help="--bench: untimed steps first; default 3")
    a("--peak-tflops", type=reg.nonneg_float, default=0, help="peak bf16 TFLOP/s for the MFU; default: reg.PEAK_TFLOPS")
    args = p.parse_args(argv)
    if args.compare:  # the comparison's own defaults; flags given on the command line still win
        p.set_defaults(**COMPARE_DEFAULTS)
        args = p.parse_args(argv)
    check_args(p, args)
    return args


if __name__ == "__main__":
    main(parse_args())
