"""
Train REG (or a baseline: --method sit / repa / reg-noalign) on CIFAR-10 or any ImageFolder, in pixel space.

    python train_cifar.py            # the machine at hand: the paper's recipe on a GPU, the CPU recipe elsewhere
    python train_cifar.py --data-dir cifar/train --encoder-weights tf_efficientnet_lite0.in1k.safetensors  # offline
    python train_cifar.py --compare  # every --methods with every --seeds: compare.md and compare.png

The paper's recipe (GPU, about an hour on one H100-class card by the FLOP count): SiT-B/2 on 32x32 pixels with
DINOv2 ViT-B/14 at 224 px, batch 128, 40K steps. The CPU recipe (about 7 minutes on 2 cores): SiT-Ti/4 on 1,000
images, EfficientNet-Lite0 run once into a feature cache, the token on its top 128 principal directions. Every log
record carries the losses, images/s, MFU (GPU) and peak memory: `--steps 50 --log-every 10` is a benchmark.
"""

import argparse
import copy
import functools
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, ImageFolder
from tqdm import tqdm

import reg

# what makes a run another experiment: a run folder with checkpoints continues from the newest only if none of these
# changed (the rest may change, and is logged)
MUST_MATCH = "model method beta lam batch_size seed encoder limit holdout unconditional ema token_dim data_key".split()
MUST_MATCH += ["encoder_key"]  # the data's and the encoder's content (reg.fingerprint), whatever their names
# what `python train_cifar.py` runs on a machine without a GPU (any flag given wins; --recipe paper: the paper's)
CPU_RECIPE = (
    "--model SiT-Ti/4 --limit 1000 --batch-size 32 --steps 2000 --lr 1e-3 --ema 0.995 --sample-every 250 "
    "--cache-features --token-dim 128 --encoder tf_efficientnet_lite0"
)
# --compare's defaults (any flag given wins): SiT-S/2 is 384 wide, so the token is cut to 256 directions to fit
COMPARE = (
    "--model SiT-S/2 --batch-size 256 --steps 2000 --lr 3e-4 --ema 0.995 --limit 10000 --token-dim 256 --eval-n 2000 "
    "--cache-features --eval-every 500 --sample-every 500 --log-every 50 --seeds 0 1 2 3 --fd-encoder inception_v3.tv_in1k"
)
BINS = 10  # t bins of the held-out loss (minRF's diagnostic)
STRIP_FRAMES = 8  # clean-image estimates per sampling strip, from t = 1 to the end
PER_ROW = 8  # samples per class row of a grid
SAMPLE_STEPS = 50  # Euler steps of the grids and FD samples, no guidance (sample.py has the paper's SDE and CFG)
KEEP = 3  # checkpoints kept, the newest
# a CNN encoder (no patch grid of its own) sees the images at 128 px: on CIFAR, Lite0's pooled vector is as good a
# nearest-neighbour feature at 128 px as at its own 224 (66.4% either way), at a third of the FLOPs
CNN_SIZE = 128


@dataclass
class Data:
    """The images of a run on the device: the N training images first, then the held-out ones (never trained on)."""

    images: torch.Tensor  # (N + holdout, 3, H, W) uint8
    labels: torch.Tensor  # (N + holdout,)
    classes: list
    n_train: int  # N
    encoder: object = None  # the frozen encoder (None for plain SiT)
    cache: object = None  # (2 flips, N + holdout, 1+T, E) float16 features: a numpy memmap or a device tensor


# Data -----------------------------------------------------------------------------------------------------------------


def find_inputs(args, device):
    """The dataset (listed, not yet read) and the frozen encoder (None for plain SiT). What is missing, the data or
    the encoder's weights, is named at once, each with its fix, before any heavy work."""
    problems = []
    dataset = None
    encoder = None
    try:
        dataset = open_dataset(args)
    except ValueError as e:
        problems.append(str(e))
    if reg.SiTConfig(**reg.METHODS[args.method]).needs_encoder:
        side = np.asarray(dataset[0][0]).shape[0] if dataset else 32
        with torch.random.fork_rng():  # 'random' weights (tests) from the seed; the training RNG untouched
            torch.manual_seed(args.seed)
            try:
                grid = side // reg.PRESETS[args.model]["patch_size"]
                encoder = reg.load_encoder(args.encoder, grid, args.encoder_weights, device, size=CNN_SIZE)
            except (ValueError, RuntimeError) as e:
                problems.append(str(e))
    if problems:
        raise ValueError("\n  ".join(["cannot start:", *problems]))
    return dataset, encoder


