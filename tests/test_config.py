import shlex

import pytest

from rescomp.config import load_config, validate
from rescomp.errors import ConfigError
from rescomp.runner import model_spec

from conftest import write_config


def test_defaults_fill_in_and_name_comes_from_file(tmp_path, tiny):
    cfg = load_config(write_config(tmp_path, tiny, "my-run.yaml"))
    assert cfg.name == "my-run"
    assert cfg.train.optimizer.momentum == 0.9
    assert cfg.data.num_classes == 10


def test_overrides_are_parsed_and_validated(tmp_path, tiny):
    path = write_config(tmp_path, tiny)
    cfg = load_config(path, ["train.epochs=5", "train.optimizer.lr=0.2", "data.augment.flip=false", "name=x"])
    assert (cfg.train.epochs, cfg.train.optimizer.lr, cfg.data.augment.flip, cfg.name) == (5, 0.2, False, "x")
    with pytest.raises(ConfigError, match=r"train.epochs: .*integer.*'five'"):
        load_config(path, ["train.epochs=five"])


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", r"unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"),
    ("trian.epochs=3", r"unknown key 'trian' \(did you mean 'train'\?\)"),
    ("train.optimizer.momentun=0.5", r"did you mean 'train.optimizer.momentum'"),
    ("data.val_fraction=1.5", r"data.val_fraction: .*less than 1"),
    ("data.dataset=imagenet", r"data.dataset: .*'cifar10', 'cifar100' or 'synthetic'"),
    ("device=tpu", r"device: must be auto, cpu, cuda or cuda:N"),
    ("train.early_stopping.patience=3", r"needs data.val_fraction > 0"),
    ("train.epochs", r"expected dotted.key=value"),
    ("image_size=8", r"unknown key 'image_size' \(did you mean 'data.image_size'\?\)"),
    # true/false where a number goes: pydantic would take it as 1 or 0 (1 epoch, 1 training image)
    ("train.epochs=true", r"train.epochs: a number, not true/false \(got True\)"),
    ("train.optimizer.lr=inf", r"train.optimizer.lr: Input should be a finite number"),  # ran until the loss was NaN
    ("name=" + "a" * 121, r"name: the run name 'a{40}\.\.\.' is 121 bytes long; keep it to 120"),  # an OSError later
    ("report.table=" + "t" * 256, r"report.table: must be at most 255 bytes long, as a file name"),
    ("layer_drop.tolerance=.nan", r"layer_drop.tolerance: Input should be a finite number"),
    ("data.train_limit=true", r"data.train_limit: a number, not true/false"),
    ("train.optimizer.lr=false", r"train.optimizer.lr: a number, not true/false"),
    ("lr=0.1", r"unknown key 'lr' \(did you mean one of 'train.optimizer.lr', 'quantize.qat.lr'\?\)"),
    ("=3", r"--set '=3': expected dotted.key=value"),
    ("prune.epochs=3", r"unknown key 'prune.epochs' \(did you mean 'prune.finetune_epochs'\?\)"),  # not train.epochs
    ("quantize.lr=3", r"unknown key 'quantize.lr' \(did you mean one of 'quantize.qat.lr', 'train.optimizer.lr'\?\)"),
    ("train..epochs=3", r"expected dotted.key=value"),
    ("pipeline=[train, {prune: 3}]", r"pipeline: entry 2 \(\{'prune': 3\}\) gives prune 3; a stage's settings are a mapping"),
    ("pipeline=[train, 5]", r"pipeline: entry 2 \(5\) is neither a stage name nor \{stage: settings\}"),
    ("pipeline=[{prune: {}, quantize: {}}]", r"entry 1 names 2 stages \(prune, quantize\)"),
    ("measure.batch_sizes=[-5]", r"measure.batch_sizes: must list one or more batch sizes of at least 1"),
    ("measure.batch_sizes=[1, 0]", r"measure.batch_sizes: must list one or more batch sizes of at least 1"),
    ("measure.batch_sizes=[]", r"measure.batch_sizes: must list one or more batch sizes of at least 1"),
])
def test_bad_values_name_the_key_and_the_fix(tmp_path, tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, tiny), [override])


