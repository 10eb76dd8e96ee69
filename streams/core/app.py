"""Finding a user's app: the projections, deciders, task queues, sagas and schema folders of the
REFOLD_APP modules.

Nothing is bundled: a worker runs exactly the modules it is given (`REFOLD_APP`, `--app`). The
bank example is such a module, `refold.examples.bank`, loaded only when named.

What a module contributes: when it defines `__all__` (a package re-exporting its parts, like the
bank example), the classes listed there; otherwise the classes defined in the module itself (not
the ones it imports). A module may also set `SCHEMAS_DIRS` (paths of `.avsc` folders) for the
event types it uses, which join REFOLD_SCHEMAS_DIR when events are encoded and decoded.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from refold.core.commands import Decider
from refold.core.errors import CommandError, ProjectionError, SagaError, TaskError
from refold.core.projection import Projection
from refold.core.sagas import Saga
from refold.core.tasks import TaskQueue

T = TypeVar("T")
N = TypeVar("N")


def import_app(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # any error while importing user code is a startup error
        raise ProjectionError(
            f"cannot import app module {module_name!r}: {type(exc).__name__}: {exc}",
            hint="check REFOLD_APP / --app and that the module is on PYTHONPATH",
        ) from exc


def classes_of(module: ModuleType, base: type[T]) -> list[type[T]]:
    """The subclasses of `base` the module contributes (see the module docstring)."""
    exported = getattr(module, "__all__", None)
    if exported is not None:
        members = [getattr(module, name, None) for name in exported]
    else:
        members = [
            obj
            for _, obj in inspect.getmembers(module, inspect.isclass)
            if obj.__module__ == module.__name__
        ]
    return [
        obj for obj in members if inspect.isclass(obj) and issubclass(obj, base) and obj is not base
    ]


def projection_classes(module_name: str) -> list[type[Projection]]:
    return classes_of(import_app(module_name), Projection)


def load_versions(app_modules: Iterable[str] = ()) -> dict[str, dict[int, Projection]]:
    """Every projection class by name and version. A module may keep the previous version's
    class beside the new one (same name, lower version) so the live version keeps its own fold
    while the new one is rebuilt; the same name and version twice is an error."""
    found: dict[str, dict[int, Projection]] = {}
    for module_name in dict.fromkeys(app_modules):
        for cls in projection_classes(module_name):
            cls.validate()
            versions = found.setdefault(cls.name, {})
            other = versions.get(cls.version)
            if other is not None and type(other) is not cls:
                raise ProjectionError(
                    f"duplicate projection name {cls.name!r} (version {cls.version}): "
                    f"{cls.__module__}.{cls.__qualname__} and "
                    f"{type(other).__module__}.{type(other).__qualname__}",
                    hint="give each projection its own name, or bump the version",
                )
            versions.setdefault(cls.version, cls())
    return found


def load_projections(app_modules: Iterable[str] = ()) -> list[Projection]:
    """The newest version of every projection (the code version)."""
    return [versions[max(versions)] for versions in load_versions(app_modules).values()]


def _load_named(
    app_modules: Iterable[str],
    base: type[N],
    error: type[Exception],
    kind: str,
    hint: str,
    skip_unnamed: bool = False,
) -> dict[str, N]:
    """One instance of every `base` subclass the named modules contribute, by its `name`; two
    classes with one name are an error. A class without a name fails its own validation, or is
    skipped as abstract when `skip_unnamed` (deciders)."""
    found: dict[str, N] = {}
    for module_name in dict.fromkeys(app_modules):
        for cls in classes_of(import_app(module_name), base):
            if skip_unnamed and not getattr(cls, "name", None):
                continue
            cls.validate()  # type: ignore[attr-defined]
            name = cls.name  # type: ignore[attr-defined]
            if name in found and type(found[name]) is not cls:
                raise error(f"two {kind} are named {name!r}", hint=hint)  # type: ignore[call-arg]
            found.setdefault(name, cls())
    return found


def load_deciders(app_modules: Iterable[str] = ()) -> dict[str, Decider]:
    """Every decider the named modules contribute, by name."""
    hint = "give each aggregate its own name"
    return _load_named(app_modules, Decider, CommandError, "deciders", hint, skip_unnamed=True)


def load_task_queues(app_modules: Iterable[str] = ()) -> dict[str, TaskQueue]:
    """Every task queue the named modules contribute, by name."""
    hint = "give each queue its own name"
    return _load_named(app_modules, TaskQueue, TaskError, "task queues", hint)


def load_sagas(app_modules: Iterable[str] = ()) -> dict[str, Saga]:
    """Every saga the named modules contribute, by name."""
    return _load_named(app_modules, Saga, SagaError, "sagas", "give each saga its own name")


def schema_dirs(app_modules: Iterable[str] = ()) -> list[Path]:
    """The `.avsc` folders the named modules declare in `SCHEMAS_DIRS`."""
    dirs: list[Path] = []
    for module_name in dict.fromkeys(app_modules):
        declared = getattr(import_app(module_name), "SCHEMAS_DIRS", ())
        dirs.extend(Path(str(d)) for d in declared)
    return dirs