def open_dataset(args):
    """--data-dir: an ImageFolder (one folder of same-size images per class, directly inside), else CIFAR-10
    (downloaded there). Listed; an image is read when indexed, as uint8 (H, W, 3) (reg.read_image)."""
    if os.path.isdir(args.data_dir) and "cifar-10-batches-py" not in os.listdir(args.data_dir):
        try:
            valid = functools.partial(in_a_class_folder, args.data_dir)
            return ImageFolder(args.data_dir, loader=reg.read_image, is_valid_file=valid)
        except FileNotFoundError as e:  # no class folders, or none with images directly inside
            fix = "Put the images in one folder per class (an archive's top folder? pass its train folder)"
            raise ValueError(f"--data-dir {args.data_dir}: {e} {fix}") from None
    new_folder = not os.path.exists(args.data_dir)
    try:
        return CIFAR10(args.data_dir, train=True, download=True)
    except Exception as e:
        if new_folder:  # leave no empty folder behind: a rerun meets the same message
            shutil.rmtree(args.data_dir, ignore_errors=True)
        raise ValueError(
            f"--data-dir {args.data_dir} {'does not exist' if new_folder else 'holds no ImageFolder'} and CIFAR-10 "
            f"could not be downloaded there ({str(e)[:80]}). Offline? Pass any ImageFolder as --data-dir (for "
            "CIFAR-10 as JPEGs: the folder holding the 10 class folders)"
        ) from None


def in_a_class_folder(root, path):
    """An image directly in a class folder of root: deeper ones (an archive one level too high) would merge classes."""
    class_parent = os.path.normpath(os.path.dirname(os.path.dirname(path)))
    return path.lower().endswith(reg.IMAGE_SUFFIXES) and class_parent == os.path.normpath(root)


