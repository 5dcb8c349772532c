"""Registries of pluggable parts (datasets, aggregators): a name, the part and a one-line description.

A registry is a plain ``dict[name, (part, description)]`` owned by the module whose parts it
holds; these functions are the one implementation of registering, listing, describing and
looking up, so every registry answers an unknown name the same way, listing the valid ones.
The dict stays a module attribute (not wrapped in an object) so that a test can swap it for a
copy and register parts of its own without touching the module's registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from crfl.validation import check_choice

T = TypeVar("T")

Entries = dict[str, tuple[T, str]]


def register(entries: Entries[T], name: str, description: str) -> Callable[[T], T]:
    """Decorator: ``entries[name] = (part, description)``; returns the part unchanged."""

    def deco(part: T) -> T:
        entries[name] = (part, description)
        return part

    return deco


def names(entries: Entries[T]) -> list[str]:
    """The registered names, sorted."""
    return sorted(entries)


def describe(entries: Entries[T]) -> dict[str, str]:
    """Name -> description, sorted by name."""
    return {k: v[1] for k, v in sorted(entries.items())}


def lookup(entries: Entries[T], kind: str, name: str) -> T:
    """The part registered as ``name``; an unknown name is a ConfigError naming ``kind`` and listing the valid names."""
    check_choice(kind, name, names(entries))
    return entries[name][0]
