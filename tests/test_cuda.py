"""The CUDA path (issue 10): skipped on machines without a GPU, run by scripts/gpu_check.sh on one.

Every other test pins `device: cpu`, so these are the only ones that execute the device-resident loader,
bf16 autocast, channels_last, cuDNN autotuning, torch.compile and the GPU throughput measure.

Wrong versions these tests must catch (none of them can be seen on a CPU):
 1. augmentation draws made with a generator on the GPU, or moved there in another order, so a GPU
    epoch is not the CPU epoch and resuming on another machine changes the run
      -> test_a_gpu_epoch_is_the_cpu_epoch
 2. evaluation on the GPU under the training autocast (bf16 logits), or over other images or counts
    than the CPU's: its loss and top-1 differ from the CPU's -> test_gpu_evaluation_is_the_cpu_evaluation
 3. bf16 training that does not learn (a GradScaler on bf16, the loss scaled and never unscaled)
      -> test_bf16_channels_last_training_learns
 4. a checkpoint that holds CUDA tensors or torch.compile's `_orig_mod.` keys, so that a machine
    without a GPU cannot load it; a stage that mixes CPU and GPU tensors (weight sharing's centroids
    were made on the CPU); a summary that does not say it ran in bf16
      -> test_a_gpu_run_goes_through_every_stage_and_says_how_it_was_made
 5. a GPU state_dict saved without its module versions (_metadata), which some modules need to load
      -> test_a_gpu_state_dict_is_saved_on_the_cpu_with_its_module_versions
 6. CUDA random states of a bigger machine restored on this one (IndexError on resume)
      -> test_a_run_saved_with_more_gpus_resumes_on_fewer
 7. a GPU throughput figure that counts its warm-up or stops the clock before the GPU has finished
      -> test_gpu_throughput_agrees_with_cuda_events
TF32 in evaluation is caught on the CPU too (test_train.py::test_exact_fp32_turns_tf32_off_and_back).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_config
from rescomp.cli import app
from rescomp.config import AugmentConfig
from rescomp.context import RunContext, exact_fp32, tf32
from rescomp.data import BatchLoader
from rescomp.measure import count_macs, cudnn_autotuned, gpu_images_per_s
from rescomp.models import build_model
from rescomp.train import evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CPU, GPU = torch.device("cpu"), torch.device("cuda")
runner = CliRunner()


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def no_tf32():
    """fp32 really fp32 on the GPU while a test compares it with the CPU (make_context turns TF32 on)."""
    with exact_fp32():
        yield


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def loader(x, y, device, **kw) -> BatchLoader:
    return BatchLoader(x, y, 64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=device, seed=3, **kw)


@pytest.mark.parametrize("rotate", [0.0, 15.0])
def test_a_gpu_epoch_is_the_cpu_epoch(rotate, no_tf32):
    x, y = images(300)
    aug = AugmentConfig(crop_padding=4, flip=True, rotate_degrees=rotate)
    cpu, gpu = (loader(x, y, d, train=True, augment=aug) for d in (CPU, GPU))
    for epoch in (0, 5):
        cpu.set_epoch(epoch), gpu.set_epoch(epoch)
        pairs = list(zip(cpu, gpu, strict=True))
        assert len(pairs) == 4  # 300 // 64, the last part batch dropped
        for (xc, yc), (xg, yg) in pairs:
            assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
            if rotate:  # bilinear sampling: the same grid, rounded by another kernel; wrong draws move pixels by O(1)
                torch.testing.assert_close(xg.cpu(), xc, atol=1e-4, rtol=0)
            else:  # crops and flips are gathers, /255 a true division on both (BatchLoader.scale): bit for bit
                assert torch.equal(xg.cpu(), xc)


def test_gpu_evaluation_is_the_cpu_evaluation():
    torch.manual_seed(0)
    model = build_model({"arch": "cifar_resnet", "depth": 8, "width": 8, "num_classes": 10})
    x, y = images(1000, seed=1)
    with torch.no_grad():  # BN running statistics of this data (a new network's are 0 and 1)
        model.train()(((x[:500].float() / 255) - 0.5) / 0.25)
    cpu = evaluate(model, loader(x, y, CPU), RunContext(CPU))
    with tf32(True):  # as make_context leaves it; a bf16 channels_last run's evaluation, as a GPU training run calls it
        gpu = evaluate(copy.deepcopy(model).to(GPU).to(memory_format=torch.channels_last), loader(x, y, GPU),
                       RunContext(GPU, precision="bf16"))
    assert gpu["n"] == cpu["n"] == 1000
    # Measured on the CPU for this kind of network: bf16 logits move the loss 1.7e-4 (relative), NHWC
    # against NCHW in fp32 1e-7. cuDNN's fp32 algorithms (Winograd, FFT, chosen by autotuning) round
    # differently from oneDNN's: 5e-5 leaves them room and still tells bf16. Near-ties may flip a few images.
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=5e-5)
    assert abs(gpu["top1"] - cpu["top1"]) <= 0.5


def _quick(tiny: dict, **train) -> dict:
    tiny["device"] = "cuda"
    tiny["data"]["synthetic"] = {"train_size": 2048, "test_size": 512, "num_classes": 10}
    tiny["model"]["width"] = 8
    tiny["train"].update({"epochs": 6, "batch_size": 128, "eval_batch_size": 256,
                          "optimizer": {"name": "sgd", "lr": 0.1}, **train})
    tiny["measure"] = {"batch_sizes": [1], "repeats": 2, "warmup": 1, "max_spread": None}
    return tiny


def test_bf16_channels_last_training_learns(workdir, tiny):
    path = write_config(workdir, _quick(tiny))
    res = cli("train", path)
    assert res.exit_code == 0, res.output
    s = json.loads((workdir / "runs/exp/summary.json").read_text())
    assert s["precision"] == "bf16" and s["device"].startswith("cuda:")
    assert s["top1"] > 90.0  # colour prototypes: chance is 10 %; fp32 on the CPU reaches 100 % in these 6 epochs


# compiled: train, prune and quantize only (each stage's Trainer compiles its network afresh, tens of
# seconds each); eager: every stage command
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_gpu_run_goes_through_every_stage_and_says_how_it_was_made(workdir, tiny, compile):
    cfg = _quick(tiny, compile=compile)
    cfg["model"] = {"arch": "cifar_resnet", "depth": 14, "width": 8, "gates": {"init": [-1, 1]}}
    cfg["prune"] = {"share_per_step": 0.1, "steps": 1, "finetune_epochs": 1, "score_batches": 2}
    cfg["layer_drop"] = {"k": 1, "retrain_epochs": 1, "max_units": 1, "score_images": 256,
                         "timing": {"batch_size": 8, "runs": 2, "warmup": 1},
                         "baselines": {"scratch": False, "distill": False}}
    cfg["magnitude_prune"] = {"share_per_step": 0.5, "steps": 1, "finetune_epochs": 1}
    cfg["weight_share"] = {"conv_bits": 4, "fc_bits": 3, "finetune_epochs": 1, "iterations": 10}
    cfg["binarize"] = {"finetune_epochs": 1}
    cfg["quantize"] = {"calibration_images": 256}
    path = write_config(workdir, cfg)
    commands = (("train", "prune", "quantize") if compile else
                ("train", "prune", "layer-drop", "magnitude-prune", "weight-share", "binarize", "quantize"))
    for command in commands:
        res = cli(command, path)
        assert res.exit_code == 0, (command, res.output)
    payload = torch.load(workdir / "runs/exp/model.pt", map_location="meta", weights_only=True)
    assert not any("_orig_mod" in k for k in payload["state_dict"])  # torch.compile's wrapper left out
    for pt in (workdir / "runs").rglob("*.pt"):  # a CPU-only machine loads every checkpoint with plain torch.load
        devices = {t.device.type for t in torch.utils._pytree.tree_leaves(torch.load(pt, weights_only=True))
                   if isinstance(t, torch.Tensor)}
        assert devices <= {"cpu"}, (pt, devices)
    summaries = {p.parent.name: json.loads(p.read_text()) for p in (workdir / "runs").glob("*/summary.json")}
    assert len(summaries) == len(commands) and "exp-ptq" in summaries, sorted(summaries)
    for name, s in summaries.items():
        int8 = name.endswith("-ptq")
        assert s["device"].startswith("cpu:" if int8 else "cuda:"), (name, s["device"])
        assert s["precision"] == ("fp32" if int8 else "bf16"), name
        assert int8 or s["hardware"]["gpu"] == torch.cuda.get_device_name()
    assert summaries["exp"]["gpu_images_per_s_b256"] > 0
    res = cli("report", "smoke")
    assert res.exit_code == 0, res.output
    assert "| exp |" in (workdir / "results/smoke/table.md").read_text()


def test_a_gpu_state_dict_is_saved_on_the_cpu_with_its_module_versions(tmp_path):
    from rescomp import checkpoint

    model = build_model({"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10}).to(GPU)
    checkpoint.save(tmp_path / "m.pt", {"state_dict": model.state_dict(), "extra": [torch.ones(2, device=GPU)]})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert {t.device.type for t in payload["state_dict"].values()} == {"cpu"} and payload["extra"][0].device == CPU
    assert payload["state_dict"]._metadata == model.state_dict()._metadata


def test_a_run_saved_with_more_gpus_resumes_on_fewer():
    from rescomp import checkpoint

    state = checkpoint.rng_state()
    state["cuda"] = list(state["cuda"]) * (torch.cuda.device_count() + 3)  # as if saved on a bigger machine
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.cuda.get_rng_state(0), state["cuda"][0])


def _event_timed(model, batch: int, iters: int) -> float:
    """images/s of the same bf16 channels_last loop, timed by CUDA events around the GPU's own work."""
    m = copy.deepcopy(model).to(GPU).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32, device=GPU).contiguous(memory_format=torch.channels_last)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with cudnn_autotuned(), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(10):
            m(x)
        start.record()
        for _ in range(iters):
            m(x)
        end.record()
        end.synchronize()
    return batch * iters / (start.elapsed_time(end) / 1e3)


def test_gpu_throughput_agrees_with_cuda_events():
    # Batch 2048 makes each pass GPU-bound (at 256 ResNet-56 is bound by kernel launches, and a clock
    # stopped before the GPU finishes would read about right); 10 passes are fewer than the GPU queues,
    # so a missing final sync reads several times too fast, and a warm-up counted in reads cuDNN's tuning.
    model = build_model({"arch": "resnet56", "num_classes": 10})
    ips = gpu_images_per_s(model, 32, batch=2048, iters=10)
    ref = _event_timed(model, 2048, 10)
    # No GPU does more than 2,000 dense bf16 TFLOP/s: 2 flops per MAC bounds images/s from above.
    assert 1_000 < ips < 2e15 / (2 * count_macs(model, 32))
    assert 0.75 < ips / ref < 1.33, (ips, ref)
