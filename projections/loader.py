"""Finding projections: the bundled bank projections plus the modules named in REFOLD_APP."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable

from projections.projection import Projection
from streams.errors import ProjectionError

BUNDLED = ("projections.bank",)


def projection_classes(module_name: str) -> list[type[Projection]]:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error while importing user code is a startup error
        raise ProjectionError(
            f"cannot import projection module {module_name!r}: {type(exc).__name__}: {exc}",
            hint="check REFOLD_APP / --app and that the module is on PYTHONPATH",
        ) from exc
    return [
        obj
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Projection)
        and obj is not Projection
        and obj.__module__ == module.__name__
    ]


def load_versions(
    app_modules: Iterable[str] = (), *, bundled: bool = True
) -> dict[str, dict[int, Projection]]:
    """Every projection class by name and version. A module may keep the previous version's
    class beside the new one (same name, lower version) so the live version keeps its own fold
    while the new one is rebuilt; the same name and version twice is an error."""
    modules = [*(BUNDLED if bundled else ()), *app_modules]
    found: dict[str, dict[int, Projection]] = {}
    for module_name in dict.fromkeys(modules):
        for cls in projection_classes(module_name):
            cls.validate()
            versions = found.setdefault(cls.name, {})
            if cls.version in versions:
                other = type(versions[cls.version])
                raise ProjectionError(
                    f"duplicate projection name {cls.name!r} (version {cls.version}): "
                    f"{cls.__module__}.{cls.__qualname__} and "
                    f"{other.__module__}.{other.__qualname__}",
                    hint="give each projection its own name, or bump the version",
                )
            versions[cls.version] = cls()
    return found


def load_projections(app_modules: Iterable[str] = (), *, bundled: bool = True) -> list[Projection]:
    """The newest version of every projection (the code version)."""
    return [
        versions[max(versions)] for versions in load_versions(app_modules, bundled=bundled).values()
    ]
