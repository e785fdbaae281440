"""params.yaml's world ``kind`` -> its :class:`~mct.worlds.base.World` class: the one place a kind is named.

The built-in worlds are listed below as ``"module:Class"`` and imported when their kind is first looked up
(:func:`world_class`), so importing the registry imports no world: a stage's code then follows only the world it
runs (mct.stages.code_deps), not every world's networks and data code. A new world registers itself where it is
defined::

    @register("sphere")
    class Sphere(World): ...

and is then valid in params.yaml (``kind: sphere``) and runs through every stage. Torch-free: params validation
and the stage table look classes up here while Snakemake parses the workflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping

from mct.config import WorldConfig
from mct.worlds.base import World

# kind -> "module:Class", imported on lookup; the module names are data here, not imports (mct.stages adds a
# world's module to the code of the jobs that run that world)
BUILTIN: dict[str, str] = {
    "toy2d": "mct.worlds.toy2d:Toy2D",
    "digits": "mct.worlds.digits:Digits",
    "imagenet": "mct.worlds.imagenet:ImageNet",
    "text2image": "mct.worlds.text2image:Text2Image",
}


class _Worlds(Mapping[str, type[World]]):
    """kind -> class. Membership, iteration and len never import; ``WORLDS[kind]`` imports a built-in world's
    module on first use and caches the class."""

    def __init__(self, specs: dict[str, str]) -> None:
        self._entries: dict[str, str | type[World]] = dict(specs)

    def __getitem__(self, kind: str) -> type[World]:
        entry = self._entries[kind]
        if isinstance(entry, str):
            module, _, name = entry.partition(":")
            cls = getattr(importlib.import_module(module), name)
            if not (isinstance(cls, type) and issubclass(cls, World)):
                raise TypeError(f"world kind {kind!r}: {entry} is not a World subclass")
            cls.kind = kind
            self._entries[kind] = entry = cls
        return entry

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def spec(self, kind: str) -> str:
        """``"module:Class"`` of a kind, without importing it."""
        entry = self._entries[kind]
        return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"

    def add(self, kind: str, cls: type[World]) -> None:
        """A kind names one class: the same class again (or a built-in's own class, its "module:Class") is a no-op,
        another class is refused."""
        entry = self._entries.get(kind, cls)
        same = entry is cls if isinstance(entry, type) else entry == f"{cls.__module__}:{cls.__qualname__}"
        if not same:
            raise ValueError(f"world kind {kind!r} is already registered to {self.spec(kind).partition(':')[2]}")
        cls.kind = kind
        self._entries[kind] = cls

    def remove(self, kind: str) -> None:
        self._entries.pop(kind, None)


WORLDS = _Worlds(BUILTIN)


def register(kind: str) -> Callable[[type[World]], type[World]]:
    """Class decorator: params.yaml's ``kind: <kind>`` builds this class. A kind names one class: registering it
    again for another class is refused (a typo would otherwise replace a world silently)."""
    def add(cls: type[World]) -> type[World]:
        if not (isinstance(cls, type) and issubclass(cls, World)):
            raise TypeError(f"register({kind!r}): {cls!r} is not a World subclass")
        WORLDS.add(kind, cls)
        return cls
    return add


def unregister(kind: str) -> None:
    """Forget a kind (tests that register a world of their own clean up with this)."""
    WORLDS.remove(kind)


def world_class(kind: str) -> type[World]:
    """The class of a kind; a built-in world's module is imported here, on first use."""
    if kind not in WORLDS:
        raise ValueError(f"unknown world kind {kind!r}; registered: {sorted(WORLDS)}")
    return WORLDS[kind]


def world_module(kind: str) -> str:
    """The module that defines a kind's class (``mct.worlds.toy2d``), without importing it."""
    if kind not in WORLDS:
        raise ValueError(f"unknown world kind {kind!r}; registered: {sorted(WORLDS)}")
    return WORLDS.spec(kind).partition(":")[0]


def make_world(name: str, cfg: WorldConfig) -> World:
    """The world ``name`` of params.yaml, built from its config."""
    return world_class(cfg.kind)(name, cfg)


__all__ = ["BUILTIN", "WORLDS", "World", "make_world", "register", "unregister", "world_class", "world_module"]
