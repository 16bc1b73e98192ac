"""
Train REG (or a baseline: --method sit / repa / reg-noalign / ...) on CIFAR-10 or any ImageFolder, in pixel space.

GPU, about an hour on one H100-class card (an estimate; SiT-B/2 on 32x32 pixels, DINOv2 ViT-B/14 at 224 px):
    python train_cifar.py --data-dir data/cifar10
CPU, learning within minutes (tiny model, the encoder run once into a feature cache, a subset, small batches):
    OMP_NUM_THREADS=1 python train_cifar.py --data-dir cifar/train --model SiT-Ti/4 --limit 1000 --batch-size 32 \\
        --steps 1500 --lr 1e-3 --ema 0.995 --sample-every 500 --cache-features --token-dim 128 \\
        --encoder tf_efficientnet_lite0 --encoder-weights tf_efficientnet_lite0.in1k.safetensors
What REG adds, in one command (sit, repa and reg with the same model, data, seed and budget):
    python train_cifar.py --compare --data-dir cifar/train --encoder-weights <file> --fd-encoder-weights <file>
Every log record carries the losses, images/s, MFU (GPU) and peak memory: `--steps 50 --log-every 10` is a benchmark.
"""

import argparse
import copy
import functools
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.utils import save_image
from tqdm import tqdm

import reg

# what makes a run another experiment: a run folder with checkpoints continues from the newest only if none of these
# changed (the rest may change, and is logged)
MUST_MATCH = ("model", "method", "beta", "lam", "batch_size", "seed", "encoder", "limit", "holdout", "unconditional",
              "ema", "token_dim", "data_key", "encoder_key")  # fmt: skip
COMPARE_METHODS = ("sit", "repa", "reg")
# --compare's defaults (any flag given wins): SiT-S/2 is 384 wide, so the token is cut to 256 directions to fit
COMPARE_DEFAULTS = dict(model="SiT-S/2", batch_size=256, steps=2000, lr=3e-4, ema=0.995, limit=10000, token_dim=256,
                        cache_features=True, eval_every=500, sample_every=500, eval_n=2000, log_every=50)  # fmt: skip
CPU_RECIPE = "--model SiT-Ti/4 --limit 1000 --batch-size 32 --lr 1e-3 --ema 0.995 --cache-features (README)"
BINS = 10  # t bins of the held-out loss (minRF's diagnostic)
STRIP_FRAMES = 8  # clean-image estimates per sampling strip, from t = 1 to the end
PER_ROW = 8  # samples per class row of a grid
SAMPLE_STEPS = 50  # Euler steps of the grids and FD samples, no guidance (sample.py has the paper's SDE and CFG)
FORECAST_STEP = 5  # after this many steps, say how long the whole run takes here
KEEP = 3  # checkpoints kept, the newest


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


def image_folder(d):
    """An ImageFolder (one folder of same-size images per class, directly inside), listed; an image is read when
    indexed, as uint8 (H, W, 3), and an unreadable file is named (reg.read_image)."""
    try:
        return ImageFolder(d, loader=reg.read_image, is_valid_file=functools.partial(in_a_class_folder, d))
    except FileNotFoundError as e:  # no class folders, or none with images directly inside
        raise ValueError(f"--data-dir {d}: {e} Put the images in one folder per class, directly inside it") from None


def in_a_class_folder(root, path):
    """An image directly in a class folder of root: deeper ones (an archive one level too high) would merge classes."""
    class_parent = os.path.normpath(os.path.dirname(os.path.dirname(path)))
    return path.lower().endswith(reg.IMAGE_SUFFIXES) and class_parent == os.path.normpath(root)


