import pytest
import torch

from rescomp import checkpoint
from rescomp.errors import CheckpointError
from rescomp.models import build_model

SPEC = {"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 4}


def test_model_round_trips_from_its_spec(tmp_path):
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    checkpoint.save(tmp_path / "m.pt", {"arch": SPEC, "state_dict": model.state_dict()})
    loaded, payload = checkpoint.load_model(tmp_path / "m.pt")
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    assert payload["format"] == "rescomp-checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_a_state_dict_keeps_its_module_versions(tmp_path):
    # Wrong version: save() rebuilding every dict on its way to the CPU without the state_dict's _metadata
    # (load_state_dict reads module versions from it; test_quantize's lenet5 reload fails without it).
    model = build_model(SPEC)
    checkpoint.save(tmp_path / "m.pt", {"arch": SPEC, "state_dict": model.state_dict()})
    saved = checkpoint.load(tmp_path / "m.pt")["state_dict"]
    assert saved._metadata == model.state_dict()._metadata and saved._metadata[""]["version"] == 1


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"arch": SPEC, "state_dict": {}, "epoch": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.save(path, {"arch": SPEC, "state_dict": {}, "epoch": 2, "x": Boom()})
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "truncated or corrupt"),
    (b"garbage" * 100, "truncated or corrupt"),
])
def test_unreadable_checkpoints_are_named(tmp_path, content, message):
    path = tmp_path / "c.pt"
    if content is not None:
        path.write_bytes(content)
    for mmap in (False, True):  # a check that reads only the header says the same
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(path, mmap=mmap)
    assert checkpoint.peek(path) is None


def test_a_header_read_takes_what_load_takes_and_refuses_what_it_refuses(tmp_path):
    """Wrong versions: a checkpoint in torch's legacy (non-zip) format, which torch cannot memory-map,
    refused as corrupt by a check the run would pass; a header read that takes what load refuses (a newer
    format). (That the tensors are mapped, not read, is a cost, not a result: no test here.)"""
    path = tmp_path / "c.pt"
    state = build_model(SPEC).state_dict()
    checkpoint.save(path, {"arch": SPEC, "state_dict": state, "metrics": {"top1": 1.0}})
    head = checkpoint.load(path, mmap=True)
    assert head["arch"] == SPEC and head["metrics"] == {"top1": 1.0}
    assert all(torch.equal(head["state_dict"][k], v) for k, v in state.items())
    legacy = {**checkpoint.load(path), "arch": SPEC}
    torch.save(legacy, path, _use_new_zipfile_serialization=False)
    assert checkpoint.load(path, mmap=True)["arch"] == SPEC == checkpoint.peek(path)["arch"]
    version = {**legacy, "version": checkpoint.VERSION + 1}  # the header read refuses what load refuses
    torch.save(version, path)
    with pytest.raises(CheckpointError, match="newer rescomp"):
        checkpoint.load(path, mmap=True)


def test_truncated_checkpoint_and_foreign_file(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"arch": SPEC, "state_dict": build_model(SPEC).state_dict()})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a rescomp checkpoint"):
        checkpoint.load(path)
    checkpoint.save(path, {"arch": {**SPEC, "width": 8}, "state_dict": build_model(SPEC).state_dict()})
    with pytest.raises(CheckpointError, match="weights do not fit its arch spec"):
        checkpoint.load_model(path)