def test_a_key_given_twice_is_an_error_not_the_last_one(tmp_path):
    """PyYAML keeps the last of two equal keys: `epochs: 200` above a forgotten `epochs: 2` trained 2."""
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 200\n  batch_size: 8\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"line 4, column 3: key 'epochs' is given twice \(lines 2 and 4\); keep one"):
        load_config(path)
    path.write_text("base: &b {epochs: 3, batch_size: 4}\ntrain:\n  <<: *b\n  epochs: 5\nname: x\n")  # a merge
    from rescomp.config_files import read_yaml  # may override what it brings

    assert read_yaml(path)["train"] == {"epochs": 5, "batch_size": 4}
    import yaml

    path.write_text("base: &b {epochs: 5}\ntrain: {<<: &c {<<: *b, epochs: 2}, lr: 0.1}\nother: *c\nname: x\n")
    assert read_yaml(path) == yaml.safe_load(path.read_text())  # nested merges and an alias read as PyYAML reads them
    path.write_text("? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 1, column 3: found unhashable key"):
        read_yaml(path)


def test_model_arguments_are_checked_against_the_builder(tiny):
    tiny["model"] = {"arch": "resnet56", "widht": 8}
    with pytest.raises(ConfigError, match=r"unknown key 'model.widht' for arch 'resnet56' \(did you mean 'width'\?\)"):
        model_spec(validate(tiny, "t"))
    tiny["model"] = {"arch": "resnet57"}
    with pytest.raises(ConfigError, match=r"unknown model 'resnet57' \(did you mean 'resnet56'\?\); valid: .*resnet20"):
        model_spec(validate(tiny, "t"))
    tiny["model"] = {"arch": "alexnet"}
    with pytest.raises(ConfigError, match="at least 63 pixels"):
        model_spec(validate(tiny, "t"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


def test_hash_ignores_where_outputs_go(tiny):
    a, b = validate(tiny, "a"), validate({**tiny, "out_dir": "elsewhere"}, "b")
    assert a.hash() == b.hash()
    assert a.hash() != validate({**tiny, "seed": 1}, "c").hash()


def _shipped():
    from rescomp.config_files import read_with_extends

    root = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.rglob("*.yaml")):
        for profile in [None, *(read_with_extends(path).get("profiles") or {})]:
            yield pytest.param(path, profile, id=f"{path.parent.name}/{path.name}:{profile or '-'}")


@pytest.mark.parametrize("path, profile", list(_shipped()))
def test_every_shipped_config_and_profile_is_valid(path, profile):
    cfg = load_config(path, profile=profile)
    model_spec(cfg)


def test_extends_and_profiles(tmp_path, tiny):
    base = {**tiny, "profiles": {"quick": {"train": {"epochs": 1}, "data": {"train_limit": 8}}}}
    write_config(tmp_path, base, "base.yaml")
    write_config(tmp_path, {"extends": "base.yaml", "train": {"batch_size": 8}, "model": {"width": 2}}, "child.yaml")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.arch, cfg.model.width) == (8, 2, "cifar_resnet", 2)
    quick = load_config(tmp_path / "child.yaml", ["train.epochs=4"], profile="quick")
    assert (quick.name, quick.profile, quick.train.epochs, quick.data.train_limit) == ("child-quick", "quick", 4, 8)
    assert quick.hash() != cfg.hash()
    with pytest.raises(ConfigError, match=r"no profile 'quik' \(did you mean 'quick'\?\); profiles: quick"):
        load_config(tmp_path / "child.yaml", profile="quik")
    write_config(tmp_path, {"extends": "loop.yaml"}, "loop.yaml")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    write_config(tmp_path, {"extends": "nothere.yaml"}, "orphan.yaml")  # named from the file that says it
    with pytest.raises(ConfigError, match=r"orphan.yaml: extends 'nothere.yaml', which is not a file \(looked for "):
        load_config(tmp_path / "orphan.yaml")
    # extends and profiles of another shape: a traceback (TypeError, AttributeError), or, for extends: "",
    # every default run silently (ResNet-20 on CIFAR-10, 200 epochs)
    for bad in (5, [5], "", [""], {"a": 1}):
        write_config(tmp_path, {"extends": bad, **tiny}, "bad.yaml")
        with pytest.raises(ConfigError, match=r"bad.yaml: extends must name a base config file, or a list of them"):
            load_config(tmp_path / "bad.yaml")
    for bad in (5, {"x": 5}, {"x": [1]}):
        write_config(tmp_path, {**tiny, "profiles": bad}, "bad.yaml")
        with pytest.raises(ConfigError, match=r"bad.yaml: profiles must map each profile's name to its settings"):
            load_config(tmp_path / "bad.yaml", profile="x")
    write_config(tmp_path, {**tiny, "extends": None, "profiles": {"x": None}}, "empty.yaml")  # nothing to add
    assert load_config(tmp_path / "empty.yaml", profile="x").profile == "x"