def load_data(args, device):
    """--data-dir: an ImageFolder, else CIFAR-10 (downloaded there). A fixed random order (seed 0, the same for every
    --seed) sets --holdout images aside first, then --limit of the rest (0 = all) are the training set; only the
    images kept are read."""
    if os.path.isdir(args.data_dir) and "cifar-10-batches-py" not in os.listdir(args.data_dir):
        dataset = image_folder(args.data_dir)
    else:
        try:
            dataset = CIFAR10(args.data_dir, train=True, download=True)
        except Exception as e:
            raise ValueError(f"could not get CIFAR-10 into --data-dir {args.data_dir} ({str(e)[:120]}). Offline? Pass "
                             "an ImageFolder as --data-dir") from None  # fmt: skip
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    train = order[args.holdout :][: args.limit or None]
    if len(train) < max(args.limit, args.batch_size):
        raise ValueError(f"{len(dataset)} images leave {len(train)} for training after --holdout {args.holdout}, fewer "
                         f"than --limit {args.limit} or --batch-size {args.batch_size}: lower them")  # fmt: skip
    keep = torch.cat([train.sort().values, order[: args.holdout].sort().values]).tolist()  # only these are read
    arrays = [np.asarray(dataset[i][0]) for i in tqdm(keep, desc="reading images", disable=len(keep) < 5000)]
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) != 1:
        raise ValueError(f"--data-dir {args.data_dir}: images of several sizes {sizes[:3]}: resize them to one size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N + holdout, 3, H, W)
    labels = torch.tensor(dataset.targets)[keep]
    classes = dataset.classes
    if args.unconditional:
        labels = torch.zeros_like(labels)
        classes = ["all"]
    return Data(images.to(device), labels.to(device), classes, len(train))


def attach_encoder(args, data):
    """The frozen encoder, and with --cache-features its feature cache, on `data`. -> the key of its weights."""
    grid = data.images.shape[-1] // reg.PRESETS[args.model]["patch_size"]
    with torch.random.fork_rng():  # 'random' weights (tests) from the seed; the training RNG untouched
        torch.manual_seed(args.seed)
        data.encoder = reg.load_encoder(args.encoder, grid, args.encoder_weights, data.images.device)
    encoder_key = reg.fingerprint(*data.encoder.state_dict().values())
    if args.cache_features:
        data.cache = open_cache(args, data, reg.fingerprint(data.images, encoder_key, grid))  # labels: not features
    return encoder_key


def to_pixels(u8, flip):
    """uint8 (B, 3, H, W) -> float in [-1, 1], mirrored where flip (B,) is 1 (the only augmentation)."""
    mirrored = torch.where(flip.view(-1, 1, 1, 1).bool(), u8.flip(-1), u8)
    return mirrored.float() / 127.5 - 1


def batch_at(step, data, args):
    """The batch of optimiser step `step`, a pure function of the step (a resumed run meets exactly the batches the
    uninterrupted run met): epoch e's order and flips come from a generator seeded by (seed, e).
    -> x (B, 3, H, W) in [-1, 1], y (B,), feats (class token (B, E), patches (B, T, E)) or None."""
    per_epoch = data.n_train // args.batch_size
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step // per_epoch)
    perm = torch.randperm(data.n_train, generator=g)
    flips = torch.randint(0, 2, (data.n_train,), generator=g)
    start = (step % per_epoch) * args.batch_size
    idx = perm[start : start + args.batch_size]  # (B,)
    x = to_pixels(data.images[idx.to(data.images.device)], flips[idx].to(data.images.device))
    return x, data.labels[idx.to(data.images.device)], features(data, x, flips[idx], idx)


def features(data, x, flip, idx):
    """The frozen encoder's features of images x (= images idx, mirrored where flip): a cache read, or the encoder."""
    if data.cache is None:
        return data.encoder(x) if data.encoder else None
    if torch.is_tensor(data.cache):  # in GPU memory: a gather on the device
        rows = data.cache[flip.to(data.cache.device), idx.to(data.cache.device)]
    else:  # a memmap: numpy reads just these rows
        rows = torch.from_numpy(data.cache[flip.numpy(), idx.numpy()])
    rows = rows.to(x.device).float()  # (B, 1+T, E)
    return rows[:, 0], rows[:, 1:]


def open_cache(args, data, key):
    """The encoder's features of every image and its mirror, (2, N + holdout, 1+T, E) float16, in one file named by
    `key` (the images and the encoder's weights and grid), so it can never serve other data. Built on first
    use into a temporary file of this process, renamed when whole; Ctrl-C or SIGTERM removes it."""
    path = os.path.join(args.cache_dir or args.data_dir, f"feats-{key}.npy")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM as Ctrl-C: clean up
        try:
            build_cache(tmp, data, args.batch_size)
            os.replace(tmp, path)
        except KeyboardInterrupt:
            raise ValueError(
                "interrupted building the feature cache; the partial file was removed: run again"
            ) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            if os.path.exists(tmp):
                os.remove(tmp)
    cache = np.load(path, mmap_mode="r")
    if data.images.device.type == "cuda" and cache.nbytes < torch.cuda.mem_get_info()[0] // 2:
        return torch.from_numpy(np.ascontiguousarray(cache)).to(data.images.device)
    return cache


@torch.no_grad()
def build_cache(path, data, batch_size):
    grid = data.encoder.grid
    shape = (2, len(data.images), 1 + grid**2, data.encoder.dim)
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    size_gb = 2 * np.prod(shape) / 1e9  # both flips, float16
    for i in tqdm(range(0, shape[1], batch_size), desc=f"feature cache in {os.path.dirname(path)} ({size_gb:.2f} GB)"):
        u8 = data.images[i : i + batch_size]
        for flip in (0, 1):
            cls, patches = data.encoder(to_pixels(u8, torch.full((len(u8),), flip, device=u8.device)))
            store[flip, i : i + batch_size] = torch.cat([cls[:, None], patches], 1).half().cpu().numpy()
    store.flush()


def training_tokens(data, cfg):
    """The encoder token (N, E) of every training image, unflipped: for --token-dim's directions and the centroids."""
    idx = torch.arange(data.n_train)
    no_flip = torch.zeros_like(idx)
    tokens = []
    for part, flip in zip(idx.split(256), no_flip.split(256)):
        x = to_pixels(data.images[part.to(data.images.device)], flip.to(data.images.device))
        tokens.append(reg.token_target(cfg, features(data, x, flip, part)).float())
    return torch.cat(tokens)


# Train ----------------------------------------------------------------------------------------------------------------


def main(args):
    """One run, or --compare; reg's errors (which name the fix) become one line."""
    try:
        if args.compare:
            return compare(args)
        return train(args)
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def train(args):
    """One run, read top to bottom. -> (run folder, whether Ctrl-C or SIGTERM stopped it)."""
    device = reg.pick_device(args.device)
    out = args.out or os.path.join("runs", f"cifar-{args.method}-{args.model.replace('/', '-')}")
    with reg.lock_folder(out):  # one trainer per folder while the run lasts
        # Data and the frozen encoder
        data = load_data(args, device)
        settings = dict(vars(args), data_key=reg.fingerprint(data.images, data.labels), encoder_key=None)
        if reg.SiTConfig(**reg.METHODS[args.method]).needs_encoder:
            settings["encoder_key"] = attach_encoder(args, data)
        # Model and optimiser
        model, ema, opt, scaler = build(args, data, device)
        net = torch.compile(model) if args.compile else model
        # Resume
        step = 0
        if reg.checkpoints(out):  # the same command continues a run, exactly (a scheduler's requeue, a Ctrl-C)
            step = reg.resume(out, settings, MUST_MATCH, model, ema, opt, scaler)["step"]
        judge = make_judge(args, data, ema) if args.eval_every else None
        print(f"run {out}: {args.method} {args.model}, {data.n_train} images, {len(data.classes)} classes, step {step}")
        # Train
        sums = {}  # running sums since the last log, on the device: the loop syncs with the host only at log steps
        logged = (step, time.perf_counter())
        started = logged
        weight = args.micro_batch / args.batch_size  # each micro-batch's share of the batch mean
        flops_per_image = 3 * reg.model_flops(model.cfg)  # forward + backward (2x)
        with reg.GracefulStop() as stop:
            while step < args.steps and not stop.requested:
                x, y, feats = batch_at(step, data, args)
                for i in range(0, args.batch_size, args.micro_batch):
                    part = slice(i, i + args.micro_batch)
                    part_feats = None if feats is None else (feats[0][part], feats[1][part])
                    with reg.autocast(device, args.precision):
                        losses = reg.reg_loss(net, x[part], y[part], part_feats, beta=args.beta, lam=args.lam)
                    scaler.scale(losses["loss"] * weight).backward()  # gradients add up over the micro-batches
                    reg.add_to(sums, losses, weight)
                grad_norm, skipped = reg.optimizer_step(model, ema, opt, scaler, 1.0, args.ema)  # clip, AdamW, EMA
                reg.add_to(sums, dict(grad_norm=grad_norm, skipped=skipped), 1.0)
                step += 1
                if step == started[0] + FORECAST_STEP:
                    forecast(args, step, started, device)
                if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.steps or stop.requested:
                    logged = reg.log_interval(out, step, sums, logged, args.batch_size, flops_per_image, device)
                if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                    save_samples(args, ema, data, out, step)
                if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                    evaluate(args, ema, data, judge, out, step)
                if step % args.ckpt_every == 0 or step == args.steps or stop.requested:
                    reg.save_training_state(out, step, model, ema, opt, scaler, settings, KEEP)
        plot_run(out)
    return out, stop.requested


def plot_run(out):
    """losses.png: the loss terms over the steps; t_bins.png: the held-out loss per t bin (after an evaluation)."""
    log_path = {"": os.path.join(out, "log.jsonl")}
    reg.plot_log(log_path, os.path.join(out, "losses.png"), ("loss", "denoise", "denoise_cls", "align"))
    reg.plot_log(log_path, os.path.join(out, "t_bins.png"), ("bin_denoise", "bin_denoise_cls"))


def build(args, data, device):
    """The SiT (with --token-dim, its token's directions fitted to the training set), its EMA, AdamW (the paper's:
    betas 0.9/0.999, no weight decay) and the GradScaler, which acts only for fp16."""
    torch.manual_seed(args.seed)
    overrides = dict(input_size=data.images.shape[-1], in_channels=3, num_classes=len(data.classes),
                     encoder_dim=data.encoder.dim if data.encoder else 768, token_dim=args.token_dim)  # fmt: skip
    model = reg.make_model(args.model, args.method, **overrides).to(device)
    if model.cfg.entangled and args.token_dim:  # ours: the token on its top principal directions
        model.set_token_basis(training_tokens(data, model.cfg))
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0, fused=cuda)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16" and cuda)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 parts on GPUs
    torch.backends.cudnn.allow_tf32 = True
    return model, ema, opt, scaler


