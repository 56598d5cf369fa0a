"""ONNX export of any rescomp network, kept only once ONNX Runtime agrees with PyTorch.

The network is rebuilt from its arch spec (pruned shapes, deleted units, gates and separable convs
included), captured with torch.onnx's exporter (torch.export, then onnxscript) with a dynamic batch
dimension, checked by onnx.checker, and run by ONNX Runtime on a seeded random batch and on batch 1.
The file is written only where every output agrees with PyTorch's to `RTOL` of the largest logit
magnitude, and never less than `RTOL` absolute. An absolute bound alone would fail correct exports:
an untrained ResNet-56 gives logits near 1e4, whose float32 rounding differs by 1e-3 between
runtimes. Otherwise nothing is written and the error says by how much the outputs differ.

An int8 model (`rescomp quantize` with backend pt2e or onnxruntime) exports as a QDQ graph: ONNX
Runtime's own int8 graph as it is, or PT2E's converted program through the same exporter. It is kept
where ONNX Runtime's top-1 agrees with the int8 model's on INT8_AGREEMENT of a seeded batch: int8
kernels round differently from one library to the next, so outputs agree to a quantization step, not
to 1e-4. FX int8 models (packed torch.ao ops) have no ONNX form.

onnx, onnxscript and onnxruntime are rescomp dependencies; an install without them gets one line
saying what to install.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from rescomp import checkpoint
from rescomp.config_files import check_writable
from rescomp.errors import ConfigError, RescompError

OPSET = 18  # torch.onnx's own (torch.export-based) exporter writes 18 and later; older opsets are converted
RTOL = 1e-4  # of max(1, the largest |logit|): the agreement an export must show
CHECK_BATCH = 4
MAX_BATCH = 4096
AGREE_BATCH = 64  # int8: the seeded random images whose top-1 must agree
INT8_AGREEMENT = 0.95


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


def _torch_onnx(model: Any, x: torch.Tensor, opset: int, path: Path) -> None:
    """torch.onnx's exporter (torch.export, then onnxscript), batch dimension dynamic."""
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, verbose=False,
                                    dynamic_shapes=dynamic_batch())
    program.save(str(path))
    written = _opset(program.model_proto)  # the program in memory: no second read of the file
    if written != opset:  # where ONNX's version converter fails, torch.onnx falls back to its own and only logs it
        raise ConfigError(f"--opset {opset}: torch.onnx wrote opset {written} instead (ONNX's version converter cannot "
                          f"take this network to {opset}); use --opset {written}")