def test_a_key_that_takes_a_bool_or_a_value_still_takes_the_bool(tmp_path, tiny):
    cfg = load_config(write_config(tmp_path, tiny), ["data.download=false", "quantize.reduce_range=true",
                                                      "measure.latency=false", "train.compile=true"])
    assert (cfg.data.download, cfg.quantize.reduce_range, cfg.measure.latency, cfg.train.compile) == (False, True, False, True)


def test_a_config_says_the_command_that_loads_it_again(tmp_path, tiny):
    # Wrong versions it catches: the advice to redo a later stage's training run (rescomp.rundir.train_fresh)
    # leaving out the profile, a --set or the seed of one of a config's `seeds:` (it would redo another run,
    # or every seed's), or a pipeline stage's config forgetting it.
    from rescomp.chain import stage_config, steps
    from rescomp.rundir import run_folder, train_fresh

    write_config(tmp_path, {**tiny, "seeds": [0, 3], "pipeline": ["train", "quantize"],
                            "profiles": {"quick": {"train": {"epochs": 1}}}}, "exp.yaml")
    cfgs = load_config(tmp_path / "exp.yaml", ["train.epochs=4", "name=x y"], profile="quick").per_seed()
    said = [train_fresh(c) for c in cfgs]  # --set name=X names X whatever the seed: the seed-3 run's name is said
    assert said == [f"`rescomp train {tmp_path / 'exp.yaml'} --profile quick --set train.epochs=4 --set 'name={n}' "
                    f"--seed {s} --fresh`" for n, s in (("x y", 0), ("x y-seed3", 3))]
    cfgs += load_config(tmp_path / "exp.yaml", ["seed=3", "train.epochs=4"]).per_seed()  # --seed 3: one run
    said.append(f"`rescomp train {tmp_path / 'exp.yaml'} --seed 3 --set train.epochs=4 --fresh`")
    assert train_fresh(cfgs[-1]) == said[-1] and run_folder(cfgs[-1]).name == "exp-seed3"
    for cfg, command in zip(cfgs, said, strict=True):
        args, overrides, profile = shlex.split(command.strip("`"))[3:-1], [], None
        for flag, value in zip(args[::2], args[1::2]):
            if flag == "--profile":
                profile = value
            else:
                overrides.append(value if flag == "--set" else f"seed={value}")
        again = load_config(tmp_path / "exp.yaml", overrides, profile).per_seed()
        assert [(run_folder(c), c.hash()) for c in again] == [(run_folder(cfg), cfg.hash())]
        assert train_fresh(stage_config(cfg, steps(cfg)[1])) == command
    assert train_fresh(validate(tiny, "x")) == "`rescomp train --fresh`"  # a config from no file: no file to name
