"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``.

A checkpoint holds the guide's weights, the optimizer, the step, the training config, RNG states,
the model's signature (sites, shapes, levels) and the library version, so that a checkpoint of
another model or another format is refused with a message instead of loading silently. A SHA-256
checksum over the whole payload makes a corrupted file (a flipped bit in a weight, which the zip
container does not detect) a :class:`~amortize.errors.CheckpointError` too; a file without one is
refused. :func:`check_amortizer_payload` validates every field an amortizer reads, so a damaged or
hand-edited checkpoint is refused naming the file and the field, never a raw error on first use.

Format 2 (amortize 0.3) is a clean break: a format-1 checkpoint (amortize 0.2.x) is refused, to be
retrained or loaded with the amortize that wrote it. The encoder's statistics are versioned as a
whole (:data:`amortize.nn.STATISTICS_VERSION`, the payload's ``statistics``); a checkpoint of other
statistics is refused too.

A process killed while writing leaves the previous file intact and, at worst, a hidden
``.NAME.PID.*.tmp`` beside it; readers never look at those, and the next successful write of the
same file removes the ones whose process is gone.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .version import __version__

__all__ = [
    "FORMAT_VERSION",
    "AMORTIZER_KEYS",
    "atomic_write",
    "write_text",
    "check_amortizer_payload",
    "load_checkpoint",
    "payload_checksum",
    "save_checkpoint",
]

log = logging.getLogger(__name__)
FORMAT_VERSION = 2


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the new one, never half of one.

    Raises:
        OSError: the write failed (disk full, no permission); ``path`` is untouched and the
            temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    _remove_stale_temporaries(path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically, readable as the umask allows (``atomic_write`` alone leaves 0600).

    Raises:
        OSError: the write failed; its ``filename`` is ``path``, which is left as it was.
    """
    data = text.encode()
    try:
        atomic_write(path, lambda fh: fh.write(data))
    except OSError as e:  # disk full, no permission: name the file (the previous one is intact)
        raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.NAME.PID.*.tmp`` files beside ``path`` left by writers that were killed."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its writer is alive (perhaps writing right now): leave it
        except ProcessLookupError:
            pass
        except OSError:  # e.g. PermissionError: the process exists
            continue
        try:
            tmp.unlink()
            log.info("removed %s, left by a writer that was killed", tmp)
        except OSError:
            pass


def payload_checksum(payload: Any) -> str:
    """SHA-256 over a payload's structure and values (tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)}".encode())
            for k, v in obj.items():
                walk(k)
                walk(v)
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for v in obj:
                walk(v)
        else:
            h.update(repr((type(obj).__name__, obj)).encode())

    walk(payload)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``, with a checksum.

    The payload is serialized and read back with ``weights_only=True`` before the file is touched,
    so a checkpoint that could not be loaded safely is never written.

    Raises:
        CheckpointError: the payload holds objects a safe load refuses, or the write failed (disk
            full, no permission); the previous file at ``path`` is left intact.
    """
    payload = {"format_version": FORMAT_VERSION, **{k: v for k, v in payload.items() if k != "checksum"}}
    payload["checksum"] = payload_checksum(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file could not be read back
        raise CheckpointError(f"{path}: the checkpoint cannot be loaded safely ({type(e).__name__}: {e})") from None
    try:
        atomic_write(path, lambda fh: fh.write(data))
    except OSError as e:
        raise CheckpointError(
            f"{path}: writing the checkpoint failed ({e.strerror or e}); the previous checkpoint is intact"
        ) from e


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (a directory: its ``checkpoint.pt``).

    Raises:
        CheckpointError: the file is missing, truncated, corrupted (checksum mismatch), or of
            another format.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (IsADirectoryError, PermissionError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not an amortize checkpoint (found a {type(payload).__name__})")
    found = payload.get("format_version")
    if found != FORMAT_VERSION:
        written = payload.get("library_version")
        if isinstance(found, int) and found < FORMAT_VERSION:
            by = written if isinstance(written, str) else "0.2.x or earlier"
            raise CheckpointError(
                f"{path}: written by amortize {by} (checkpoint format {found}), this is amortize {__version__}"
                f" (format {FORMAT_VERSION}); retrain, or load it with amortize 0.2.x"
            )
        raise CheckpointError(f"{path}: not an amortize checkpoint of format {FORMAT_VERSION} (found {found})")
    stored = payload.pop("checksum", None)
    if stored is None:
        raise CheckpointError(f"{path}: field 'checksum' is missing; the checkpoint's integrity cannot be verified")
    if stored != payload_checksum(payload):
        raise CheckpointError(f"{path}: corrupted checkpoint (checksum mismatch)")
    return payload


AMORTIZER_KEYS = (
    "library_version",
    "statistics",
    "signature",
    "fingerprint",
    "hidden",
    "flow_bins",
    "global_coupling",
    "seed",
    "step",
    "pilot_done",
    "config",
    "state_dict",
    "optimizer",
    "rng",
    "example",
    "ranges",
    "history",
)


def check_amortizer_payload(
    path: str | os.PathLike, payload: dict[str, Any], statistics: str, config_fields: Collection[str]
) -> None:
    """Refuse an amortizer checkpoint (a :func:`load_checkpoint` payload) whose fields an
    :class:`~amortize.Amortizer` could not use: another library version (major.minor), other
    encoder ``statistics``, a missing field, or one of the wrong type or value (a negative step, an
    unknown training option, a missing training range, an RNG state of the wrong size).

    Raises:
        CheckpointError: naming ``path`` and the field.
    """
    written = payload.get("library_version")
    if not isinstance(written, str):
        raise CheckpointError(f"{path}: no library version; not written by Amortizer.save")
    if written.split(".")[:2] != __version__.split(".")[:2]:
        raise CheckpointError(
            f"{path}: written by amortize {written}, this is {__version__}; retrain, or load it"
            f" with amortize {'.'.join(written.split('.')[:2])}.x"
        )
    missing = [k for k in AMORTIZER_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}; not written by Amortizer.save")
    if payload["statistics"] != statistics:
        raise CheckpointError(
            f"{path}: field 'statistics': trained on encoder statistics {payload['statistics']!r}, this amortize"
            f" computes {statistics!r}; retrain, or load it with the amortize that wrote it"
        )

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: field '{field}' {problem}")

    for key, low in (("step", 0), ("hidden", 1), ("flow_bins", 0), ("seed", None)):
        v = payload[key]
        if not isinstance(v, int) or isinstance(v, bool) or (low is not None and v < low):
            raise bad(key, f"must be an integer{'' if low is None else f' >= {low}'}, found {v!r}")
    for key in ("global_coupling", "pilot_done"):
        if not isinstance(payload[key], bool):
            raise bad(key, f"must be true or false, found {payload[key]!r}")
    if not isinstance(payload["signature"], dict) or not isinstance(payload["fingerprint"], str):
        raise bad(
            "signature", "and 'fingerprint' must be the model's signature (a dict) and its fingerprint (a string)"
        )
    config = payload["config"]
    if not isinstance(config, dict):
        raise bad("config", f"must be a dict of training options, found {type(config).__name__}")
    unknown = sorted(set(config) - set(config_fields))
    if unknown:
        raise bad("config", f"holds unknown training option(s) {unknown}; options are {sorted(config_fields)}")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise bad("state_dict", "must map parameter names to tensors")
    opt = payload["optimizer"]
    if opt is not None and not (isinstance(opt, dict) and {"state", "param_groups"} <= set(opt)):
        raise bad("optimizer", "must be an optimizer state (state, param_groups) or None")
    _check_rng(payload["rng"], bad)
    _check_ranges(payload["ranges"], payload["example"], bad)
    if not isinstance(payload["history"], list):
        raise bad("history", f"must be a list, found {type(payload['history']).__name__}")


def _check_rng(rng: Any, bad: Any) -> None:
    """torch's CPU RNG state, the structure generator's, and a CUDA state or None."""
    if not isinstance(rng, dict):
        raise bad("rng", f"must be a dict of RNG states, found {type(rng).__name__}")
    size = torch.get_rng_state().numel()  # the CPU generator's state, also a torch.Generator's
    for key in ("torch", "generator"):
        v = rng.get(key)
        if not (torch.is_tensor(v) and v.dtype == torch.uint8 and v.numel() == size):
            found = f"{v.dtype} [{v.numel()}]" if torch.is_tensor(v) else type(v).__name__
            raise bad(f"rng.{key}", f"must be a uint8 RNG state of {size} bytes, found {found}")
    cuda = rng.get("cuda")
    if cuda is not None and not (torch.is_tensor(cuda) and cuda.dtype == torch.uint8):
        raise bad("rng.cuda", "must be a uint8 CUDA RNG state or None")


def _check_ranges(ranges: Any, example: Any, bad: Any) -> None:
    """The training ranges: ``[lo, hi]`` per level and for ``obs``; optional covariates and response."""

    def pair(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)

    if not isinstance(ranges, dict):
        raise bad("ranges", f"must be a dict, found {type(ranges).__name__}")
    levels = example.get("levels") if isinstance(example, dict) else None
    factors = example.get("factors") if isinstance(example, dict) else None
    crossed = isinstance(factors, list) and len(factors) > 1 and all(isinstance(c, list) and c for c in factors)
    rows = [f"obs:{chain[-1]}" for chain in factors] if crossed else ["obs"]  # see layout.structure_counts
    for key in [*(levels if isinstance(levels, list) else []), *rows]:
        if key not in ranges:
            raise bad("ranges", f"lacks the entry '{key}' (the training range of {key})")
        if not pair(ranges[key]):
            raise bad(f"ranges.{key}", f"must be [low, high], found {ranges[key]!r}")
    cov = ranges.get("covariates", {})
    if not isinstance(cov, dict) or not all(pair(v) for v in cov.values()):
        raise bad("ranges.covariates", "must map covariate names to [low, high]")
    resp = ranges.get("response")
    if resp is not None and not (isinstance(resp, dict) and all(pair(resp.get(k)) for k in ("mean", "log_sd"))):
        raise bad("ranges.response", "must hold [low, high] for mean and log_sd")
