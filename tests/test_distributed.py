"""Several processes (torchrun + DDP, Gloo on the CPU): rescomp.distributed, the sharded loader, the
Trainer under DDP, collective writes, `--nproc`, and resume across a kill and a change of process count.

Wrong versions these tests must catch:
- a rank augments its slice with draws of its own, so the union of the shards is not the one-process
  batch (test_shards_are_the_one_process_batch);
- shards that drop or repeat images of a batch that does not divide evenly (same test, 10 into 3);
- SyncBatchNorm2d's gradient not summed back across ranks (the all-reduce's backward an identity), or
  its variance the mean of the ranks' variances, or running_var without the unbiased n / (n - 1)
  (test_sync_batchnorm_is_the_global_batchs);
- a rank's loss not weighted by its share of an uneven global batch (test_weighted_loss...);
- non-main ranks writing, or a rank going on before rank 0's file exists (test_only_rank_0_writes...);
- a 2-process run that is not the 1-process run: no DDP, evaluation not summed over ranks
  (test_two_processes_train_and_prune_as_one); filter scores not summed over ranks, or every rank
  scoring every batch (test_sharded_scores_are_the_one_process_scores);
- a killed 2-process run that does not resume, or resumes differently on 1 process (test_resume_after_kill...);
- ranks that train on, orphaned, after their launcher was killed (test_ranks_stop_when_their_launcher_is_killed);
- a bad --nproc, a batch that does not split, a non-training command under torchrun: one line, exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from conftest import write_config
from rescomp import distributed, runlock
from rescomp.cli import app
from rescomp.config import AugmentConfig, validate
from rescomp.data import BatchLoader

TOL = 2e-5  # float32 sums in another order across ranks, over a few SGD steps


# -- one process ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,batch", [(2, 16), (3, 10)])
def test_shards_are_the_one_process_batch(world: int, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (47, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(47)
    aug = AugmentConfig(crop_padding=2, flip=True, rotate_degrees=10)
    common = dict(mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"), train=True, augment=aug, image_size=8, seed=3)
    one = BatchLoader(x, y, batch, **common)
    shards = [BatchLoader(x, y, batch, rank=r, world=world, **common) for r in range(world)]
    for loader in (one, *shards):
        loader.set_epoch(2)
    parts = list(zip(*shards))
    assert len(parts) == len(one) == 47 // batch
    for i, ((xb, yb), ranks) in enumerate(zip(one, parts)):
        sizes = [len(ry) for _, ry in ranks]
        assert sum(sizes) == len(yb) == one.batch_total(i) and max(sizes) - min(sizes) <= 1
        assert torch.equal(torch.cat([ry for _, ry in ranks]), yb)
        assert torch.equal(torch.cat([rx for rx, _ in ranks]), xb)  # the same crops, flips and rotations


def test_one_process_helpers_do_nothing_but_the_work(tmp_path: Path) -> None:
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    assert distributed.on_main(lambda: 7) == 7 and distributed.broadcast("x") == "x"
    loss = torch.tensor(2.0)
    assert distributed.weighted(loss, 5, 5) is loss  # one process holds the whole batch
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(4))
    assert distributed.sync_batchnorm(bn, torch.device("cpu")) is bn and type(bn[0]) is torch.nn.BatchNorm2d


def test_sync_bn_is_left_out_of_the_hash_at_its_default(tiny: dict) -> None:
    """Runs made before train.sync_bn existed keep their hash; setting it makes another run."""
    plain = validate(tiny, "t")
    assert "sync_bn" not in plain.identity()["train"]
    tiny["train"]["sync_bn"] = True
    assert validate(tiny, "t").hash() != plain.hash()


# -- spawned process groups (Gloo) ---------------------------------------------------------------------

def _group(rank: int, world: int, store: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _sync_bn_worker(rank: int, world: int, store: str, out: str) -> None:
    _group(rank, world, store)
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(7, 3, 4, 4, generator=g) * 3 + 1  # 7 images: 3 on rank 0, 4 on rank 1
        w = torch.randn(7, 3, 4, 4, generator=g)  # a loss that weighs every output differently
        lo, hi = (0, 3) if rank == 0 else (3, 7)
        bn = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
            bn.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
        model = distributed.sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))
        xs = x[lo:hi].clone().requires_grad_(True)
        y = model(xs)
        (y * w[lo:hi]).sum().backward()  # the sum over ranks of these is the one-process loss
        grads = [p.grad.clone() for p in model.parameters()]
        for p in grads:
            torch.distributed.all_reduce(p)  # parameter gradients add up over ranks (DDP would average)
        torch.save({"y": y.detach(), "dx": xs.grad, "dw": grads[0], "db": grads[1],
                    "mean": model[0].running_mean, "var": model[0].running_var,
                    "plain": type(distributed.plain_batchnorm(model)[0]) is torch.nn.BatchNorm2d}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_sync_batchnorm_is_the_global_batchs(tmp_path: Path) -> None:
    mp.spawn(_sync_bn_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "r")), nprocs=2)
    r0, r1 = torch.load(tmp_path / "r.0"), torch.load(tmp_path / "r.1")
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 3, 4, 4, generator=g) * 3 + 1).requires_grad_(True)
    w = torch.randn(7, 3, 4, 4, generator=g)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    y = bn(x)
    (y * w).sum().backward()
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r0["dx"], r1["dx"]]), x.grad, atol=1e-5, rtol=1e-5)
    for r in (r0, r1):
        torch.testing.assert_close(r["dw"], bn.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["db"], bn.bias.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["mean"], bn.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["var"], bn.running_var, atol=1e-6, rtol=1e-6)
        assert r["plain"]


def _tiny_net_and_batches() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    from rescomp.models import build_model

    torch.manual_seed(3)
    model = build_model({"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10})
    g = torch.Generator().manual_seed(4)
    return model, [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(5)]


def _scores_worker(rank: int, world: int, store: str, out: str) -> None:
    from rescomp.compress.prune import CRITERIA

    _group(rank, world, store)
    try:
        model, batches = _tiny_net_and_batches()
        calls = [0]
        model.register_forward_pre_hook(lambda m, i: calls.__setitem__(0, calls[0] + 1))
        torch.save({**{name: CRITERIA.get(name)(model, batches, 0) for name in ("taylor", "mean_activation")},
                    "batches": calls[0]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_scores_are_the_one_process_scores(tmp_path: Path) -> None:
    """Each rank scores its share of the batches (3 and 2 of 5); the sums are added, so both ranks hold
    the one-process scores and rank filters alike."""
    from rescomp.compress.prune import CRITERIA

    mp.spawn(_scores_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "s")), nprocs=2)
    assert [torch.load(tmp_path / f"s.{r}")["batches"] for r in (0, 1)] == [2 * 3, 2 * 2]  # two criteria each
    model, batches = _tiny_net_and_batches()
    for name in ("taylor", "mean_activation"):
        one = CRITERIA.get(name)(model, batches, 0)
        for r in (0, 1):
            got = torch.load(tmp_path / f"s.{r}")[name]
            assert got.keys() == one.keys()
            for k in one:
                torch.testing.assert_close(got[k], one[k], atol=1e-6, rtol=1e-5, msg=f"{name} {k} rank {r}")


def _writes_worker(rank: int, world: int, store: str, folder: str) -> None:
    from rescomp import checkpoint

    _group(rank, world, store)
    try:
        path = Path(folder) / "row.json"

        def write(f):
            (Path(folder) / f"wrote-by-{rank}").touch()
            time.sleep(0.5)  # a rank that did not wait would find no file below
            f.write(b'{"ok": 1}')

        checkpoint.atomic_write_bytes(path, write)
        seen = path.read_text()  # every rank, as soon as the write returns
        # inside on_main rank 0 is alone: its collectives and writes must not wait for the others
        got = distributed.on_main(lambda: (checkpoint.atomic_write_text(Path(folder) / "solo.txt", "s"),
                                           float(distributed.all_reduce_sum(torch.ones(1))))[1])
        (Path(folder) / f"seen-{rank}").write_text(f"{seen}|{got}|{distributed.weighted(torch.tensor(1.0), 3, 10).item()}")
    finally:
        torch.distributed.destroy_process_group()


def test_only_rank_0_writes_and_every_rank_waits_for_it(tmp_path: Path) -> None:
    mp.spawn(_writes_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    assert (tmp_path / "wrote-by-0").is_file() and not (tmp_path / "wrote-by-1").exists()
    assert (tmp_path / "solo.txt").read_text() == "s"
    for r in (0, 1):
        seen, got, w = (tmp_path / f"seen-{r}").read_text().split("|")
        assert seen == '{"ok": 1}' and float(got) == 1.0
        assert float(w) == pytest.approx(0.6)  # 3 of 10 images on one of 2 ranks: 3 x 2 / 10
    assert not list(tmp_path.glob(".row.json.*"))  # no temp file left behind


# -- the command line ----------------------------------------------------------------------------------

def test_bad_nproc_is_one_clear_line(workdir: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(workdir, tiny)
    runner = CliRunner()
    for n in ("0", "-2"):
        res = runner.invoke(app, ["train", str(path), "--nproc", n])
        assert res.exit_code == 2 and "--nproc" in res.output and "at least 1" in res.output, res.output
    res = runner.invoke(app, ["train", str(path), "--nproc", "two"])
    assert res.exit_code == 2 and "'--nproc'" in res.output and "integer" in res.output
    res = runner.invoke(app, ["train", str(path), "--nproc", "3"])  # batch 16 does not split into 3
    assert res.exit_code == 2 and "split evenly across 3" in res.output, res.output
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # taskset -c 0,1 on a 64-core host
    res = runner.invoke(app, ["train", str(path), "--nproc", "4"])
    assert res.exit_code == 2 and "--nproc 2 or fewer" in res.output, res.output
    tiny["model"]["arch"] = "no_such_net"
    res = runner.invoke(app, ["train", str(write_config(workdir, tiny, "bad.yaml")), "--nproc", "2"])
    assert res.exit_code == 2 and "no_such_net" in res.output  # checked before any process starts
    assert not (workdir / "runs").exists()


def test_torchrun_refuses_commands_that_do_not_train(workdir: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(workdir, tiny)
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(app, ["report", "runs"])
    assert res.exit_code == 2 and "runs in one process" in res.output
    res = CliRunner().invoke(app, ["train", str(path), "--nproc", "2"])
    assert res.exit_code == 2 and "drop --nproc" in res.output


# -- several processes end to end ----------------------------------------------------------------------

def _rescomp(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "RESCOMP_CACHE": str(cwd / "cache"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "rescomp", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _started_from(cwd: Path) -> list[int]:
    """Every live process that _rescomp(cwd=cwd) started, and everything they started (torchrun's agent,
    its ranks, their workers): they all carry its RESCOMP_CACHE. Read from each process's environment,
    which does not depend on who is whose parent (torchrun starts the ranks in sessions of their own)."""
    mark, out = f"RESCOMP_CACHE={cwd / 'cache'}".encode(), []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in env.read_bytes().split(b"\0"):
                out.append(int(env.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return out


def _wait_for_epochs(proc: subprocess.Popen, history: Path, epochs: int, timeout: float = 180) -> None:
    """Until the run's metrics history has `epochs` lines, failing with its output if it ends first."""
    deadline = time.monotonic() + timeout
    while not (history.is_file() and len(history.read_text().splitlines()) >= epochs):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)


