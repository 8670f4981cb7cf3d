"""`load_factory` and `build_plugin`: the one way a user's class is found and built for a plug-in point (retrievers,
solver rewards, judges).

A plug-in is named either by an entry point of the point's group (an installed package registers it in its
pyproject, so a config names it by a short name) or directly as "package.module:ClassName". Errors name the config
key, what was tried and how to fix it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any


def load_factory(name: str, *, group: str, key: str, builtin: tuple[str, ...],
                 error: type[Exception]) -> Callable[..., Any]:
    """The class (or factory) that `name` names: an entry point of `group`, else "package.module:ClassName".
    `key` is the config key that holds `name` and `builtin` its built-in choices (both for the messages); failures
    raise `error`."""
    if ":" not in name:
        for ep in entry_points(group=group, name=name):
            try:
                return ep.load()  # type: ignore[no-any-return]
            except (ImportError, AttributeError) as e:
                raise error(f"entry point {name!r} in group {group!r} ({ep.value}) failed to load: {e}") from None
        installed = sorted(ep.name for ep in entry_points(group=group))
        raise error(f"{key} = {name!r} is not known; use one of {list(builtin)}, an entry point of group {group!r} "
                    f"(installed: {installed or 'none'}), or 'package.module:ClassName'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise error(f"{key} = {name!r}: cannot import module {module_name!r} ({e}); install it or fix the name") \
            from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise error(f"{key} = {name!r}: module {module_name!r} has no class {attr!r}; write "
                    "'package.module:ClassName'")
    return factory  # type: ignore[no-any-return]


def build_plugin(name: str, options: dict[str, Any], *, group: str, key: str, options_key: str,
                 builtin: tuple[str, ...], error: type[Exception]) -> Any:
    """The plug-in `name` names (see `load_factory`), built with `options` as keyword arguments; a constructor that
    does not take them raises `error` naming both config keys (`key` holds the name, `options_key` the options)."""
    factory = load_factory(name, group=group, key=key, builtin=builtin, error=error)
    try:
        return factory(**options)
    except TypeError as e:
        raise error(f"{key} = {name!r} could not be constructed with {options_key} {options!r}: {e}; make the "
                    "options match its constructor's keyword arguments") from None