def forecast(args, step, started, device):
    """After this process's first steps: how long the steps left take here; on a CPU with hours to go, the CPU recipe.
    `started` = (step, time) when the loop began."""
    seconds = (time.perf_counter() - started[1]) / (step - started[0])  # a step
    hours = seconds * (args.steps - step) / 3600
    print(f"{seconds:.2f} s a step: the {args.steps - step} steps left take {hours:.1f} h ({hours * 60:.0f} min) here")
    if device.type == "cpu" and hours > 1:
        print(f"on a CPU, the CPU recipe learns within minutes: {CPU_RECIPE}")


# Samples, evaluation and the diagnostics ------------------------------------------------------------------------------


def make_judge(args, data, ema):
    """What evaluations reuse: the FD encoder, its statistics over the training images (cached by content) and the
    class centroids of the real tokens (for where generated tokens land)."""
    with torch.random.fork_rng():  # 'random' weights (tests) from the seed; the training RNG untouched
        torch.manual_seed(args.seed)
        fd_encoder = reg.load_encoder(args.fd_encoder, 16, args.fd_encoder_weights, data.images.device,
                                      "--fd-encoder-weights")  # fmt: skip
    training = data.images[: data.n_train]
    reference = reg.fd_stats(fd_encoder, training, args.batch_size, args.cache_dir or args.data_dir)
    centroids = None
    if ema.cfg.entangled:
        tokens = ema.project_token(training_tokens(data, ema.cfg))  # (N, K)
        centroids = reg.class_centroids(tokens, data.labels[: data.n_train], len(data.classes))
    return fd_encoder, reference, centroids


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
    sampler's path (t = 1 -> 0)."""
    rows = len(data.classes) if len(data.classes) > 1 else 8
    fixed = torch.Generator().manual_seed(args.seed)
    x = torch.randn(rows * PER_ROW, *data.images.shape[1:], generator=fixed).to(data.images.device)
    cls = torch.randn(rows * PER_ROW, ema.cfg.token_width, generator=fixed).to(data.images.device)
    y = torch.arange(rows, device=data.images.device).repeat_interleave(PER_ROW) % len(data.classes)
    trace = []
    images, _ = generate(args, ema, x, y, cls, trace)
    save_image((images + 1) / 2, os.path.join(out, f"samples_{step:07d}.png"), nrow=PER_ROW)
    frames = reg.strip_frames(trace, STRIP_FRAMES)[::PER_ROW]  # (rows, frames, 3, H, W)
    strip = (frames.flatten(0, 1).clamp(-1, 1) + 1) / 2
    save_image(strip, os.path.join(out, f"strip_{step:07d}.png"), nrow=STRIP_FRAMES)


