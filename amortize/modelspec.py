"""The model a config names: ``package.module:function`` or ``path/to/file.py:function``, imported.

Every error is a :class:`~amortize.errors.ConfigError` that names the spec, the file and the config.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from .errors import ConfigError

__all__ = ["resolve_model", "absolute_path", "absolute_model_spec"]


def absolute_path(p: str, base: Path) -> str:
    """``p`` made absolute if it exists relative to ``base`` or the working directory; else unchanged."""
    if not p or os.path.isabs(p):
        return p
    for root in (base, Path.cwd()):
        if (root / p).exists():
            return str((root / p).resolve())
    return p


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def absolute_model_spec(spec: str, base: Path) -> str:
    """``spec`` with its file part made absolute (see :func:`absolute_path`); a module spec unchanged."""
    if ":" not in spec:
        return spec
    target, func = spec.rsplit(":", 1)
    return f"{absolute_path(target, base)}:{func}" if _is_file_spec(target) else spec


def resolve_model(spec: str, base_dir: str | os.PathLike | None = None, source: str | None = None) -> Callable:
    """Import the model function named by ``spec``.

    Args:
        spec: ``package.module:function`` or ``path/to/file.py:function``.
        base_dir: folder a relative file path is tried against first (then the working directory).
        source: the config file, named in error messages.

    Returns:
        The model function.

    Raises:
        ConfigError: bad spec, module or file not found, import failure, no such function.
    """
    where = f"{source}: model" if source else "model"
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1]:
        raise ConfigError(f"{where}: {spec!r} is not 'package.module:function' or 'path/to/file.py:function'")
    target, func = spec.rsplit(":", 1)
    if _is_file_spec(target):
        found = absolute_path(target, Path(base_dir) if base_dir else Path.cwd())
        if not os.path.isfile(found):
            looked = ", ".join(dict.fromkeys(str(Path(r).resolve()) for r in (base_dir or os.getcwd(), os.getcwd())))
            raise ConfigError(f"{where}: model file '{target}' not found (looked in {looked})")
        module, what = _import_file(found, where), f"file '{found}'"
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and (target == e.name or target.startswith(e.name + ".")):
                raise ConfigError(f"{where}: module '{target}' not found (no module named '{e.name}')") from None
            raise ConfigError(f"{where}: importing module '{target}' failed: {e}") from None
        except SystemExit as e:  # sys.exit() at import would end the command silently
            raise ConfigError(f"{where}: module '{target}' raised SystemExit({e.code}) while it was imported") from None
        except Exception as e:  # noqa: BLE001 - any failure inside the user's module is reported in one line
            raise ConfigError(f"{where}: importing module '{target}' failed: {type(e).__name__}: {e}") from None
        what = f"module '{target}'"
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        defined = sorted(
            k for k, v in vars(module).items() if callable(v) and not k.startswith("_") and not isinstance(v, type)
        )
        raise ConfigError(f"{where}: no function '{func}' in {what} (it defines: {', '.join(defined) or 'nothing'})")
    return fn


def _import_file(path: str, where: str) -> ModuleType:
    """Import a Python file as a module (its folder on ``sys.path`` while it runs, for sibling imports)."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    name = f"_amortize_model_{Path(path).stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: '{path}' cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(Path(path).parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:  # sys.exit() at import would end the command silently
        del sys.modules[name]
        raise ConfigError(f"{where}: '{path}' raised SystemExit({e.code}) while it was imported") from None
    except Exception as e:  # noqa: BLE001 - any failure inside the user's file is reported in one line
        del sys.modules[name]
        raise ConfigError(f"{where}: importing '{path}' failed: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(folder)
    return module