def _opset(model_proto: Any) -> Optional[int]:
    """The standard-domain opset an ONNX model imports."""
    return next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _checked_write(path: Path, write: Callable[[Path], None], check: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """`write` an ONNX file beside `path`, pass onnx.checker and `check` (given an ONNX Runtime session of
    it; raises ExportError or returns what it checked), then move it into place; nothing is left otherwise."""
    onnx, ort = onnx_modules()
    import onnxscript

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        onnx.checker.check_model(str(tmp))
        checked = check(ort_session(tmp))
        written = _opset(onnx.load(str(tmp)))
        tmp.replace(path)
    except (RescompError, OSError):  # a full disk is not the network's fault
        raise
    except Exception as e:  # the exporter's own failures (an op it cannot translate) name the op
        raise ExportError(f"torch.onnx could not export this network: {str(e).strip().splitlines()[0][:300]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"opset": written, "onnx_bytes": path.stat().st_size, "batch": "dynamic", **checked,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": ort.__version__}


def _outputs(session: Any, batch: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's outputs for `batch`, refused where they hold NaN or infinities or have another shape
    than PyTorch's (`like`)."""
    theirs = _run(session, batch)
    if not bool(torch.isfinite(theirs).all()):
        raise ExportError("ONNX Runtime's outputs hold NaN or infinite values; the export was not kept")
    if like.shape != theirs.shape:
        raise ExportError(f"the ONNX graph returns shape {tuple(theirs.shape)} for a batch of "
                          f"{len(batch)}, PyTorch {tuple(like.shape)}")
    return theirs


def export_onnx(model: nn.Module, image_size: int, path: Path, opset: int = OPSET, seed: int = 0) -> dict[str, Any]:
    """Write `model` as ONNX to `path` (batch dimension dynamic) after checking it against PyTorch;
    returns what was checked. Raises ExportError, and leaves no file, where the two disagree."""
    model = checkpoint.copy_network(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    x = torch.randn(CHECK_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))

    def check(session: Any) -> dict[str, Any]:
        worst, scale = 0.0, 1.0
        with torch.no_grad():
            for batch in (x, x[:1]):
                ours = model(batch)
                theirs = _outputs(session, batch, ours)
                worst = max(worst, float((ours - theirs).abs().max()))
                scale = max(scale, float(ours.abs().max()))
        if not worst <= RTOL * scale:  # a NaN difference fails too
            raise ExportError(f"ONNX Runtime's outputs differ from PyTorch's by up to {worst:.3g} (allowed "
                              f"{RTOL:g} x {scale:.3g}); the export was not kept")
        return {"image_size": image_size, "checked_batches": [CHECK_BATCH, 1], "max_abs_diff": worst,
                "tolerance": RTOL * scale}

    return _checked_write(path, lambda tmp: _torch_onnx(model, x, opset, tmp), check)


def _no_onnx_form(backend: str) -> ConfigError:
    return ConfigError(f"an int8 model of backend {backend} (torch.ao FX, packed int8 ops) has no ONNX form; "
                       f"quantize with --set quantize.backend=pt2e or onnxruntime, then export that int8.pt")


def export_int8_onnx(qmodel: nn.Module, payload: dict[str, Any], path: Path, opset: int = OPSET,
                     seed: int = 0) -> dict[str, Any]:
    """Write a rescomp int8 model (rescomp.compress.quantize.load_int8) as an int8 ONNX graph (QuantizeLinear /
    DequantizeLinear around float ops, which ONNX Runtime fuses into int8 kernels): backend onnxruntime's
    graph as it is, pt2e's converted program through torch.onnx. Kept where ONNX Runtime's top-1 agrees
    with the int8 model's own on at least INT8_AGREEMENT of a seeded batch of AGREE_BATCH random images
    (int8 kernels round differently, so outputs agree to a step, not to 1e-4)."""
    backend, size = payload["quantize"]["backend"], payload["image_size"]
    x = torch.randn(AGREE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))
    if backend == "onnxruntime":
        def write(tmp: Path) -> None:
            tmp.write_bytes(payload["onnx"])
    elif backend == "pt2e":
        def write(tmp: Path) -> None:
            _torch_onnx(torch.export.load(io.BytesIO(payload["pt2"])), x, opset, tmp)
    else:
        raise _no_onnx_form(backend)

    def check(session: Any) -> dict[str, Any]:
        with torch.no_grad():
            ours = qmodel(x)
            theirs = _outputs(session, x, ours)
            _outputs(session, x[:1], ours[:1])
        agree = float((ours.argmax(1) == theirs.argmax(1)).float().mean())
        if not agree >= INT8_AGREEMENT:
            raise ExportError(f"ONNX Runtime's top-1 agrees with the int8 model's on {agree:.0%} of "
                              f"{AGREE_BATCH} images (at least {INT8_AGREEMENT:.0%} needed); the export was not kept")
        return {"image_size": size, "int8": True, "backend": backend, "checked_batches": [AGREE_BATCH, 1],
                "top1_agreement": agree, "max_abs_diff": float((ours - theirs).abs().max())}

    return _checked_write(path, write, check)


def _made_by(source: Path) -> dict[str, Any]:
    """The config hash and seed of the run that made the network at `source`, as its rows carry them (a
    fine-tuned step's checkpoint keeps its fine-tune's config, whose hash no row has); {} for a network that
    no finished run holds as its own (a copy)."""
    from rescomp.rundir import read_summary, run_of

    run = run_of(source)
    try:
        summary = read_summary(run / "summary.json") if run else {}
    except ConfigError:
        return {}
    return {k: summary[k] for k in ("config_hash", "seed") if k in summary}


def export_checkpoint(source: Path, out: Path | None = None, opset: int = OPSET,
                      int8: bool = False) -> tuple[Path, dict[str, Any]]:
    """Export the network of a rescomp model.pt (fp32) or int8.pt (int8; `int8` asks for one) to `out`
    (default: beside it, .onnx), with a JSON record of the check and its provenance beside the file
    (<out>.json)."""
    from rescomp.compress.quantize import QUANT_FORMAT, load_int8
    from rescomp.provenance import stamp

    t0 = time.perf_counter()
    payload = checkpoint.load(source)
    quantized = payload.get("kind") == QUANT_FORMAT
    if int8 and not quantized:
        raise ConfigError(f"'{source}' is an fp32 model; --int8 exports an int8 model: run `rescomp quantize` with "
                          f"quantize.backend pt2e or onnxruntime and export its int8.pt")
    onnx, _ = onnx_modules()  # what to install, before any work
    if not OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"--opset {opset}: torch.onnx exports opsets {OPSET} to {onnx.defs.onnx_opset_version()} here "
                          f"(this onnx package's newest); older ones go through ONNX's version converter, which cannot "
                          f"convert these networks; use --opset {OPSET}")
    out = out or source.with_suffix(".onnx")
    check_writable(out.parent, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    if quantized:
        model, payload = load_int8(source)
        info = export_int8_onnx(model, payload, out, opset)
    else:
        model, payload = checkpoint.load_model(source)
        image_size = ((payload.get("config") or {}).get("data") or {}).get("image_size", 32)
        info = export_onnx(model, image_size, out, opset)
    record = {"file": out.name, "source": os.path.relpath(Path(source).resolve(), out.parent.resolve()),  # beside it
              "arch": payload["arch"], **info, **_made_by(source),
              "wall_seconds": time.perf_counter() - t0, **stamp("cpu")}
    checkpoint.atomic_write_text(out.with_name(out.name + ".json"), json.dumps(record, indent=2))
    return out, record