@torch.no_grad()
def evaluate(args, ema, data, judge, out, step):
    """Log the held-out loss per t bin; FD of --eval-n EMA samples (the classes in turn) against the training set, and
    of each half (their spread is the evaluation noise); for an entangled token, where the generated tokens land and
    their consistency with the encoder's token of the image they came with."""
    fd_encoder, reference, centroids = judge
    held = torch.arange(data.n_train, len(data.images))
    no_flip = torch.zeros_like(held)
    held_x = to_pixels(data.images[held.to(data.images.device)], no_flip.to(data.images.device))
    held_feats = features(data, held_x, no_flip, held)
    bins = reg.loss_per_t_bin(ema, held_x, data.labels[held.to(held_x.device)], held_feats, BINS, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)  # not the grids' noise
    x = torch.randn(args.eval_n, *data.images.shape[1:], generator=g).to(data.images.device)
    cls = torch.randn(args.eval_n, ema.cfg.token_width, generator=g).to(data.images.device)
    y = torch.arange(args.eval_n, device=data.images.device) % len(data.classes)
    parts = [generate(args, ema, *batch) for batch in zip(x.split(args.batch_size), y.split(args.batch_size),
                                                          cls.split(args.batch_size))]  # fmt: skip
    images = ((torch.cat([p[0] for p in parts]) + 1) * 127.5).round().to(torch.uint8)  # (n, 3, H, W)
    feats = torch.cat([fd_encoder(part)[0].double() for part in images.split(args.batch_size)])
    half = len(feats) // 2
    record = dict(step=step, bin_t=bins["t"], bin_denoise=bins["denoise"], bin_denoise_cls=bins["denoise_cls"])
    for name, part in (("fd", feats), ("fd_a", feats[:half]), ("fd_b", feats[half:])):
        record[name] = round(reg.frechet_distance((part.mean(0), torch.cov(part.T)), reference), 4)
    if ema.cfg.entangled:
        tokens = torch.cat([p[1] for p in parts]).float()
        record.update(reg.token_landing(tokens, y, centroids))
        real = torch.cat([ema.token_of(data.encoder(part)) for part in images.split(args.batch_size)])
        record["token_consistency"] = round(float(F.cosine_similarity(real.float(), tokens, dim=-1).mean()), 4)
    reg.log(out, **record)
    tqdm.write(f"step {step}: FD_{args.fd_encoder} of {args.eval_n} EMA samples "
               + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))  # fmt: skip


