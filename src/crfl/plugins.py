"""Plugins: the user's own parts (aggregation rules, datasets, attacks, models) on the command line.

A plugin is a Python module that registers parts when it is imported, with the registries'
decorators (:func:`crfl.aggregation.register_aggregator`, :func:`crfl.data.register_dataset`,
:func:`crfl.attacks.register_attack`, :func:`crfl.model.register_model`). crfl imports it in
one of two ways, the Python ecosystem's usual ones:

- ``--plugin MODULE`` on ``crfl train|run|certify|sweep|list``: a dotted module name importable
  from ``sys.path`` (``PYTHONPATH``), or the path of a ``.py`` file (imported under its stem);
- an entry point in the group ``crfl.plugins`` of an installed distribution, imported by every
  ``crfl`` command (``[project.entry-points."crfl.plugins"] my-parts = "my_package.crfl_parts"``).

A run remembers its plugins: config.yaml's ``provenance.plugins`` lists every plugin module the
training process had imported (:func:`loaded`). Whatever reads the run back (``crfl certify``,
``--resume``, a sweep worker, :func:`crfl.certify.certify_run` from Python) imports them again by
module name (:func:`import_recorded`, called by :meth:`crfl.rundir.RunDir.load_config`); a module
that cannot be imported, or one that was loaded from a file (a path in a run directory is never
executed on its own), is refused with one line naming the ``--plugin`` to pass. Sweep workers
import the parent's plugins before their first job (:func:`specs` is what they receive).

The process-wide record :data:`_LOADED` follows the registries it feeds: a part registered by a
plugin lives in the module-level registry for the rest of the process.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crfl.validation import ConfigError

#: The entry-point group every crfl command loads.
GROUP = "crfl.plugins"
FLAG = "--plugin"
ENTRY_POINT = "entry point"


@dataclass(frozen=True)
class Plugin:
    """One imported plugin: its module name, how it came (``--plugin`` or ``entry point``) and,
    for a ``.py`` file, the file's absolute path; for an entry point, its name and distribution."""

    module: str
    source: str = FLAG
    file: str | None = None
    entry_point: str | None = None
    distribution: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @property
    def spec(self) -> str:
        """What ``--plugin`` takes to import it again (the file for a file plugin)."""
        return self.file or self.module


#: module name -> the plugin that imported it, in import order.
_LOADED: dict[str, Plugin] = {}


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _import_file(path: Path) -> str:
    name = path.stem
    if not name.isidentifier():
        raise ConfigError(f"The '{FLAG}' parameter must name a .py file whose name is a Python identifier. "
                          f"Got {str(path)!r} instead; rename it (e.g. {name.replace('-', '_')!r}.py).")
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != path.resolve():
        raise ConfigError(f"The '{FLAG}' parameter must name a .py file whose name is not that of a module already "
                          f"imported. Got {str(path)!r} instead (it would replace the module {name!r}); rename it.")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has a loader
        raise ConfigError(f"The '{FLAG}' parameter must name a Python file. Got {str(path)!r} instead.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return name


def load(spec: str) -> Plugin:
    """Import the plugin ``spec`` (a module name or a ``.py`` file) and record it; returns the record.

    A module already imported is not imported again (its parts are registered); a file is
    executed on every call, so that a test may load it into fresh registries.
    """
    spec = str(spec)
    try:
        if _is_file_spec(spec):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise ConfigError(f"The '{FLAG}' parameter must name an importable module or a .py file. "
                                  f"Got {spec!r} instead (no such file).")
            name = _import_file(path)
            plugin = Plugin(name, FLAG, file=str(path.resolve()))
        else:
            importlib.import_module(spec)
            plugin = Plugin(spec, FLAG)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"The '{FLAG}' parameter must name an importable module or a .py file. Got {spec!r} instead "
            f"({e}); put its directory on PYTHONPATH or pass the file's path."
        ) from e
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed: one line, the traceback behind --debug
        raise ConfigError(f"The plugin {spec!r} failed while importing: {type(e).__name__}: {e}. "
                          "Fix the module (rerun with --debug for the traceback).") from e
    _LOADED.setdefault(plugin.module, plugin)
    return _LOADED[plugin.module]


def load_entry_points() -> list[Plugin]:
    """Import every installed entry point of the group ``crfl.plugins`` (each once per process)."""
    out = []
    for ep in importlib.metadata.entry_points(group=GROUP):
        if ep.module in _LOADED:
            out.append(_LOADED[ep.module])
            continue
        dist = getattr(getattr(ep, "dist", None), "name", None)
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - an installed plugin is broken: name it
            where = f"the entry point {ep.name!r} = {ep.value!r} of {dist or 'an installed distribution'}"
            raise ConfigError(f"The crfl plugin {where} (group {GROUP!r}) failed while importing: {type(e).__name__}: {e}. "
                              "Fix or uninstall it (rerun with --debug for the traceback).") from e
        _LOADED[ep.module] = Plugin(ep.module, ENTRY_POINT, entry_point=ep.name, distribution=dist)
        out.append(_LOADED[ep.module])
    return out


def loaded() -> list[dict[str, Any]]:
    """config.yaml's ``provenance.plugins``: every plugin module imported in this process, in order."""
    return [p.to_dict() for p in _LOADED.values()]


def specs() -> list[str]:
    """What ``--plugin`` takes to import this process's ``--plugin`` plugins again (sweep workers)."""
    return [p.spec for p in _LOADED.values() if p.source == FLAG]


def import_recorded(records: Any, where: str) -> None:
    """Import again the plugins a run was trained with (``provenance.plugins`` of its config.yaml).

    A module imported already (by ``--plugin``, an entry point, or the user's Python code) is
    left alone; one that was a ``.py`` file, or that cannot be imported, is a ConfigError naming
    the ``--plugin`` to pass.
    """
    if not isinstance(records, list):
        return
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("module"), str):
            continue
        module = rec["module"]
        if module in sys.modules:
            continue
        if rec.get("file"):
            raise ConfigError(
                f"{where} was trained with the plugin file {rec['file']!r} (module {module!r}); crfl does not run "
                f"files named in a run directory on its own: pass {FLAG} {rec['file']} if you trust it."
            )
        try:
            load(module)
        except ConfigError as e:
            how = (f"the entry point {rec.get('entry_point')!r} of {rec.get('distribution')}"
                   if rec.get("source") == ENTRY_POINT else FLAG)
            raise ConfigError(
                f"{where} was trained with the plugin module {module!r} (from {how}), which cannot be imported here "
                f"({e.__cause__ or e}); pass {FLAG} {module} with its directory on PYTHONPATH, or {FLAG} PATH/TO/{module}.py."
            ) from e
