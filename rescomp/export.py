"""ONNX export of any rescomp network, kept only once ONNX Runtime agrees with PyTorch.

The network is rebuilt from its arch spec (pruned shapes, deleted units, gates and separable convs
included), captured with torch.onnx's exporter (torch.export, then onnxscript) with a dynamic batch
dimension, checked by onnx.checker, and run by ONNX Runtime on a seeded random batch and on batch 1.
The file is written only where every output agrees with PyTorch's to `RTOL` of the largest logit
magnitude, and never less than `RTOL` absolute. An absolute bound alone would fail correct exports:
an untrained ResNet-56 gives logits near 1e4, whose float32 rounding differs by 1e-3 between
runtimes. Otherwise nothing is written and the error says by how much the outputs differ.

onnx, onnxscript and onnxruntime are rescomp dependencies; an install without them gets one line
saying what to install.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rescomp import checkpoint
from rescomp.errors import ConfigError, RescompError

OPSET = 18
RTOL = 1e-4  # of max(1, the largest |logit|): the agreement an export must show
CHECK_BATCH = 4
MAX_BATCH = 4096


class ExportError(RescompError):
    """The exported graph does not compute what the PyTorch network computes."""

    exit_code = 1


def dynamic_batch() -> tuple[dict[int, Any]]:
    """torch.export's dynamic_shapes for a network's one input: its batch dimension, 1 to MAX_BATCH."""
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def onnx_modules() -> tuple[Any, Any]:
    """(onnx, onnxruntime), after checking onnxscript (torch.onnx's exporter needs it), or one line of what to install."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                          f"pip install 'onnx==1.23.2' 'onnxscript==0.7.2' 'onnxruntime==1.32.0'") from None
    return onnx, onnxruntime


def ort_session(path: Path | str | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of an ONNX file (or its bytes), with `threads` intra-op threads
    (default: ONNX Runtime's)."""
    _, ort = onnx_modules()
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: its warnings about unused initializers are for developers
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    # its worker threads must not spin between runs: timed interleaved with PyTorch, a spinning pool
    # steals the cores from the pass that follows it
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _run(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def export_onnx(model: nn.Module, image_size: int, path: Path, opset: int = OPSET, seed: int = 0) -> dict[str, Any]:
    """Write `model` as ONNX to `path` (batch dimension dynamic) after checking it against PyTorch;
    returns what was checked. Raises ExportError, and leaves no file, where the two disagree."""
    onnx, ort = onnx_modules()
    import onnxscript

    model = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(CHECK_BATCH, 3, image_size, image_size, generator=g)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, verbose=False,
                                        dynamic_shapes=dynamic_batch())
        program.save(str(tmp))
        onnx.checker.check_model(str(tmp))
        session = ort_session(tmp)
        worst, scale = 0.0, 1.0
        with torch.no_grad():
            for batch in (x, x[:1]):
                ours, theirs = model(batch), _run(session, batch)
                if not bool(torch.isfinite(theirs).all()):
                    raise ExportError("ONNX Runtime's outputs hold NaN or infinite values; the export was not kept")
                if ours.shape != theirs.shape:
                    raise ExportError(f"the ONNX graph returns shape {tuple(theirs.shape)} for a batch of "
                                      f"{len(batch)}, PyTorch {tuple(ours.shape)}")
                worst = max(worst, float((ours - theirs).abs().max()))
                scale = max(scale, float(ours.abs().max()))
        if not worst <= RTOL * scale:  # a NaN difference fails too
            raise ExportError(f"ONNX Runtime's outputs differ from PyTorch's by up to {worst:.3g} (allowed "
                              f"{RTOL:g} x {scale:.3g}); the export was not kept")
        written = next((o.version for o in onnx.load(str(tmp)).opset_import if o.domain in ("", "ai.onnx")), opset)
        tmp.replace(path)
    except RescompError:
        raise
    except Exception as e:  # the exporter's own failures (an op it cannot translate) name the op
        raise ExportError(f"torch.onnx could not export this network: {str(e).strip().splitlines()[0][:300]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"opset": written, "onnx_bytes": path.stat().st_size, "image_size": image_size, "batch": "dynamic",
            "checked_batches": [CHECK_BATCH, 1], "max_abs_diff": worst, "tolerance": RTOL * scale,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": ort.__version__}


def export_checkpoint(source: Path, out: Path | None = None, opset: int = OPSET) -> tuple[Path, dict[str, Any]]:
    """Export the fp32 network of a rescomp model.pt to `out` (default: beside it, .onnx), with a JSON
    record of the check and its provenance beside the file (<out>.json)."""
    from rescomp.provenance import stamp

    payload = checkpoint.load(source)
    if payload.get("kind") == "rescomp-int8":
        raise ConfigError(f"'{source}' is an int8 model; ONNX export takes fp32 models: export the model.pt it "
                          f"was quantized from ({payload.get('source', 'its training run')})")
    onnx_modules()  # what to install, before any work
    model, payload = checkpoint.load_model(source)
    image_size = ((payload.get("config") or {}).get("data") or {}).get("image_size", 32)
    out = out or source.with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    info = export_onnx(model, image_size, out, opset)
    record = {"file": str(out), "source": str(source), "arch": payload["arch"], **info, **stamp("cpu")}
    checkpoint.atomic_write_text(out.with_name(out.name + ".json"), json.dumps(record, indent=2))
    return out, record