def compare(args):
    """--compare: sit, repa and reg with the same model, data, seeds and budget, each in <out>/<method>[-seed<s>],
    evaluated at the same steps; <out>/compare.png draws FD over the steps for every run. Ctrl-C stops the comparison."""
    out = args.out or os.path.join("runs", f"cifar-compare-{args.model.replace('/', '-')}")
    logs = {}
    for seed in args.seeds or [args.seed]:
        for method in COMPARE_METHODS:
            name = f"{method}-seed{seed}" if args.seeds else method
            arm = argparse.Namespace(**dict(vars(args), method=method, seed=seed, out=os.path.join(out, name)))
            folder, stopped = train(arm)
            logs[name] = os.path.join(folder, "log.jsonl")
            if stopped:
                return out, True
    png = reg.plot_log(logs, os.path.join(out, "compare.png"), ("fd", "fd_a", "fd_b", "denoise"))
    print(f"comparison: {png}")
    return out, False


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
    a("--method", default="reg", choices=list(reg.METHODS), help="reg (the paper), repa, sit, or a REG Sec. 4 ablation")
    a("--beta", type=reg.nonneg_float, default=0.03, help="token loss weight (REG Sec. 3; paper 0.03)")
    a("--lam", type=reg.nonneg_float, default=0.5, help="alignment loss weight (REG Sec. 3 / REPA; paper 0.5)")
    a("--token-dim", type=reg.nonneg_int, default=0, help="ours: K <= width, the token on its top K directions; 0: all")
    a("--encoder", default="dinov2-b", help="frozen encoder: dinov2-{s,b,l,g} or a timm name; paper dinov2-b")
    a("--encoder-weights", default=None, help="a local weights file (offline), or 'random' (tests); default: the hub")
    a("--cache-features", action="store_true", help="encode the data once (both flips, float16) and train without it")
    a("--cache-dir", default=None, help="where feature caches and FD reference statistics go; default --data-dir")
    a("--steps", type=reg.positive_int, default=40000, help="optimiser steps; default 40k (SiT-B/2: ~1 h, est.)")
    a("--batch-size", type=reg.positive_int, default=128, help="images per optimiser step; default 128")
    a("--micro-batch", type=reg.positive_int, help="images per pass, dividing --batch-size (accumulation); default all")
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
    a("--compare", action="store_true", help="train sit, repa and reg in turn with the same settings and draw "
      f"compare.png; its defaults: {COMPARE_DEFAULTS} (any flag given wins)")  # fmt: skip
    a("--seeds", type=reg.nonneg_int, nargs="+", help="--compare: seeds to run each method with, e.g. 0 1")
    return p


def parse_args(argv=None):
    """The command line, with the checks that involve two flags (argparse's error: usage, message, exit status 2)."""
    p = parser()
    args = p.parse_args(argv)
    if args.compare:  # the comparison's own defaults; flags given on the command line still win
        p.set_defaults(**COMPARE_DEFAULTS)
        args = p.parse_args(argv)
    args.micro_batch = args.micro_batch or args.batch_size
    if args.batch_size % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --batch-size {args.batch_size}")
    if args.eval_every and (args.eval_n < 4 or args.holdout < 1):
        p.error("--eval-every needs --eval-n >= 4 (FD of each half too) and --holdout >= 1 (the loss per t bin)")
    if args.seeds and not args.compare:
        p.error("--seeds is for --compare; a single run takes --seed")
    return args


if __name__ == "__main__":
    main(parse_args())