def _sigkill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)


def _wait_dead(pids: list[int], timeout: float = 60) -> None:
    """Until every pid has exited: gone, or a zombie with no live thread left. A process's files, and so
    its flock, are closed when its last thread exits; the main thread can turn zombie before the
    others (seen here: a rank's leader a zombie, its lock still held). SIGKILL is asynchronous, and a
    rank orphaned by its killed agent is reaped by init, not by us: on a loaded 2-core machine it can
    still hold the run's lock when the next command starts (CI saw this)."""
    def alive(pid: int) -> str | None:
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):  # that thread is gone
                continue
            if state not in ("Z", "X"):
                return state
        return None

    deadline = time.monotonic() + timeout
    for pid in pids:
        while (state := alive(pid)) is not None:
            assert time.monotonic() < deadline, f"pid {pid} still alive ({state}) after {timeout} s"
            time.sleep(0.01)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path, tol: float = TOL) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), atol=tol, rtol=tol, msg=lambda m, k=k: f"{k}: {m}")


def _ddp_config(tiny: dict) -> dict:
    tiny["train"]["sync_bn"] = True  # per-rank batch statistics differ from the global batch's
    tiny["data"]["augment"] = {"crop_padding": 2, "flip": True}
    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    tiny["prune"] = {"steps": 1, "share_per_step": 0.25, "finetune_epochs": 1, "score_batches": 3}
    tiny["pipeline"] = ["train", "prune"]
    return tiny


