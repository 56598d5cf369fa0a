"""Atomic checkpoints: {format, arch spec, state_dict, config, metrics, training state, rng}.

A checkpoint never holds pickled modules: the network is rebuilt from `arch` (a registry spec) and
filled from `state_dict`, so it loads with `weights_only=True` and survives code refactors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from rescomp.errors import CheckpointError, ConfigError

FORMAT = "rescomp-checkpoint"
VERSION = 1
INT8 = "rescomp-int8"  # the `kind` of an int8 network's checkpoint (int8.pt: rescomp.compress.quantize)


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(fileobj) on a temp file beside `path`, fsync, then rename over `path`. Under several
    processes only rank 0 writes, and every rank returns once the file is there (rescomp.distributed)."""
    from rescomp.distributed import collective_write

    collective_write(lambda: _write_atomically(Path(path), write))


def _write_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # named by what the caller asked for, not by the temporary file
        Path(tmp).unlink(missing_ok=True)
        e.filename, e.filename2 = str(path), None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write a set of files into folder, each atomically, after checking that every one can be: a path that
    is a folder (or anything but a file) fails before the first is written, so the set is not left half
    old, half new by what could be known beforehand."""
    for name in files:
        p = Path(folder) / name
        if p.exists() and not p.is_file() or p.is_symlink() and not p.exists():
            raise ConfigError(f"'{p}' is in the way: it is {'a folder' if p.is_dir() else 'not a file'}, where a "
                              f"file of this table goes; move it away, or write the table elsewhere (--out)")
    for name, blob in files.items():
        atomic_write_bytes(Path(folder) / name, lambda f, b=blob: f.write(b))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint; tensors on a GPU are stored as CPU tensors, so that a plain torch.load on a
    machine without one reads it and no later step depends on where the network was trained."""
    payload = _on_cpu({"format": FORMAT, "version": VERSION, **payload})
    atomic_write_bytes(Path(path), lambda f: torch.save(payload, f))


def _on_cpu(obj: Any) -> Any:
    """obj with every tensor off the CPU copied to it. Containers holding none come back as they are; a
    rebuilt state_dict keeps its `_metadata` (the modules' versions, which load_state_dict reads: a
    quantized Linear without its version loads by an old path and fails)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu() if obj.device.type != "cpu" else obj
    if type(obj) in (dict, OrderedDict):
        items = {k: _on_cpu(v) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        out = type(obj)(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple):
        items = [_on_cpu(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj


def load(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A rescomp checkpoint's payload, or CheckpointError saying why the file is not one. `mmap`: its
    tensors memory-mapped, not read, for a caller that needs only its spec, config, metrics or kind (a
    network may be hundreds of MB); a file that cannot be mapped is read whole."""
    path = Path(path)
    if path.is_dir():
        inside = next((path / f for f in ("model.pt", "int8.pt") if (path / f).is_file()), None)
        raise CheckpointError(f"checkpoint '{path}' is a folder; pass "
                              + (f"{inside}, the network this run folder keeps" if inside else "a model.pt file"))
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; pass a model.pt that rescomp wrote "
                              f"(runs/<name>/model.pt), or make it first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        if mmap:  # torch maps only its zip format: read it whole, or say why not
            return load(path)
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupt, or no PyTorch file ({type(e).__name__}); pass a model.pt "
            f"that rescomp wrote, or, if it is a run's own checkpoint, delete it or re-run with --fresh"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a rescomp checkpoint (no '{FORMAT}' header)")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"'{path}' was written by a newer rescomp (format {payload['version']}); upgrade rescomp")
    return payload


def peek(path: str | Path) -> Optional[dict[str, Any]]:
    """`load(path, mmap=True)`, or None where the file is not a rescomp checkpoint (`load` says why)."""
    try:
        return load(path, mmap=True)
    except CheckpointError:
        return None


def network_digest(path: str | Path) -> str:
    """The SHA-256 of the network a checkpoint holds (its arch spec and every tensor of its state_dict, names,
    dtypes and shapes included), not of the file: what a run records of each network it was made from
    (rescomp.rundir.MADE). The same network saved again with other metrics or config is the same input;
    other weights under the same path are not."""
    payload = load(path)
    h = hashlib.sha256(json.dumps(payload.get("arch"), sort_keys=True, default=str).encode())
    for name, value in sorted(payload.get("state_dict", {}).items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def rebuild(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The network of `spec` holding these weights: how a network is stored, and how it crosses to another
    process (rescomp.distributed.agree) or is copied without deepcopy (a masked network's weight has a graph)."""
    from rescomp.models import build_model

    model = build_model(spec)
    model.load_state_dict(state_dict)
    return model


def copy_network(model: nn.Module) -> nn.Module:
    """A deep copy of `model`, also of one whose layers compute their weight in a forward pre-hook (a masked
    or weight-shared network): the weight such a hook last computed is a tensor with a graph, which
    deepcopy refuses, so the copy gets it detached; the copy's own hook computes it again from the copied
    weights at its next forward."""
    import copy

    computed = {id(t): t.detach().clone() for m in model.modules() for t in vars(m).values()
                if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    return copy.deepcopy(model, computed)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from the checkpoint's arch spec and load its weights."""
    payload = load(path)
    if payload.get("kind") == INT8:
        raise CheckpointError(f"'{path}' is an int8 network, and this takes an fp32 one: pass the model.pt it was "
                              f"quantized from")
    try:
        model = rebuild(payload["arch"], payload["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise CheckpointError(f"checkpoint '{path}': weights do not fit its arch spec ({first})") from None
    return model, payload


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        # a run saved with more GPUs visible (several processes, another machine) resumes on fewer
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x
