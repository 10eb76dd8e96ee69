"""The package's public names load on first use (PEP 562): `import refold` imports none of the
API's modules, and every name of `__all__` is there, the same object as in its home module."""

from __future__ import annotations

import subprocess
import sys

import pytest
import refold


def test_every_public_name_imports_and_is_its_home_modules_object() -> None:
    assert sorted(refold.__all__) == sorted(refold._HOMES)
    for name in refold.__all__:
        namespace: dict[str, object] = {}
        exec(f"from refold import {name}", namespace)  # the way users import it
        value = namespace[name]
        home = sys.modules[refold._HOMES[name]]
        assert value is getattr(home, name)
    assert set(refold.__all__) <= set(dir(refold))


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from refold import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(refold.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Publishr'"):
        _ = refold.Publishr  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        exec("from refold import Publishr", {})


def test_import_refold_alone_loads_no_api_module() -> None:
    """In a fresh interpreter: nothing of the API (nor confluent_kafka) until a name is used."""
    probe = (
        "import sys, refold\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('refold.', 'confluent_kafka')))\n"
        "print(','.join(loaded))\n"
        "refold.Publisher\n"
        "print('refold.kafka.publisher' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded, publisher_loaded = done.stdout.splitlines()
    assert loaded == ""
    assert publisher_loaded == "True"
