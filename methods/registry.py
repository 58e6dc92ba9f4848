"""The method registry: one line per method, its name -> its package (a leaf module: it imports nothing of the
project, so ``utils/options.py`` can build the one option table from it).

A method package ``methods/<name>/`` holds two modules the core reaches through this registry:
- ``options.py`` (imports nothing above ``utils/``): the method's option group (``add_options``), its loss names
  (``LOSSES``), its checks (``check_options``) and its defaults (``DEFAULTS``), read by ``utils/options.py``;
- ``method.py``: ``METHOD``, a :class:`methods.base.Method` (model builder, parameter groups, training hooks,
  retrieval feature sets, checkpoint formats, test-time preprocessing), read by the trainer, the evaluator, the
  solver, the data pipeline and the search package, which name no method.

Adding a method is one line here plus its package (README "Adding a method").
"""
from __future__ import annotations

import importlib
from types import ModuleType

# name -> package. The first method is the default (--method); the order is the order of the option groups.
METHODS = {
    "irra": "methods.irra",
    "rde": "methods.rde",
    "clip_itc": "methods.clip_itc",
}
DEFAULT_METHOD = next(iter(METHODS))


def check_method(name: str) -> None:
    """Raise ``ValueError('--method x: unknown; valid: [...]')`` unless ``name`` is registered."""
    if name not in METHODS:
        raise ValueError(f"--method {name!r}: unknown; valid: {list(METHODS)}")


def method_options(name: str) -> ModuleType:
    """The ``options`` module of method ``name`` (its option group, loss names, checks, defaults)."""
    check_method(name)
    return importlib.import_module(METHODS[name] + ".options")


def get_method(name: str):
    """The :class:`methods.base.Method` of method ``name`` (``METHOD`` of its package's ``method.py``)."""
    check_method(name)
    return importlib.import_module(METHODS[name] + ".method").METHOD