def _chain_config(tiny: dict) -> dict:
    """train -> layer_drop (one unit) -> prune on a gated ResNet-14: deletion and pruning decisions under DDP."""
    tiny = _ddp_config(tiny)
    tiny["model"] = {"arch": "cifar_resnet", "depth": 14, "width": 4, "gates": {"init": [-1.0, 1.0]}}
    tiny["layer_drop"] = {"k": 1, "retrain_epochs": 1, "max_units": 1, "score_images": 32,
                          "timing": {"batch_size": 4, "runs": 2, "warmup": 1},
                          "baselines": {"scratch": False, "distill": False}}
    tiny["pipeline"] = ["train", "layer_drop", "prune"]
    return tiny


def test_two_processes_train_and_prune_as_one(workdir: Path, tiny: dict) -> None:
    path = write_config(workdir, _chain_config(tiny))
    res = CliRunner().invoke(app, ["run", str(path), "--set", "name=one"])
    assert res.exit_code == 0, res.output
    proc = _rescomp("run", str(path), "--set", "name=two", "--nproc", "2", cwd=workdir)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert output.count("1. train") == 1  # rank 0 speaks for both
    one, two = workdir / "runs/one", workdir / "runs/two"
    # the one-process run's own thread count moves its sums too: within 2e-5 with 2 threads, 4.1e-5 with 1 (measured)
    _assert_same_weights(one / "model.pt", two / "model.pt", tol=1e-4)
    assert torch.load(two / "model.pt", weights_only=True)["metrics"]["test_n"] == tiny["data"]["synthetic"]["test_size"]
    drop = "-layerdrop-gate-k1-n1"
    d1, d2 = (json.loads(Path(f"{r}{drop}/summary.json").read_text())["rows"] for r in (one, two))
    assert [r.get("deleted") for r in d1] == [r.get("deleted") for r in d2] and d1[-1]["layers"] == d2[-1]["layers"] < 14
    prune = drop + "-prune-paper-taylor-custom"
    # 8 more SGD steps at lr 0.05 after training grow the rounding differences to about 1e-4 (measured)
    _assert_same_weights(Path(f"{one}{prune}/step01/model.pt"), Path(f"{two}{prune}/step01/model.pt"), tol=1e-3)
    r1 = json.loads(Path(f"{one}{prune}/summary.json").read_text())["rows"][-1]
    r2 = json.loads(Path(f"{two}{prune}/summary.json").read_text())["rows"][-1]
    assert r1["per_layer"] == r2["per_layer"] and r1["params"] == r2["params"]  # the same filters removed
    # weights within 1e-3 may still move a test image across a decision boundary (torch 2.11 does: 12.5 %
    # against 9.375 % on these 32 images); more than one image would be another network
    assert r1["top1"] == pytest.approx(r2["top1"], abs=100 / tiny["data"]["synthetic"]["test_size"] + 1e-9)
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-3)  # over every test image, not one rank's half
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(one) == files(two)  # nothing written twice or by another rank (a temp file, a second log)
    hist = (two / "metrics.jsonl").read_text().splitlines()
    assert len(hist) == tiny["train"]["epochs"]
    assert json.loads(hist[-1])["train_loss"] == pytest.approx(
        json.loads((one / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"], rel=1e-5)


def test_resume_after_kill_on_another_number_of_processes(workdir: Path, tiny: dict) -> None:
    """Kill torchrun and both ranks mid-run; one process resumes at the last checkpoint and trains on as the
    two would have. Training is chaotic (1 vs 2 threads alone move a tiny net's weights by percents over a
    hundred steps), so the two are compared where they meet: the epochs before the kill are the two-process
    run's own, and the first epoch after it matches the uninterrupted two-process run's to float noise
    (learning rate exactly): the weights, momentum, schedule and batches all picked up where they stopped."""
    tiny = _ddp_config(tiny)
    tiny["data"]["synthetic"]["train_size"] = 256
    tiny["train"].update(epochs=12, batch_size=32, eval_test_every=0)
    path = write_config(workdir, tiny)
    whole = _rescomp("train", str(path), "--set", "name=whole", "--nproc", "2", cwd=workdir)
    assert whole.wait(timeout=240) == 0, whole.communicate()[0]
    proc = _rescomp("train", str(path), "--set", "name=killed", "--nproc", "2", cwd=workdir)
    ckpt, history = workdir / "runs/killed/checkpoints/last.pt", workdir / "runs/killed/metrics.jsonl"
    _wait_for_epochs(proc, history, 3)  # last.pt then holds >= 2
    victims = _started_from(workdir)  # torchrun's agent and both ranks, mid-run
    assert proc.pid in victims and len(victims) >= 3, victims
    _sigkill(victims)
    proc.wait()
    _wait_dead(victims)
    assert not (workdir / "runs/killed/summary.json").exists()
    stopped = torch.load(ckpt, weights_only=True)["fit_state"]["epoch"]
    assert 2 <= stopped < 12
    res = CliRunner().invoke(app, ["train", str(path), "--set", "name=killed"])  # resumed by one process
    assert res.exit_code == 0, res.output
    assert f"after epoch {stopped}" in res.output
    read = lambda name: [json.loads(line) for line in (workdir / f"runs/{name}/metrics.jsonl").read_text().splitlines()]  # noqa: E731
    one, two = read("killed"), read("whole")
    assert len(one) == len(two) == 12
    assert one[:stopped] == [{**r, **{k: one[i][k] for k in ("images_per_s", "epoch_seconds")}}
                             for i, r in enumerate(two[:stopped])]  # the same two-process epochs
    after, ref = one[stopped], two[stopped]
    assert after["lr"] == ref["lr"]
    assert after["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
    assert after["train_top1"] == pytest.approx(ref["train_top1"], abs=100 / 256 + 1e-9)  # an image at most


def test_ranks_stop_when_their_launcher_is_killed(workdir: Path, tiny: dict) -> None:
    """kill -9 of `rescomp train --nproc 2` (torchrun's agent runs in that process) ends its ranks too.
    Otherwise the orphaned ranks train on together, unseen, and hold the run folder: the user's resume is
    refused until they finish."""
    tiny = _ddp_config(tiny)
    tiny["data"]["synthetic"]["train_size"] = 256
    tiny["train"].update(epochs=500, batch_size=32, eval_test_every=0)  # minutes, if the ranks went on
    path = write_config(workdir, tiny)
    proc = _rescomp("train", str(path), "--set", "name=orphaned", "--nproc", "2", cwd=workdir)
    _wait_for_epochs(proc, workdir / "runs/orphaned/metrics.jsonl", 1)
    ranks = [p for p in _started_from(workdir) if p != proc.pid]
    assert len(ranks) >= 2, ranks
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only
        proc.wait()
        _wait_dead(ranks, timeout=30)
    finally:
        _sigkill(_started_from(workdir))  # whatever survived
    assert not (workdir / "runs/orphaned/summary.json").exists()
    assert runlock.holder(workdir / "runs/orphaned") is None  # a resume may start at once
