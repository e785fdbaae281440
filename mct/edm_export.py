"""Write an mct network as an NVlabs/edm network pickle, so that an EDM-format teacher of any resolution can be made
offline (random weights, or any mct network) and the `kind: fetch, arch: edm` path tried without a download.

EDM pickles its networks through ``torch_utils.persistence``: every persistent module pickles as a call
``_reconstruct_persistent_obj(meta)``, with ``meta`` holding the class name, the class's module source, the
constructor arguments and the module's ``__dict__``. This module writes that layout with a stand-in
``torch_utils.persistence`` registered only while pickling; mct.checkpoint.load_edm_pickle reads such a file as inert
data (it never runs the module source or the reconstruct call), rebuilds the network from the recorded arguments
and loads the tensors strictly. The module source written here is a comment, not EDM's code: the file is meant for
mct's loader, not for EDM's own (which would execute the source to recreate the classes).
"""

from __future__ import annotations

import pickle
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from mct.io import atomic_path

MODULE_SRC = "# written by mct.edm_export: the classes are mct.nets.edm's; mct's loader never runs this source\n"
PERSISTENCE = "torch_utils.persistence"


class Persisted:
    """Pickles ``obj`` the way EDM's ``persistent_class.__reduce__`` does: ``_reconstruct_persistent_obj(meta)``,
    with every submodule persisted too (EDM decorates its blocks and layers as well)."""

    def __init__(self, obj: Any, class_name: str, module_src: str = MODULE_SRC,
                 init_kwargs: dict | None = None) -> None:
        self.obj, self.class_name, self.module_src, self.init_kwargs = obj, class_name, module_src, init_kwargs

    def __reduce__(self):
        state = dict(self.obj.__dict__)
        if "_modules" in state:
            state["_modules"] = {k: persist_child(m, self.module_src) for k, m in state["_modules"].items()}
        state["_init_args"] = ()
        state["_init_kwargs"] = self.init_kwargs
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=state)
        reconstruct = sys.modules[PERSISTENCE]._reconstruct_persistent_obj
        return reconstruct, (meta,)


def persist_child(m: nn.Module | Persisted | None, module_src: str = MODULE_SRC) -> Any:
    """A submodule as EDM pickles it: persisted, except torch's own containers (ModuleDict/ModuleList), which pickle
    normally and hold persisted children."""
    if m is None or isinstance(m, Persisted):
        return m
    if isinstance(m, (nn.ModuleDict, nn.ModuleList)):
        clone = type(m).__new__(type(m))
        clone.__dict__.update(m.__dict__)
        clone.__dict__["_modules"] = {k: persist_child(v, module_src) for k, v in m._modules.items()}
        return clone
    return Persisted(m, type(m).__name__, module_src, init_kwargs={})


def _refuse(meta: dict) -> None:  # stands in for EDM's function; only a loader that runs pickles would call it
    raise RuntimeError("this EDM pickle was written by mct.edm_export for mct's restricted loader")


def dump_persisted(path: Path, data: dict, reconstruct: Callable[[dict], Any] = _refuse) -> None:
    """pickle.dump(data) to ``path`` (atomically) with a stand-in ``torch_utils.persistence`` whose
    ``_reconstruct_persistent_obj`` is ``reconstruct``, registered only while dumping."""
    reconstruct.__module__ = PERSISTENCE
    reconstruct.__qualname__ = reconstruct.__name__ = "_reconstruct_persistent_obj"
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType(PERSISTENCE)
    mod._reconstruct_persistent_obj = reconstruct
    saved = {k: sys.modules.get(k) for k in ("torch_utils", PERSISTENCE)}
    sys.modules.update({"torch_utils": pkg, PERSISTENCE: mod})
    try:
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            pickle.dump(data, f)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_edm_network(path: Path, model: nn.Module, model_kwargs: dict[str, Any], precond: str = "EDMPrecond",
                      precond_kwargs: dict[str, Any] | None = None) -> None:
    """An EDM network pickle ``{'ema': <precond>}`` of the raw network ``model`` (an mct.nets.edm SongUNet or
    DhariwalUNet built with ``model_kwargs``), wrapped in EDM's preconditioner ``precond`` with its constructor
    arguments ``precond_kwargs`` (img_resolution, img_channels, label_dim, sigma_data, ...)."""
    wrapper = nn.Module()
    wrapper.model = model
    state = dict(wrapper.__dict__)
    state["_modules"] = {"model": Persisted(model, type(model).__name__, init_kwargs=dict(model_kwargs))}
    ema = Persisted(types.SimpleNamespace(**state), precond,
                    init_kwargs={"model_type": type(model).__name__, "use_fp16": False, **(precond_kwargs or {})})
    dump_persisted(path, {"ema": ema, "augment_pipe": None})
