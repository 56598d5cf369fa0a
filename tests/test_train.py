import json

import pytest
import torch

from rescomp import checkpoint
from rescomp.config import ScheduleConfig, OptimizerConfig, validate
from rescomp.errors import TrainingDiverged
from rescomp.models import build_model
from rescomp.stages.train import run_train
from rescomp.train import Trainer, lr_lambda, param_groups


@pytest.mark.parametrize("schedule, points", [
    ({"name": "multistep", "milestones": [2, 3], "gamma": 0.1}, {0: 1, 1.9: 1, 2: 0.1, 3: 0.01}),
    ({"name": "step", "step_size": 2, "gamma": 0.5}, {0: 1, 2: 0.5, 5: 0.25}),
    ({"name": "cosine"}, {0: 1, 2: 0.5, 4: 0}),
    ({"name": "cosine", "warmup_epochs": 1}, {0: 0.1, 0.5: 0.6, 1: 1, 2.5: 0.5}),
    ({"name": "onecycle", "pct_start": 0.25}, {0: 0.04, 1: 1, 4: 4e-6}),
    ({"name": "constant"}, {0: 1, 3.9: 1}),
])
def test_schedules_at_known_points(schedule, points):
    f = lr_lambda(ScheduleConfig(**schedule), epochs=4, steps_per_epoch=10)
    for epoch, factor in points.items():
        assert f(int(epoch * 10)) == pytest.approx(factor, abs=1e-9), (schedule, epoch)


def test_no_decay_on_batchnorm_and_bias():
    m = build_model({"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 4})
    decay, no_decay = param_groups(m, OptimizerConfig(no_decay_bn_bias=True, weight_decay=5e-4))
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    assert sum(p.numel() for p in no_decay["params"]) == 2 * (4 + 4 + 4 + 8 + 8 + 16 + 16) + 10  # BN + fc bias
    assert len(param_groups(m, OptimizerConfig())) == 1


def _final_weights(run_dir):
    return checkpoint.load(run_dir / "model.pt")["state_dict"]


def test_interrupted_run_resumes_to_the_same_result(workdir, tiny, monkeypatch):
    tiny["train"]["epochs"] = 4
    tiny["measure"]["latency"] = False
    straight_dir, straight = run_train(validate({**tiny, "name": "straight"}, "t"))

    real_save = Trainer.save

    def save_then_die(self):
        real_save(self)
        if self.state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", save_then_die)
    cfg = validate({**tiny, "name": "broken"}, "t")
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg)
    assert checkpoint.load(workdir / "runs/broken/checkpoints/last.pt")["fit_state"]["epoch"] == 2
    assert not (workdir / "runs/broken/summary.json").exists()
    monkeypatch.setattr(Trainer, "save", real_save)
    resumed_dir, resumed = run_train(cfg)

    a, b = _final_weights(straight_dir), _final_weights(resumed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["top1"] == straight["top1"] and resumed["loss"] == straight["loss"]
    lines = (resumed_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4]


def test_nan_loss_stops_with_a_clear_message(workdir, tiny):
    tiny["train"]["optimizer"]["lr"] = 1e12
    with pytest.raises(TrainingDiverged, match=r"loss became nan.*Lower train.optimizer.lr"):
        run_train(validate(tiny, "t"))


def test_early_stopping_restores_the_best_weights(workdir, tiny):
    tiny["data"]["val_fraction"] = 0.25
    tiny["train"].update(epochs=30, early_stopping={"patience": 1}, eval_test_every=0)
    tiny["train"]["optimizer"]["lr"] = 0.5  # noisy enough that validation loss soon gets worse
    tiny["measure"]["latency"] = False
    run_dir, summary = run_train(validate(tiny, "t"))
    assert summary["stopped_early"] and summary["epochs"] < 30
    best = checkpoint.load(run_dir / "checkpoints/best.pt")
    final = checkpoint.load(run_dir / "model.pt")
    assert all(torch.equal(best["state_dict"][k], final["state_dict"][k]) for k in best["state_dict"])
    history = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["val_loss"] == pytest.approx(min(h["val_loss"] for h in history), rel=1e-6)


def test_completed_run_is_not_retrained(workdir, tiny):
    tiny["measure"]["latency"] = False
    cfg = validate(tiny, "t")
    _, first = run_train(cfg)
    _, again = run_train(cfg)
    assert again == first


@pytest.mark.slow
def test_learns_real_cifar10(workdir, tiny):
    """A width-8 ResNet-8 trained 300 steps of 64 images on the CIFAR-10 copy beats 30 % top-1."""
    from rescomp.data import resolve_source
    from rescomp.config import DataConfig
    from rescomp.errors import DataError

    try:
        resolve_source(DataConfig(download=False))
    except DataError as e:
        pytest.skip(f"no CIFAR-10 copy on this machine: {e}")
    cfg = {
        "seed": 0, "device": "cpu",
        "data": {"dataset": "cifar10", "test_limit": 2000, "download": False},
        "model": {"arch": "cifar_resnet", "depth": 8, "width": 8},
        "train": {"epochs": 3, "batch_size": 64, "max_steps_per_epoch": 100, "eval_test_every": 0,
                  "optimizer": {"lr": 0.1, "weight_decay": 5e-4}, "schedule": {"name": "onecycle"}},
        "measure": {"latency": False},
    }
    _, summary = run_train(validate(cfg, "learn"))
    assert summary["top1"] > 30.0, summary["top1"]


def test_evaluation_is_fp32_whatever_the_training_precision():
    # Wrong version: evaluation under the run's autocast (or under a caller's), so a bf16 (or fp16 GPU) run
    # reports the top-1 of its bf16 logits, not the fp32 top-1 that quantize and the CPU report.
    from rescomp.context import RunContext
    from rescomp.data import BatchLoader
    from rescomp.train import evaluate

    torch.manual_seed(0)
    model = build_model({"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 8})
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (256, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (256,), generator=g)
    loader = BatchLoader(x, y, 128, mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"))
    fp32, bf16 = (evaluate(model, loader, RunContext(torch.device("cpu"), precision=p)) for p in ("fp32", "bf16"))
    assert bf16 == fp32  # bit for bit, loss included
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert evaluate(model, loader, RunContext(torch.device("cpu"))) == fp32
        with torch.no_grad():  # and bf16 gives another loss, so the equalities above can tell
            bf16_loss = sum(torch.nn.functional.cross_entropy(model.eval()(xb).float(), yb, reduction="sum").item()
                            for xb, yb in loader) / len(y)
    assert bf16_loss != pytest.approx(fp32["loss"], rel=1e-6)


def test_exact_fp32_turns_tf32_off_and_back():
    # Wrong version: exact_fp32 leaving TF32 on (a GPU evaluation with 10-bit mantissas), or not restoring it.
    from rescomp.context import exact_fp32, tf32

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    with tf32(True):  # as make_context leaves it
        assert flags() == (True, True)
        with exact_fp32():
            assert flags() == (False, False)
        assert flags() == (True, True)
    assert flags() == before
