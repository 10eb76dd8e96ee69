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


def load_projections(app_modules: Iterable[str] = (), *, bundled: bool = True) -> list[Projection]:
    """Instantiate every projection; clear errors for malformed or duplicate ones."""
    modules = [*(BUNDLED if bundled else ()), *app_modules]
    found: dict[str, Projection] = {}
    for module_name in dict.fromkeys(modules):
        for cls in projection_classes(module_name):
            cls.validate()
            if cls.name in found:
                other = type(found[cls.name])
                raise ProjectionError(
                    f"duplicate projection name {cls.name!r}: {cls.__module__}.{cls.__qualname__} "
                    f"and {other.__module__}.{other.__qualname__}",
                    hint="give each projection its own name",
                )
            found[cls.name] = cls()
    return list(found.values())
