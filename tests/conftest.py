"""Shared pytest setup. `pytest --device cuda` runs the device-dependent tests (training steps, resume, sampling) on
that device; the default is the CPU. The tests use tiny models, for which a second CPU thread only adds
synchronisation (up to 20-70x slower on a busy 2-core machine)."""

import collections
import copy
import functools
import os
import subprocess
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).parent.parent
# functions that read a tensor only where it lives on the CPU, by design (reg.check_batch's label range)
CPU_ONLY_READS = ("check_batch",)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device of the device-dependent tests: cpu (default) or cuda")


def pytest_configure(config):
    # the tiny test models are narrower than their encoders on purpose; reg.SiT's warning about it is expected there
    config.addinivalue_line("filterwarnings", "ignore:REG token .* wide, model:UserWarning")
    os.environ["REG_TEST_DEVICE"] = config.getoption("--device")  # read by the test modules as DEVICE
    if config.getoption("--device").startswith("cuda"):  # the tests compare runs bit for bit (resume, DDP)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts; DDP workers inherit it
        torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextmanager
def lock_held_elsewhere(folder):
    """Another process holding the run folder's lock (reg.lock_folder) for the duration; killed (as kill -9) after."""
    code = f"import reg, time; held = reg.lock_folder({str(folder)!r}); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def reads_the_host(func, args):
    """Whether an aten op reads a tensor's value to the host: what must wait for the device on a GPU. .item(), int(),
    float() and bool() of a tensor call _local_scalar_dense; torch.equal answers a bool; nonzero, unique and a boolean
    mask make a shape from the values (an index of integers does not)."""
    if torch.Tag.data_dependent_output in func.tags:
        return True
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:
        return any(index is not None and index.dtype == torch.bool for index in args[1])
    return True


def count_read(reads):
    """Count one read where the project's innermost frame (not the tests') made it, 'file:line function'; reads by
    design of CPU tensors only (CPU_ONLY_READS) are not counted."""
    where = "outside the project"
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.parent == ROOT and path.suffix == ".py":
            where = f"{path.name}:{frame.lineno} {frame.name}"
            break
    if where.split()[-1] not in CPU_ONLY_READS:
        reads[where] += 1


class HostReads(TorchDispatchMode):
    """Counts the aten ops that read tensor values to the host (reads_the_host)."""

    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if reads_the_host(func, args):
            count_read(self.reads)
        return func(*args, **(kwargs or {}))


class ListReads(TorchFunctionMode):
    """.tolist() and .numpy() read a CPU tensor without an aten op; on a GPU they copy it to the host and wait."""

    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            count_read(self.reads)
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_reads():
    """The reads of tensor values to the host made in this thread during the block, as a Counter {'file:line
    function': n}: on a GPU each is a wait for the device, so a CPU test can show that a loop never waits. Reads in
    other threads (a data loader's) and reads by design of CPU tensors only (CPU_ONLY_READS) are not counted.
        with count_host_reads() as reads:
            ...
        assert not reads, reads"""
    reads = collections.Counter()
    with HostReads(reads), ListReads(reads):
        yield reads


def keep_after_step(optimizer_step, seen, snapshots, *args, **kwargs):
    """reg.optimizer_step that keeps a copy of `seen` (the reads or waits so far) after each step."""
    out = optimizer_step(*args, **kwargs)
    snapshots.append(copy.copy(seen))
    return out


def snapshots_after_each_step(monkeypatch, seen):
    """Patch reg.optimizer_step to copy `seen` after each training step; -> the list the copies go to."""
    import reg

    snapshots = []
    monkeypatch.setattr(reg, "optimizer_step", functools.partial(keep_after_step, reg.optimizer_step, seen, snapshots))
    return snapshots


def cuda_waits_in_step_2(monkeypatch, run):
    """The waits for the GPU that CUDA's sync debug mode reports in training step 2 of `run()` (a 3-step run that logs
    only at step 3): between the end of step 1 and the end of step 2."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            snapshots = snapshots_after_each_step(monkeypatch, caught)
            run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    waits = [f"{w.filename}:{w.lineno} {w.message}" for w in snapshots[1][len(snapshots[0]) :]]
    return [w for w in waits if "synchroniz" in w]


def label_width(*names):
    """The left margin of reg.save_grid: the widest name in its 12 px font, and 8 px."""
    from PIL import ImageFont

    return 8 + round(max(ImageFont.load_default(size=12).getlength(name) for name in names))
