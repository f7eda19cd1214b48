"""User code named in a config: a tool or reward given as ``path/to/file.py:name`` or
``package.module:name`` (also ``package.module.name``).

- A file path (ends in ``.py`` or holds a ``/``) is loaded from that file,
  relative to the working directory; the same file is loaded once per process.
- A module is imported as usual; when it is not importable but exists under the
  working directory (``examples.qa_tools`` from the repository root), it is
  loaded from there, so no ``PYTHONPATH`` is needed.

``as_relay_reward`` lets a verl reward (``compute_score(data_source,
solution_str, ground_truth, extra_info=None)``, as named by verl's
``custom_reward_function.path/name``) serve as a Relay reward.

Every failure is a ``PluginError`` whose message is one line naming the spec.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable


class PluginError(KeyError):
    """A tool or reward spec that cannot be loaded (a ``KeyError``, like an unknown name)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def is_spec(name: str) -> bool:
    """``name`` points at user code rather than a registered name."""
    return ":" in name or "." in name or "/" in name


def split_spec(spec: str) -> tuple[str, str]:
    """``(module or file, attribute)`` of ``spec``."""
    if ":" in spec:
        where, _, attr = spec.rpartition(":")
    elif spec.endswith(".py"):
        raise PluginError(f"'{spec}': name the function or tool in the file, e.g. '{spec}:my_function'")
    else:
        where, _, attr = spec.rpartition(".")
    if not where or not attr:
        raise PluginError(f"'{spec}' is not of the form path/to/file.py:name or package.module:name")
    return where, attr


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where


def _load_file(path: Path, spec: str) -> ModuleType:
    path = path.resolve()
    if not path.is_file():
        raise PluginError(f"'{spec}': no such file {path}")
    name = f"relay_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise PluginError(f"'{spec}': {path} cannot be loaded as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise PluginError(f"'{spec}': loading {path} failed: {type(e).__name__}: {e}") from None
    return module


def _import(module_name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        local = Path.cwd() / Path(*module_name.split("."))
        if e.name not in (top, module_name) and not str(e.name).startswith(top + "."):
            raise PluginError(f"'{spec}': importing {module_name} failed: {e}") from None
        if (Path.cwd() / top).is_dir() or local.with_suffix(".py").is_file():
            if str(Path.cwd()) not in sys.path:
                sys.path.append(str(Path.cwd()))
            importlib.invalidate_caches()
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError as e2:
                raise PluginError(f"'{spec}': no module {e2.name} (from {Path.cwd()})") from None
        raise PluginError(f"'{spec}': no module named {module_name} (not installed, not under {Path.cwd()})") from None
    except Exception as e:
        raise PluginError(f"'{spec}': importing {module_name} failed: {type(e).__name__}: {e}") from None


def load_object(spec: str) -> Any:
    """The object ``spec`` names. Raises ``PluginError``."""
    where, attr = split_spec(spec)
    module = _load_file(Path(where), spec) if _is_file(where) else _import(where, spec)
    try:
        return getattr(module, attr)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
        raise PluginError(f"'{spec}': {where} has no '{attr}' (it has {', '.join(public)})") from None


# --------------------------------------------------------------------------- verl rewards

VERL_REWARD_PARAMS = ("data_source", "solution_str", "ground_truth", "extra_info")


def is_verl_reward(fn: Callable[..., Any]) -> bool:
    """``fn`` has verl's ``compute_score`` signature (its first parameters are verl's names)."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return len(names) >= 3 and tuple(names[:3]) == VERL_REWARD_PARAMS[:3]


def as_relay_reward(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a Relay reward ``(final_answer, trajectory, **row_fields)``; a verl
    ``compute_score`` is called with ``solution_str`` = all assistant text of the episode,
    ``ground_truth`` = the row's (``reward_model.ground_truth``, else ``answer``),
    ``data_source`` and ``extra_info`` from the row; its ``score`` becomes ``reward`` and
    non-numeric entries of a returned dict are dropped. Other functions are returned as is."""
    if not is_verl_reward(fn):
        return fn
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())

    def relay_reward(final_answer: str | None, trajectory: Any, **row: Any) -> float | dict[str, float]:
        given = {
            "data_source": row.get("data_source"),
            "solution_str": trajectory.response_text,
            "ground_truth": row.get("ground_truth", row.get("answer")),
            "extra_info": row.get("extra_info"),
        }
        out = fn(**{k: v for k, v in given.items() if takes_all or k in params})
        if not isinstance(out, dict):
            return float(out)
        numbers = {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}
        if "reward" not in numbers and "score" in numbers:
            numbers["reward"] = numbers.pop("score")
        return numbers

    relay_reward.__name__ = getattr(fn, "__name__", "verl_reward")
    return relay_reward