def split(args, dataset):
    """A fixed random order (seed 0, the same for every --seed) sets --holdout images aside first, then --limit of the
    rest (0 = all) are the training set. -> (training indices, held-out indices), each sorted."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    train = order[args.holdout :][: args.limit or None]
    if len(train) < max(args.limit, args.batch_size):
        raise ValueError(
            f"{len(dataset)} images leave {len(train)} for training after --holdout {args.holdout}, fewer "
            f"than --limit {args.limit} or --batch-size {args.batch_size}: lower them"
        )
    return train.sort().values, order[: args.holdout].sort().values


def check_memory(args, n_images, side, encoder):
    """On a CPU, refuse a run that would not fit in this machine's memory before reading a single image: the weights,
    gradients, AdamW's two moments and the EMA (20 bytes a parameter; a block holds 18 D^2: attention 4, MLP 8, adaLN
    6), the activations a training step keeps per image (fp32, measured on SiT-S/2 and B/2 here: about 12 D + 2.5 MLP
    widths per token and block), the images and a live encoder."""
    size = reg.PRESETS[args.model]
    D = size["hidden_size"]
    tokens = (side // size["patch_size"]) ** 2 + 1
    per_image = 4 * size["depth"] * tokens * (12 * D + 2.5 * 4 * D)
    encoder_bytes = 4 * sum(p.numel() for p in encoder.parameters()) if encoder and not args.cache_features else 0
    need = 20 * 18 * size["depth"] * D**2 + args.batch_size * per_image + n_images * 3 * side**2 + encoder_bytes
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise ValueError(
            f"{args.model} at --batch-size {args.batch_size} needs about {need / 2**30:.0f} GiB, this "
            f"machine has {have / 2**30:.0f}: lower --batch-size, pick a smaller --model, or drop "
            "--recipe paper for the CPU recipe"
        )


def load_data(args, dataset, device):
    """The images kept (training, then held-out), read once, on the device, with their labels and class names."""
    train, held_out = split(args, dataset)
    keep = torch.cat([train, held_out]).tolist()  # only these are read
    arrays = [np.asarray(dataset[i][0]) for i in tqdm(keep, desc="reading images", disable=len(keep) < 5000)]
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
        raise ValueError(
            f"--data-dir {args.data_dir}: images of sizes {sizes[:3]} (H, W, 3), the model needs one "
            "square size: crop or resize them to one square size"
        )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N + holdout, 3, H, W)
    labels = torch.tensor(dataset.targets)[keep]
    classes = dataset.classes
    if args.unconditional:
        labels = torch.zeros_like(labels)
        classes = ["all"]
    return Data(images.to(device), labels.to(device), classes, len(train))


def mirror(u8, flip):
    """uint8 (B, 3, H, W), mirrored where flip (B,) is 1 (the only augmentation)."""
    return torch.where(flip.view(-1, 1, 1, 1).bool(), u8.flip(-1), u8)


def to_pixels(u8):
    """uint8 -> float in [-1, 1], the model's input."""
    return u8.float() / 127.5 - 1


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n, device):
    """Epoch `epoch`'s order of the n training images and their flips, from a generator seeded by (seed, epoch): made
    once an epoch, on the host (a memmap cache reads by them) and copied once to the device (the steps slice them)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    flips = torch.randint(0, 2, (n,), generator=g)
    return (perm, flips), (perm.to(device), flips.to(device))


def batch_at(step, data, args):
    """The batch of optimiser step `step`, a pure function of the step (a resumed run meets exactly the batches the
    uninterrupted run met). -> x (B, 3, H, W) in [-1, 1], y (B,), feats (class token (B, E), patches (B, T, E))."""
    per_epoch = data.n_train // args.batch_size
    host, on_device = epoch_order(args.seed, step // per_epoch, data.n_train, data.images.device)
    part = slice((step % per_epoch) * args.batch_size, (step % per_epoch + 1) * args.batch_size)
    perm, flips = on_device if torch.is_tensor(data.cache) or data.cache is None else host  # where the cache lies
    idx = on_device[0][part]  # (B,)
    u8 = mirror(data.images[idx], on_device[1][idx])  # (B, 3, H, W): image i is mirrored where flips[i] is 1
    return to_pixels(u8), data.labels[idx], features(data, u8, perm[part], flips[perm[part]])


def features(data, u8, idx, flip):
    """The frozen encoder's features of uint8 images u8 (= images idx, mirrored where flip): a cache read (a memmap
    reads idx and flip on the host: batch_at passes them there), or the encoder."""
    if data.cache is None:
        return data.encoder(u8) if data.encoder else None
    if torch.is_tensor(data.cache):  # in the device's memory: a gather there
        rows = data.cache[flip, idx]
    else:  # a memmap: numpy reads just these rows
        rows = torch.from_numpy(data.cache[flip.cpu().numpy(), idx.cpu().numpy()]).to(u8.device)
    rows = rows.float()  # (B, 1+T, E)
    return rows[:, 0], rows[:, 1:]


def open_cache(args, data, key):
    """The encoder's features of every image and its mirror, (2, N + holdout, 1+T, E) float16, in one file named by
    `key` (the images and the encoder's weights and grid), so it can never serve other data. Built on first
    use into a temporary file of this process, renamed when whole (a stopped build's is removed by the next one)."""
    path = os.path.join(args.cache_dir, f"feats-{key}.npy")
    if not os.path.isfile(path):
        os.makedirs(args.cache_dir, exist_ok=True)
        reg.clean_run_folder(args.cache_dir)  # the temporary files of builds that were killed or stopped
        tmp = f"{path}.{os.getpid()}.tmp"
        build_cache(tmp, data, args.batch_size)
        os.replace(tmp, path)
    try:
        return np.load(path, mmap_mode="c")  # copy-on-write: torch takes it as it is (nothing writes to it)
    except ValueError as e:  # truncated or damaged by something else: our writes are atomic
        raise ValueError(f"feature cache {path} is damaged ({e}): delete it and run again to rebuild it") from None


@torch.no_grad()
def build_cache(path, data, batch_size):
    grid = data.encoder.grid
    shape = (2, len(data.images), 1 + grid**2, data.encoder.dim)
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    size_gb = 2 * np.prod(shape) / 1e9  # both flips, float16
    for i in tqdm(range(0, shape[1], batch_size), desc=f"feature cache ({size_gb:.2f} GB in {os.path.dirname(path)})"):
        u8 = data.images[i : i + batch_size]
        for flip in (0, 1):
            cls, patches = data.encoder(mirror(u8, torch.full((len(u8),), flip, device=u8.device)))
            store[flip, i : i + batch_size] = torch.cat([cls[:, None], patches], 1).half().cpu().numpy()
    store.flush()


def to_device_if_fits(array, device, what):
    """A host array (a memmap, read as it is copied) moved to a GPU when it fits in the free memory left, with a
    margin; else left on the host, with one line saying so."""
    if device.type != "cuda":
        return array
    free = torch.cuda.mem_get_info(device)[0]
    if array.nbytes > 0.8 * free:
        print(f"{what} ({array.nbytes / 2**30:.1f} GiB) stays on the host: {free / 2**30:.1f} GiB free on the GPU")
        return array
    return torch.from_numpy(array).to(device)


def training_tokens(data):
    """The encoder token (N, E) of every training image, unflipped: for --token-dim's directions."""
    idx = torch.arange(data.n_train, device=data.images.device)
    tokens = []
    for part in idx.split(256):
        feats = features(data, data.images[part], part, torch.zeros_like(part))
        tokens.append(feats[0].float())
    return torch.cat(tokens)


# Train ----------------------------------------------------------------------------------------------------------------


def main(args):
    """One run, or --compare; reg's errors (which name the fix) become one line."""
    if args.recipe == "cpu":
        print(f"the CPU recipe's defaults ({CPU_RECIPE}) under the flags given; --recipe paper: the paper's")
    try:
        if args.compare:
            return compare(args)
        return train(args)
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # outside the training loop (which saves and stops): reading data, building the cache
        raise SystemExit("stopped; what was written is whole: run the same command again to continue") from None


def train(args):
    """One run, read top to bottom. -> (run folder, whether Ctrl-C or SIGTERM stopped it)."""
    device = reg.pick_device(args.device)
    if not reg.SiTConfig(**reg.METHODS[args.method]).entangled:
        args.token_dim = 0  # no token to project: not stored, not compared as if it mattered
    out = args.out or os.path.join("runs", f"cifar-{args.method}-{args.model.replace('/', '-')}")
    with reg.lock_folder(out):  # one trainer per folder while the run lasts
        # Data, the frozen encoder and its feature cache
        data, settings = prepare(args, device, out)
        # Model and optimiser
        model, ema, opt, scaler = build(args, data, device)
        net = torch.compile(model) if args.compile else model
        if data.cache is not None:  # on a GPU when it fits beside the model and AdamW
            data.cache = to_device_if_fits(data.cache, device, "the feature cache")
        # Resume
        step = 0
        if reg.checkpoints(out):  # the same command continues a run, exactly (a scheduler's requeue, a Ctrl-C)
            step = reg.resume(out, settings, MUST_MATCH, model, ema, opt, scaler)["step"]
        judge = make_judge(args, data) if args.eval_every else None
        what = (
            f"{args.method} {args.model}, {data.n_train} images, {len(data.classes)} classes, batch {args.batch_size}"
        )
        print(f"run {out}: {what}, steps {step} -> {args.steps}")
        # Train
        sums = {}  # running sums since the last log, on the device: the loop syncs with the host only at log steps
        logged = (step, time.perf_counter())
        flops_per_image = 3 * reg.model_flops(model.cfg)  # forward + backward (2x)
        quiet = sys.gettrace() is not None  # under a debugger, a progress bar (the time left) would draw over its lines
        with reg.GracefulStop() as stop, tqdm(total=args.steps, initial=step, unit="step", disable=quiet) as bar:
            while step < args.steps and not stop.requested:
                with reg.autocast(device, args.precision):
                    x, y, feats = batch_at(step, data, args)  # a live encoder runs under autocast too
                    losses = reg.reg_loss(net, x, y, feats, beta=args.beta, lam=args.lam)
                scaler.scale(losses["loss"]).backward()
                grad_norm, skipped = reg.optimizer_step(model, ema, opt, scaler, 1.0, args.ema)  # clip, AdamW, EMA
                reg.add_to(sums, dict(losses, grad_norm=grad_norm, skipped=skipped), 1.0)
                step += 1
                bar.update()
                if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.steps or stop.requested:
                    logged = reg.log_interval(out, step, sums, logged, args.batch_size, flops_per_image, device)
                if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                    save_samples(args, ema, data, out, step)
                if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                    evaluate(args, ema, data, judge, out, step)
                if step % args.ckpt_every == 0 or step == args.steps or stop.requested:
                    reg.save_training_state(out, step, model, ema, opt, scaler, settings, KEEP)
        plot_run(out)
    print(
        f"{'stopped' if stop.requested else 'done'} at step {step}: {out} holds the checkpoint, log.jsonl, losses.png"
        + (", samples_*.png and strip_*.png" if args.sample_every else "")
    )
    return out, stop.requested


def prepare(args, device, out):
    """The data with the frozen encoder (and its feature cache) on it, and the run's settings. What is missing, a run
    too big for this machine's memory and a resume that would be refused are refused before the costly work."""
    dataset, encoder = find_inputs(args, device)
    if device.type == "cpu":
        check_memory(args, len(dataset), np.asarray(dataset[0][0]).shape[0], encoder)
    data = load_data(args, dataset, device)
    data.encoder = encoder
    settings = dict(vars(args), classes=data.classes, data_key=reg.fingerprint(data.images, data.labels))
    settings["encoder_key"] = reg.fingerprint(*encoder.state_dict().values()) if encoder else None
    if reg.checkpoints(out):
        reg.newest_checkpoint(out, settings, MUST_MATCH)
    if args.cache_features and encoder:
        key = reg.fingerprint(data.images, settings["encoder_key"], encoder.grid, encoder.size)  # no labels
        data.cache = open_cache(args, data, key)
    return data, settings


def plot_run(out):
    """losses.png: the loss terms over the steps; t_bins.png: the held-out loss per t bin (after an evaluation)."""
    path = os.path.join(out, "log.jsonl")
    terms = dict(denoise="image velocity loss", denoise_cls="token velocity loss (REG)", align="alignment, -cos (REPA)")
    reg.plot_log(path, os.path.join(out, "losses.png"), terms)
    bins = dict(bin_denoise="held-out image loss per t bin", bin_denoise_cls="held-out token loss per t bin")
    reg.plot_log(path, os.path.join(out, "t_bins.png"), bins)


def build(args, data, device):
    """The SiT (with --token-dim, its token's directions fitted to the training set), its EMA, AdamW (the paper's:
    betas 0.9/0.999, no weight decay) and the GradScaler, which acts only for fp16."""
    torch.manual_seed(args.seed)
    encoder_dim = data.encoder.dim if data.encoder else 768
    overrides = dict(input_size=data.images.shape[-1], in_channels=3, num_classes=len(data.classes))
    model = reg.make_model(args.model, args.method, **overrides, encoder_dim=encoder_dim, token_dim=args.token_dim)
    if model.cfg.entangled and args.token_dim:  # ours: the token on its top principal directions
        model.set_token_basis(training_tokens(data))
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0, fused=cuda)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16" and cuda)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 parts on GPUs
    torch.backends.cudnn.allow_tf32 = True
    return model, ema, opt, scaler


# Samples, evaluation and the diagnostics ------------------------------------------------------------------------------


def make_judge(args, data):
    """What evaluations reuse: the FD judge (a frozen encoder: its class token, or a CNN's pooled vector, is the
    feature; dinov2-l's is FD_DINOv2, Stein et al. 2023) and the mean and covariance of its features of the training
    images."""
    with torch.random.fork_rng():  # 'random' weights (tests) from the seed; the training RNG untouched
        torch.manual_seed(args.seed)
        device = data.images.device
        fd_encoder = reg.load_encoder(args.fd_encoder, 16, args.fd_encoder_weights, device, "--fd-encoder-weights")
    feats = torch.cat([fd_encoder(part)[0].double() for part in data.images[: data.n_train].split(args.batch_size)])
    return fd_encoder, (feats.mean(0), torch.cov(feats.T))


def generate(args, ema, x, y, cls, trace=None):
    """EMA samples in [-1, 1] and their tokens (None without one); the RNG is forked and seeded, so sampling never
    perturbs training (exact resume)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), reg.autocast(x.device, args.precision):
        torch.manual_seed(args.seed)
        token = cls if ema.cfg.entangled else None
        images, tokens = reg.sample(ema, x, y, token, steps=SAMPLE_STEPS, mode="euler", trace=trace)
    return images.float().clamp(-1, 1), tokens


def save_samples(args, ema, data, out, step):
    """samples_NNNNNNN.png: the EMA's grid from the same noise at every step (a row per class; 8 rows with one class).
    strip_NNNNNNN.png: for the first sample of each row, the model's estimate of the clean image at 8 times along the
    sampler's path, from noise (t = 1) to the last step."""
    rows = len(data.classes) if len(data.classes) > 1 else 8
    fixed = torch.Generator().manual_seed(args.seed)
    x = torch.randn(rows * PER_ROW, *data.images.shape[1:], generator=fixed).to(data.images.device)
    cls = torch.randn(rows * PER_ROW, ema.cfg.token_width, generator=fixed).to(data.images.device)
    y = torch.arange(rows, device=data.images.device).repeat_interleave(PER_ROW) % len(data.classes)
    trace = []
    images, _ = generate(args, ema, x, y, cls, trace)
    names = [data.classes[label] for label in y[::PER_ROW].tolist()]
    grid = (images.cpu().view(rows, PER_ROW, *images.shape[1:]) + 1) / 2  # (rows, 8, 3, H, W)
    what = f"{args.method} {args.model}, EMA at step {step}: {PER_ROW} samples a row (Euler {SAMPLE_STEPS} steps)"
    reg.save_grid(os.path.join(out, f"samples_{step:07d}.png"), grid, names, title=what)
    frames, times = reg.strip_frames(trace, STRIP_FRAMES)
    strip = (frames[::PER_ROW] + 1) / 2  # (rows, frames, 3, H, W)
    what = f"step {step}: the clean-image estimate along the sampling path, from noise (t = 1) to the last step"
    reg.save_grid(os.path.join(out, f"strip_{step:07d}.png"), strip, names, [f"t={t:.2f}" for t in times], what)


@torch.no_grad()
def evaluate(args, ema, data, judge, out, step):
    """Log the held-out loss per t bin; FD of --eval-n EMA samples (the classes in turn) against the training set, and
    of each half (their spread is the evaluation noise); for an entangled token, the generated tokens' consistency
    with the encoder's token of the image they came with."""
    fd_encoder, reference = judge
    held = torch.arange(data.n_train, len(data.images), device=data.images.device)
    held_feats = features(data, data.images[held], held, torch.zeros_like(held))
    bins = reg.loss_per_t_bin(ema, to_pixels(data.images[held]), data.labels[held], held_feats, BINS, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)  # not the grids' noise
    x = torch.randn(args.eval_n, *data.images.shape[1:], generator=g).to(data.images.device)
    cls = torch.randn(args.eval_n, ema.cfg.token_width, generator=g).to(data.images.device)
    y = torch.arange(args.eval_n, device=data.images.device) % len(data.classes)
    parts = [
        generate(args, ema, *batch)
        for batch in zip(x.split(args.batch_size), y.split(args.batch_size), cls.split(args.batch_size))
    ]
    images = ((torch.cat([p[0] for p in parts]) + 1) * 127.5).round().to(torch.uint8)  # (n, 3, H, W)
    feats = torch.cat([fd_encoder(part)[0].double() for part in images.split(args.batch_size)])
    half = len(feats) // 2
    record = dict(step=step, bin_t=bins["t"], bin_denoise=bins["denoise"], bin_denoise_cls=bins["denoise_cls"])
    for name, part in (("fd", feats), ("fd_a", feats[:half]), ("fd_b", feats[half:])):
        record[name] = round(reg.frechet_distance((part.mean(0), torch.cov(part.T)), reference), 4)
    if ema.cfg.entangled:
        tokens = torch.cat([p[1] for p in parts]).float()
        real = torch.cat([ema.project_token(data.encoder(part)[0]) for part in images.split(args.batch_size)])
        record["token_consistency"] = round(float(F.cosine_similarity(real.float(), tokens, dim=-1).mean()), 4)
    reg.log(out, **record)
    tqdm.write(
        f"step {step}: FD_{args.fd_encoder} of {args.eval_n} EMA samples "
        + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
    )


def compare(args):
    """--compare: every method of --methods with every seed of --seeds (the same model, data, budget and evaluation
    noise), each in <out>/<method>-seed<s>; then compare.md and compare.png (report). Rerunning the command continues
    the arms not yet finished and only redraws the finished ones; Ctrl-C stops the comparison."""
    out = args.out or os.path.join("runs", f"cifar-compare-{args.model.replace('/', '-')}")
    seeds = args.seeds or [args.seed]
    runs = {}
    for seed in seeds:
        for method in args.methods:
            arm = argparse.Namespace(**dict(vars(args), method=method, seed=seed, out=f"{out}/{method}-seed{seed}"))
            folder, stopped = train(arm)
            if stopped:
                return out, True
            runs[method, seed] = [r for r in reg.read_log(os.path.join(folder, "log.jsonl")) if "fd" in r][-1]
    report(out, runs, args.methods, seeds, args.fd_encoder)
    return out, False


def report(out, runs, methods, seeds, judge):
    """compare.md and compare.png: each method against the baseline (sit if compared, else the first method) at the
    last evaluation, seed by seed (one method's seeds spread more than methods differ, so seeds are paired): FD, and
    the held-out image loss per t bin in % of the baseline's."""
    base = "sit" if "sit" in methods else methods[0]
    methods = [base] + [m for m in methods if m != base]  # the baseline first
    others = methods[1:]
    step = runs[base, seeds[0]]["step"]
    fd = {key: r["fd"] for key, r in runs.items()}
    diff = {m: [fd[m, s] - fd[base, s] for s in seeds] for m in methods}
    bins = {
        m: [[100 * (a / b - 1) for a, b in zip(runs[m, s]["bin_denoise"], runs[base, s]["bin_denoise"])] for s in seeds]
        for m in methods
    }
    lines = [f"FD_{judge} at step {step}, lower is better; the others: their difference to {base}, seed by seed", ""]
    lines += ["| seed | " + " | ".join(methods) + " |", "|---" * (1 + len(methods)) + "|"]
    for i, s in enumerate(seeds):
        cells = [f"{fd[m, s]:.2f}" + (f" ({diff[m][i]:+.2f})" if m != base else "") for m in methods]
        lines += [f"| {s} | " + " | ".join(cells) + " |"]
    cells = [f"{np.mean([fd[m, s] for s in seeds]):.2f}" for m in methods]
    lines += ["| mean | " + " | ".join(cells) + " |"]
    lowered = {m: sum(d < 0 for d in diff[m]) for m in others}  # in how many seeds
    cells = [f"{np.mean(diff[m]):+.2f} +- {np.std(diff[m]):.2f}, lower in {lowered[m]}" for m in others]
    lines += [f"| minus {base} (of {len(seeds)} seeds) | - | " + " | ".join(cells) + " |"]
    title = f"Held-out image loss per t bin at step {step}: {base}'s; the others' difference in % (seeds where lower)"
    lines += ["", title]
    lines += ["", "| t | " + " | ".join(methods) + " |", "|---" * (1 + len(methods)) + "|"]
    for b, t in enumerate(runs[base, seeds[0]]["bin_t"]):
        cells = [f"{np.mean([runs[base, s]['bin_denoise'][b] for s in seeds]):.4f}"]
        cells += [f"{np.mean([d[b] for d in bins[m]]):+.1f}% ({sum(d[b] < 0 for d in bins[m])})" for m in others]
        lines += [f"| {t:.2f} | " + " | ".join(cells) + " |"]
    for m in [m for m in methods if "token_consistency" in runs[m, seeds[0]]]:  # how far the token got
        consistency = np.mean([runs[m, s]["token_consistency"] for s in seeds])
        held_out = np.mean([runs[m, s]["bin_denoise_cls"] for s in seeds], axis=0)
        losses = " ".join(f"{v:.2f}" for v in held_out)
        lines += ["", f"{m}'s token: consistency {consistency:.3f}; held-out token loss per t bin {losses}"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text)
    draw_comparison(os.path.join(out, "compare.png"), runs, methods, seeds, bins, base, judge)
    print(text + f"comparison: {out}/compare.md, {out}/compare.png")


def draw_comparison(png, runs, methods, seeds, bins, base, judge):
    """Two panels, a colour per method and a marker per seed: each seed's last FD, the methods joined by a grey line
    (the pairs); and each method's held-out image loss per t bin in % of the baseline's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    markers = "osD^v<>ph*"
    for j, s in enumerate(seeds):
        marker = markers[j % len(markers)]
        fds = [runs[m, s]["fd"] for m in methods]
        left.plot(range(len(methods)), fds, color="grey", lw=0.8, marker=marker, label=f"seed {s}")
        for i, m in enumerate(methods):
            left.scatter(i, fds[i], color=f"C{i}", marker=marker, zorder=3)
            label = m if j == 0 else None
            right.plot(runs[m, s]["bin_t"], bins[m][j], color=f"C{i}", marker=marker, lw=0.8, label=label)
    left.set(title=f"FD_{judge} at the last evaluation, seed by seed", ylabel="FD (lower is better)")
    left.set(xticks=range(len(methods)), xticklabels=methods)
    right.set(title=f"held-out image loss vs {base}'s", xlabel="t bin (0 data, 1 noise)", ylabel="difference (%)")
    right.axhline(0, color="grey", lw=0.8)
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# Command line: every number is checked when parsed, with its allowed range in the error ------------------------------


def parser():
    """Every setting, its default and where the default comes from."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data-dir", default="data/cifar10", help="an ImageFolder (a folder per class), or where CIFAR-10 is or goes")
    a("--limit", type=reg.nonneg_int, default=0, help="train on a fixed random subset of this many images; 0 = all")
    a("--holdout", type=reg.nonneg_int, default=256, help="images never trained on (the loss per t bin); default 256")
    a("--unconditional", action="store_true", help="every label 0 (one class); the grids show rows of samples")
    a("--model", default="SiT-B/2", choices=list(reg.PRESETS), help="default SiT-B/2 (~1 h on a GPU); CPU: SiT-Ti/4")
    a("--method", default="reg", choices=list(reg.METHODS), help="reg (the paper); sit, repa, reg-noalign: baselines")
    a("--beta", type=reg.nonneg_float, default=0.03, help="token loss weight (REG Sec. 3; paper 0.03)")
    a("--lam", type=reg.nonneg_float, default=0.5, help="alignment loss weight (REG Sec. 3 / REPA; paper 0.5)")
    a("--token-dim", type=reg.nonneg_int, default=0, help="ours: K <= width, the token on its top K directions; 0: all")
    a("--encoder", default="dinov2-b", help="frozen encoder: dinov2-{s,b,l,g} or a timm name; paper dinov2-b")
    a("--encoder-weights", default=None, help="a local weights file (offline), or 'random' (tests); default: the hub")
    a("--cache-features", action="store_true", help="encode the data once (both flips, float16) and train without it")
    a("--cache-dir", default="runs/cache", help="feature caches, named by their content; runs/cache")
    a("--steps", type=reg.positive_int, default=40000, help="optimiser steps; default 40k (SiT-B/2: ~1 h, est.)")
    a("--batch-size", type=reg.positive_int, default=128, help="images per optimiser step; default 128")
    a("--lr", type=reg.positive_float, default=1e-4, help="AdamW (paper 1e-4; SiT-Ti on a CPU 1e-3); may change later")
    a("--ema", type=reg.unit_float, default=0.9999, help="EMA decay per step; 0.9999 (paper); 0.995: short runs")
    a("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="GPU autocast; fp16 adds a GradScaler")
    a("--compile", action="store_true", help="torch.compile the SiT (off by default, so it can be stepped through)")
    a("--device", default=None, help="default: cuda, then mps, then cpu")
    a("--seed", type=reg.nonneg_int, default=0, help="seeds the init, the data order and the sample noise; default 0")
    a("--out", help="run folder (rerun to continue it); default runs/cifar-<method>-<model>, or -compare-<model>")
    a("--log-every", type=reg.positive_int, default=100, help="steps per record (means, images/s, MFU, memory); 100")
    a("--ckpt-every", type=reg.positive_int, default=5000, help="steps per checkpoint (and at the end, on stops); 5000")
    a("--sample-every", type=reg.nonneg_int, default=2500, help="steps per EMA grid and sampling strip; 2500, 0 = off")
    a("--eval-every", type=reg.nonneg_int, default=0, help="steps per evaluation (FD, t bins, token); default 0 = off")
    a("--eval-n", type=reg.positive_int, default=5000, help="EMA samples per FD evaluation (>= 4); default 5000")
    a("--fd-encoder", default="dinov2-l", help="the FD feature space; default dinov2-l (FD_DINOv2, Stein et al. 2023)")
    a("--fd-encoder-weights", default=None, help="a local weights file for --fd-encoder; default: the hub")
    a("--recipe", default="auto", choices=["auto", "cpu", "paper"], help="defaults: auto = paper on a GPU, else cpu")
    a("--compare", action="store_true", help=f"train --methods x --seeds, then compare.md/.png; defaults: {COMPARE}")
    a("--seeds", type=reg.nonneg_int, nargs="+", help="--compare: seeds, each run by every method; default --seed")
    a("--methods", nargs="+", choices=list(reg.METHODS), default=["sit", "repa", "reg"], help="--compare: methods")
    return p


def parse_args(argv=None):
    """The command line, with the checks that involve two flags (argparse's error: usage, message, exit status 2).
    Without a GPU the CPU recipe's flags, and with --compare the comparison's, come first: flags given win."""
    p = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.recipe == "auto":
        args.recipe = (
            "paper" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
        )
    recipe = CPU_RECIPE.split() if args.recipe == "cpu" else []
    recipe += COMPARE.split() if args.compare else []
    args = p.parse_args(recipe + argv + ["--recipe", args.recipe])
    if args.eval_every and (args.eval_n < 4 or args.holdout < 1):
        p.error("--eval-every needs --eval-n >= 4 (FD of each half too) and --holdout >= 1 (the loss per t bin)")
    if (args.seeds or args.methods != p.get_default("methods")) and not args.compare:
        p.error("--seeds and --methods are for --compare; a single run takes --seed and --method")
    same_space = reg.ENCODERS.get(args.fd_encoder, args.fd_encoder) == reg.ENCODERS.get(args.encoder, args.encoder)
    if args.compare and (not args.eval_every or same_space):
        p.error(
            "--compare judges by FD: it needs --eval-every, and an --fd-encoder other than --encoder (an FD in the "
            "alignment encoder's own space may favour the methods trained toward it)"
        )
    if args.out and os.path.isfile(args.out):
        p.error(f"--out {args.out} is a file: pass a folder (new, or a run's to continue it)")
    return args


if __name__ == "__main__":
    main(parse_args())
