"""params.yaml's world ``kind`` -> its :class:`~mct.worlds.base.World` class: the one place a kind is named.

The built-in worlds are listed below as ``"module:Class"`` and imported when their kind is first looked up
(:func:`world_class`), so importing the registry imports no world: a stage's code then follows only the world it
runs (mct.stages.code_deps), not every world's networks and data code. A new world registers itself where it is
defined::

    @register("sphere")
    class Sphere(World): ...

and is then valid in params.yaml (``kind: sphere``) and runs through every stage. A world defined outside mct needs
no edit of mct either, in one of two ways:

* ``kind: "mypkg.worlds:Sphere"`` in params.yaml: the class of that importable module (installed, or its folder on
  PYTHONPATH), imported when the kind is first looked up;
* an entry point of group ``mct.worlds`` in the package's metadata (``sphere = "mypkg.worlds:Sphere"`` under
  ``[project.entry-points."mct.worlds"]``): then ``kind: sphere``.

Torch-free: params validation and the stage table look classes up here while Snakemake parses the workflow.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterator, Mapping

from mct.config import WorldConfig
from mct.worlds.base import World

# kind -> "module:Class", imported on lookup; the module names are data here, not imports (mct.stages adds a
# world's module to the code of the jobs that run that world)
BUILTIN: dict[str, str] = {
    "toy2d": "mct.worlds.toy2d:Toy2D",
    "digits": "mct.worlds.digits:Digits",
    "imagenet": "mct.worlds.imagenet:ImageNet",
    "cifar10": "mct.worlds.cifar10:Cifar10",
    "text2image": "mct.worlds.text2image:Text2Image",
}
ENTRY_POINT_GROUP = "mct.worlds"  # installed packages name their worlds here: kind -> "module:Class"


def is_spec(kind: str) -> bool:
    """Whether a kind is itself a class's "module:Class" (a world outside mct, named where it is defined)."""
    module, sep, name = kind.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and name.isidentifier()


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _import_class(kind: str, spec: str) -> type[World]:
    module, _, name = spec.partition(":")
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        raise WorldImportError(f"world kind {kind!r}: cannot import module {module!r} ({err}); a world outside mct "
                               "must be importable: install its package, or put the folder that holds it on "
                               "PYTHONPATH") from err
    cls = getattr(found, name, None)
    if cls is None:
        raise WorldImportError(f"world kind {kind!r}: module {module!r} has no {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, World)):
        raise WorldImportError(f"world kind {kind!r}: {spec} is not a World subclass (mct.worlds.base.World)")
    return cls


class _Worlds(Mapping[str, type[World]]):
    """kind -> class. Membership, iteration and len never import a module (they may read installed packages'
    entry points); ``WORLDS[kind]`` imports the world's module on first use and caches the class."""

    def __init__(self, specs: dict[str, str]) -> None:
        self._entries: dict[str, str | type[World]] = dict(specs)

    def __getitem__(self, kind: str) -> type[World]:
        if not self._find(kind):
            raise KeyError(kind)
        entry = self._entries[kind]
        if isinstance(entry, str):
            try:
                cls = _import_class(kind, entry)
            except WorldImportError:
                if kind not in BUILTIN:  # a wrong name is not a kind: it leaves no entry behind
                    del self._entries[kind]
                raise
            if "kind" not in vars(cls):  # a class keeps its first kind (a built-in one named as "module:Class")
                cls.kind = kind
            self._entries[kind] = entry = cls
        return entry

    def _find(self, kind: object) -> bool:
        """Known, or found now: a "module:Class" kind is its own spec; another unknown kind may be an installed
        package's entry point (looked up on first use, never at import)."""
        if not isinstance(kind, str):
            return False
        if kind in self._entries:
            return True
        spec = kind if is_spec(kind) else _entry_points().get(kind)
        if spec is not None:
            self._entries[kind] = spec
        return spec is not None

    def __contains__(self, kind: object) -> bool:
        return self._find(kind)

    def __iter__(self) -> Iterator[str]:
        for name, spec in _entry_points().items():  # the kinds a params file may name now, installed ones included
            self._entries.setdefault(name, spec)
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def spec(self, kind: str) -> str:
        """``"module:Class"`` of a kind, without importing it."""
        self._find(kind)
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


class WorldImportError(ValueError):
    """A world kind names a class that cannot be imported, or that is not a World."""


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


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "WORLDS", "World", "WorldImportError", "is_spec", "make_world", "register",
           "unregister", "world_class", "world_module"]
