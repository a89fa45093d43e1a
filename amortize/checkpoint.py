"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``.

A checkpoint holds the guide's weights, the optimizer, the step, the training config, RNG states,
the model's signature (sites, shapes, levels) and the library version, so that a checkpoint of
another model or another format is refused with a message instead of loading silently. A SHA-256
checksum over the whole payload makes a corrupted file (a flipped bit in a weight, which the zip
container does not detect) a :class:`~amortize.errors.CheckpointError` too.

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
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write", "payload_checksum", "FORMAT_VERSION"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


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
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        found = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an amortize checkpoint of format {FORMAT_VERSION} (found {found})")
    stored = payload.pop("checksum", None)
    if stored is None:
        log.warning("%s: checkpoint has no checksum (written by an older amortize); integrity not verified", path)
    elif stored != payload_checksum(payload):
        raise CheckpointError(f"{path}: corrupted checkpoint (checksum mismatch)")
    return payload
