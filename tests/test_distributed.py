"""Data-parallel training on torch.distributed (gloo, 2 CPU processes on the loopback interface): the fixed-order
score sums the ranks gather, the global batch's shares, and 2-process training against 1-process training."""
import os
import subprocess
import sys

import pytest
import torch

from dcgmm_fast import backends, ops
from dcgmm_fast.distributed import World, threads_per_process
from dcgmm_fast.train import (aten_fixed_order_row_sums, fixed_order_mean, fixed_order_row_sums, image_score_sums,
                              mean_of_image_sums)

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="2", GLOO_SOCKET_IFNAME="lo")


# ------------------------------------------------------------------------------------------------ score sums
@pytest.mark.parametrize("impl", ["cpu-op", "aten"])
@pytest.mark.parametrize("shape", [(100, 26, 26), (37, 1), (3, 70000), (67600,), (8, 256), (5, 257)])
def test_image_sums_do_not_depend_on_the_split_or_the_threads(shape, impl, monkeypatch):
    """Each image's sum is the same bits whether the batch is whole, split in two (as two ranks hold it) or summed
    with 1 or 2 threads; the mean of the gathered sums is the whole batch's, within float64 rounding of the exact
    mean. Both forms: the C++ op (CPU) and the ATen reductions (GPUs, or no extension)."""
    if impl == "aten":
        monkeypatch.setattr(backends, "cpu_op", lambda name: None)
    elif backends.cpu_op("fixed_order_sums_cpp") is None:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[0])
    t = torch.randn(*shape, generator=g) * 50 - 3
    whole = image_score_sums(t)
    cut = max(1, shape[0] // 2)
    halves = torch.cat([image_score_sums(t[:cut]), image_score_sums(t[cut:].clone())]) if shape[0] > 1 else whole
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = image_score_sums(t), fixed_order_mean(t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, halves) and torch.equal(whole, one_thread[0])
    assert torch.equal(fixed_order_mean(t), one_thread[1])
    assert fixed_order_mean(t) == mean_of_image_sums(halves, t.numel()).float()
    exact = t.double().sum(tuple(range(1, t.dim()))) if t.dim() > 1 else t.double()
    torch.testing.assert_close(whole, exact, rtol=1e-13, atol=1e-9)
    torch.testing.assert_close(fixed_order_mean(t).double(), t.double().mean(), rtol=1e-6, atol=1e-6)


def test_fixed_order_row_sums_are_ordinary_sums():
    rows = torch.arange(3 * 1000, dtype=torch.float32).view(3, 1000)
    expected = [float(sum(range(i * 1000, (i + 1) * 1000))) for i in range(3)]
    assert fixed_order_row_sums(rows).tolist() == expected
    assert aten_fixed_order_row_sums(rows).tolist() == expected


@pytest.mark.parametrize("shape", [(100, 676), (3, 70000), (7, 256), (5, 257), (2, 65537), (4, 1), (1, 300000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_fixed_order_sums(shape, dtype, monkeypatch):
    """The C++ row sums (csrc/cpu/row_sums.cpp, the CPU training step's) against float64 (within its rounding) and
    the ATen form (GPUs'); the same bits for 1 and 2 threads, for a row alone or among others, for a strided input
    and for a float64 copy of float32 rows (each entry is widened exactly); every output written (poisoned)."""
    op = backends.cpu_op("fixed_order_sums_cpp")
    if op is None:
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv("DCGMM_POISON", "1")
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    rows = (torch.randn(*shape, generator=g, dtype=torch.float64) * 40 + 3).to(dtype)
    sums = fixed_order_row_sums(rows)
    assert sums.dtype == torch.float64 and sums.shape == shape[:1]
    exact = rows.double().sum(1)
    bound = 1e-15 * rows.double().abs().sum(1) * (2 + shape[1] ** 0.5)  # float64 rounding over blocks of 256
    assert bool(((sums - exact).abs() <= bound).all())
    assert bool(((aten_fixed_order_row_sums(rows) - sums).abs() <= 2 * bound).all())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = fixed_order_row_sums(rows)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, sums)
    assert torch.equal(fixed_order_row_sums(rows[-1:].clone()), sums[-1:])
    wide = torch.cat([rows, rows], 1)[:, shape[1]:]  # strided view of the same values
    assert torch.equal(fixed_order_row_sums(wide), sums)
    if dtype == torch.float32:
        assert torch.equal(fixed_order_row_sums(rows.double()), sums)


def test_cpp_fixed_order_sums_rejects_bad_rows():
    op = backends.cpu_op("fixed_order_sums_cpp")
    if op is None:
        pytest.skip("the C++ extension is not built")
    with pytest.raises(RuntimeError, match="rows: expected \\(R, M\\)"):
        op(torch.zeros(3))
    with pytest.raises(RuntimeError, match="rows: expected float32 or float64"):
        op(torch.zeros(2, 3, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------ shares
def _world(rank, size):
    w = World.__new__(World)  # the share arithmetic without a process group
    w.group, w.rank, w.size, w._buffers = None, rank, size, {}
    return w


def test_global_batch_shares():
    assert [_world(r, 4).share(100) for r in range(4)] == [slice(0, 25), slice(25, 50), slice(50, 75),
                                                           slice(75, 100)]
    with pytest.raises(ValueError, match="batch_size: the global batch of 100 images does not split evenly over 3"):
        _world(0, 3).share(100)
    assert threads_per_process(2, cores=2) == 1 and threads_per_process(3, cores=2) == 1
    assert threads_per_process(2, cores=16) == 8


def test_world_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        World()
    assert World.current() is None


# ------------------------------------------------------------------------------------------------ processes
def _torchrun(*args, cwd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)


def _state(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd-step", "fused-step"])
def test_two_ranks_take_the_same_steps_as_one_process(tmp_path, fused):
    """torchrun, 2 gloo ranks, a shared-mode stack (_ddp_worker.STACK) for 2 epochs of the shipped images (100
    steps; fused: 1 epoch through the fused step ops, the ranks adding step statistics): both ranks end with the
    same parameters and annealing state bit for bit; against one process alone (the same schedule), the parameters
    agree within 1e-5 relative and the annealing took the same steps (som_sigma, eps and the counters equal)."""
    if fused and "cpp" not in ops.available_backends():
        pytest.skip("the fused variant runs the cpp backend's step ops")
    res = _torchrun(os.path.join(HERE, "_ddp_worker.py"), str(tmp_path), *(["fused"] if fused else []),
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    single, r0, r1 = (_state(tmp_path / f"{n}.pt") for n in ("single", "rank0", "rank1"))
    assert single.keys() == r0.keys() == r1.keys()
    som0 = 0.25 * (2 * 25) ** 0.5  # the first layer: K = 25
    assert float(single["layers.0.som_sigma"]) < som0  # annealing events happened within the run
    for key in single:
        assert torch.equal(r0[key], r1[key]), key
        if key.endswith(("anneal_state", "som_sigma", "eps")) or not single[key].is_floating_point():
            assert torch.equal(single[key], r0[key]), key
        else:
            scale = single[key].double().abs().max().clamp_min(1e-12)
            assert float((single[key].double() - r0[key].double()).abs().max() / scale) <= 1e-5, key


def _cli(*args, cwd):
    res = subprocess.run([sys.executable, "-m", "dcgmm_fast", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert res.returncode == 0, f"dcgmm {' '.join(args)} failed:\n{res.stderr[-3000:]}"
    return res


def test_cli_nproc_trains_the_same_model_and_resumes_in_one_process(tmp_path):
    """`dcgmm train --stack STACK --epochs 2 --seed 0` with and without --nproc 2: parameters within 1e-5 relative,
    the same annealing state; the 2-process checkpoint continues in 1 process (--resume, a longer schedule). The
    stack: _ddp_worker.STACK (shared layers; why not the demo preset: see there)."""
    import json

    from _ddp_worker import STACK
    from dcgmm_fast.checkpoint import model_config
    from dcgmm_fast.model import DCGMM

    config = model_config(DCGMM(STACK))
    stack = {k: config[k] for k in ("input_shape", "n_classes", "layers")}
    (tmp_path / "stack.json").write_text(json.dumps(stack))
    common = ("train", "--stack", "stack.json", "--epochs", "2", "--seed", "0")
    _cli(*common, "--out", "one", cwd=tmp_path)
    _cli(*common, "--out", "two", "--nproc", "2", cwd=tmp_path)
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("one", "two"))
    assert two["train"]["processes"] == 2 and one["train"]["processes"] == 1
    a, b = one["state_dict"], two["state_dict"]
    for key in a:
        if key.endswith(("anneal_state", "som_sigma", "eps", "steps_done")):
            assert torch.equal(a[key], b[key]), key
        elif a[key].is_floating_point():
            scale = a[key].double().abs().max().clamp_min(1e-12)
            assert float((a[key].double() - b[key].double()).abs().max() / scale) <= 1e-5, key
    assert not (tmp_path / "two" / "train_log.jsonl.tmp").exists()
    res = _cli("train", "--resume", "two/checkpoint.pt", "--epochs", "2.2", cwd=tmp_path)
    assert '"steps_done": 110' in res.stdout


def test_cli_nproc_errors(tmp_path):
    """A global batch that does not split is refused before any process starts; a rank's failure names the rank
    and the launcher says a process failed."""
    res = subprocess.run([sys.executable, "-m", "dcgmm_fast", "train", "--nproc", "2", "--batch-size", "101",
                          "--out", "o"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode == 2 and "--batch-size: the global batch of 101 images does not split evenly" in res.stderr
    res = subprocess.run([sys.executable, "-m", "dcgmm_fast", "train", "--nproc", "2", "--data", "nowhere.npz",
                          "--out", "o"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode != 0
    assert "dcgmm train (rank 0 of 2): error: nowhere.npz: no such file" in res.stderr
    assert "dcgmm train: a training process failed" in res.stderr
