"""Safe checkpoint loading: EDM's persistence pickles and plain state-dict checkpoints.

EDM's ``.pkl`` files (NVlabs/edm) pickle ``torch_utils.persistence`` objects: each network object is stored
as a call ``_reconstruct_persistent_obj(meta)`` where ``meta = dict(type='class', version, module_src,
class_name, state)`` carries the *source code* of the module that defined the class, and ``state`` is the
object's ``__dict__`` (``_modules``, ``_parameters``, ``_buffers``, plain attributes and the recorded
``_init_args``/``_init_kwargs``). Unpickling them the usual way executes that source. Here a restricted
unpickler resolves only an allow-list of globals; ``_reconstruct_persistent_obj`` becomes a function that
returns a :class:`PersistentRecord` (never running ``module_src``), and tensors stored through
``torch.storage._load_from_bytes`` are read with ``torch.load(weights_only=True)``. Everything else a
pickle asks for (``os.system``, ``builtins.eval``, unknown classes, persistent ids) is refused with
:class:`UnsafeCheckpointError` before it can run. The records are then mapped onto mct's reimplementations
(:mod:`mct.nets.edm`, :class:`mct.diffusion.EDMPrecond`) and their tensors loaded by name, strictly.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from mct.diffusion import EDMPrecond
from mct.errors import CheckpointError, ChecksumMismatch
from mct.fetch import sha256_file
from mct.nets.edm import IDDPMPrecond, VEPrecond, VPPrecond, build_network
from mct.nets.weights import load_state_strict


class UnsafeCheckpointError(CheckpointError):
    """The file asked for something outside the allow-list (code execution, unknown classes)."""


def verify_sha256(path: str | os.PathLike, expected: str | None) -> str:
    """Return the file's sha256; raise :class:`mct.errors.ChecksumMismatch` if ``expected`` is given and differs."""
    actual = sha256_file(path)
    if expected is not None and actual != expected.strip().lower():
        raise ChecksumMismatch(f"{path}: sha256 is {actual}, expected {expected}; refusing to load it")
    return actual


# --- records of persisted objects -------------------------------------------------------------------


@dataclass(repr=False)
class PersistentRecord:
    """What a persisted EDM module holds, as inert data: its class name, recorded constructor arguments,
    plain attributes, and its submodules/parameters/buffers (recursively records/tensors).

    ``module_src`` is the embedded source code, kept as text and never executed; it is None for plain torch
    containers (``ModuleDict`` etc.). EDM's meta names the class but not its module, so there is no module name.
    """

    class_name: str
    module_src: str | None = None
    version: int | None = None
    init_args: tuple | None = None
    init_kwargs: dict | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, PersistentRecord | None] = field(default_factory=dict)
    parameters: dict[str, Tensor | None] = field(default_factory=dict)
    buffers: dict[str, Tensor | None] = field(default_factory=dict)
    non_persistent_buffers: set[str] = field(default_factory=set)

    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Parameters and persistent buffers by dotted name, as ``nn.Module.state_dict`` would list them."""
        out: dict[str, Tensor] = {}
        for name, p in self.parameters.items():
            if p is not None:
                out[prefix + name] = p
        for name, b in self.buffers.items():
            if b is not None and name not in self.non_persistent_buffers:
                out[prefix + name] = b
        for name, m in self.modules.items():
            if m is not None:
                out.update(m.state_dict(prefix + name + "."))
        return out

    def named_parameters(self, prefix: str = "") -> dict[str, Tensor]:
        out = {prefix + n: p for n, p in self.parameters.items() if p is not None}
        for name, m in self.modules.items():
            if m is not None:
                out.update(m.named_parameters(prefix + name + "."))
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.named_parameters().values())

    def num_buffer_elements(self) -> int:
        params = self.named_parameters()
        return sum(t.numel() for k, t in self.state_dict().items() if k not in params)

    def __repr__(self) -> str:
        subs = ", ".join(f"{k}: {m.class_name if m else None}" for k, m in self.modules.items())
        return (f"PersistentRecord({self.class_name}, params={self.num_parameters()}, "
                f"init_kwargs={self.init_kwargs!r}, modules={{{subs}}})")


def _as_record(obj: Any, where: str) -> PersistentRecord | None:
    if obj is None or isinstance(obj, PersistentRecord):
        return obj
    if isinstance(obj, _TorchModuleStub):
        return obj.record()
    raise CheckpointError(f"{where}: expected a module, found {type(obj).__name__}")


def _record_from_state(class_name: str, state: Any, module_src: str | None = None,
                       version: int | None = None) -> PersistentRecord:
    if not isinstance(state, dict):
        raise CheckpointError(f"{class_name}: object state must be a dict, got {type(state).__name__}")

    def tensors(key: str) -> dict[str, Tensor | None]:
        d = state.get(key) or {}
        if not isinstance(d, dict) or not all(v is None or isinstance(v, Tensor) for v in d.values()):
            raise CheckpointError(f"{class_name}.{key} must map names to tensors")
        return {str(k): v for k, v in d.items()}

    mods = state.get("_modules") or {}
    if not isinstance(mods, dict):
        raise CheckpointError(f"{class_name}._modules must be a dict")
    init_args = state.get("_init_args")
    init_kwargs = state.get("_init_kwargs")
    return PersistentRecord(
        class_name=class_name,
        module_src=module_src,
        version=version,
        init_args=tuple(init_args) if init_args is not None else None,
        init_kwargs=dict(init_kwargs) if init_kwargs is not None else None,
        # torch's bookkeeping (_parameters, hooks, ...) starts with '_'; what remains is the class's own data
        attributes={k: v for k, v in state.items() if not k.startswith("_")},
        modules={str(k): _as_record(m, f"{class_name}.{k}") for k, m in mods.items()},
        parameters=tensors("_parameters"),
        buffers=tensors("_buffers"),
        non_persistent_buffers=set(state.get("_non_persistent_buffers_set") or ()),
    )


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: record, never exec ``module_src``."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafeCheckpointError("persistent object meta is not a dict with type='class'; refusing it")
    class_name = meta.get("class_name")
    src = meta.get("module_src")
    if not isinstance(class_name, str) or not isinstance(src, (str, type(None))):
        raise CheckpointError("persistent object meta lacks a class_name string")
    return _record_from_state(class_name, meta.get("state"), module_src=src, version=meta.get("version"))


class _TorchModuleStub:
    """Placeholder for a plain torch container (``ModuleDict`` ...): pickle calls ``__new__`` then
    ``__setstate__(__dict__)``; we keep the dict and never construct the real class."""

    class_name = "Module"

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def record(self) -> PersistentRecord:
        return _record_from_state(self.class_name, getattr(self, "_state", {}))


def _stub(name: str) -> type:
    return type(name, (_TorchModuleStub,), {"class_name": name})


# --- allow-listed reconstructors --------------------------------------------------------------------


def _load_storage_from_bytes(b: bytes) -> Any:
    """``torch.storage._load_from_bytes`` without its ``weights_only=False``."""
    if not isinstance(b, (bytes, bytearray)):
        raise UnsafeCheckpointError("_load_from_bytes expects bytes")
    try:
        storage = torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"embedded tensor storage refused by torch.load(weights_only=True): {e}") from e
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafeCheckpointError(f"embedded storage decoded to {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> Tensor:
    if not isinstance(storage, torch.TypedStorage):
        raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if backward_hooks:  # hooks are callables: nothing legitimate stores them in a checkpoint
        raise UnsafeCheckpointError("tensor carries backward hooks; refusing it")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, bool(requires_grad),
                                           collections.OrderedDict(), metadata)


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any) -> nn.Parameter:
    if not isinstance(data, Tensor):
        raise UnsafeCheckpointError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    if backward_hooks:
        raise UnsafeCheckpointError("parameter carries backward hooks; refusing it")
    return nn.Parameter(data, requires_grad=bool(requires_grad))


def _np_multiarray() -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 moved numpy.core to numpy._core
    return core.multiarray


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError("numpy scalar of object dtype refused")
    return _np_multiarray().scalar(dtype, data)


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    if subtype is not np.ndarray:
        raise UnsafeCheckpointError(f"numpy array subtype {subtype!r} refused")
    return _np_multiarray()._reconstruct(subtype, shape, dtype)


def _codecs_encode(obj: str, encoding: str = "latin1") -> bytes:
    """Protocol-2 pickles store bytes as ``_codecs.encode(text, 'latin1')``."""
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise UnsafeCheckpointError(f"_codecs.encode with {encoding!r} refused")
    return obj.encode(encoding)


class _EasyDict(dict):
    """dnnlib.EasyDict as a plain dict (attribute access is not needed to read it)."""


_TORCH_DTYPES = ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
                 "half", "float", "double", "long", "int", "short", "complex64", "complex128")

SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    **{("torch", name): getattr(torch, name) for name in _TORCH_DTYPES},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    **{("builtins", t.__name__): t for t in (set, frozenset, list, dict, tuple, int, float, complex, str, bytes,
                                             bytearray, bool, slice)},
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    **{(m, "scalar"): _np_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_reconstruct"): _np_reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{("torch.nn.modules.container", n): _stub(n) for n in ("ModuleDict", "ModuleList", "Sequential")},
}


# --- allocation budget ------------------------------------------------------------------------------

# A pickle can ask a constructor for memory of any size in a few bytes (``bytearray(2_000_000_000)`` is 38 bytes).
# Honest checkpoints never size a container by an integer argument: bytes come from the file's own data and
# numpy arrays are reconstructed empty, then filled from it. So every allocation a pickle can request is held
# to a budget proportional to the file: BUDGET_FACTOR times its size plus BUDGET_FLOOR (a list built from a
# budget-sized bytearray costs 8 bytes per element, so the worst case stays a small multiple of the budget).
BUDGET_FACTOR = 4
BUDGET_FLOOR = 1 << 20


def allocation_budget(file_size: int) -> int:
    return BUDGET_FACTOR * max(0, file_size) + BUDGET_FLOOR


def _file_size(f: BinaryIO) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pos = f.tell()
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(pos)
        return size


def _refuse_size(what: str, n: int, budget: int) -> None:
    raise UnsafeCheckpointError(f"the pickle asks for {what} of size {n:,}, beyond this file's allocation budget "
                                f"of {budget:,}; refusing it (a memory bomb?)")


def _sized_builtin(cls: type) -> Any:
    """``cls`` (bytes, bytearray, list, ...) refusing an integer size or an argument longer than the budget."""

    def bounded(budget: int) -> Any:
        def make(*args: Any) -> Any:
            if args:
                a = args[0]
                if isinstance(a, int) and not isinstance(a, bool):
                    n = a if cls in (bytes, bytearray) else 0  # bytes(n): n zero bytes; str(n) is small
                else:
                    n = len(a) if hasattr(a, "__len__") else 0
                if n > budget:
                    _refuse_size(cls.__name__, n, budget)
            return cls(*args)

        return make

    return bounded


def _bounded_np_reconstruct(budget: int) -> Any:
    def make(subtype: Any, shape: Any, dtype: Any) -> Any:
        dims = shape if isinstance(shape, (tuple, list)) else (shape,)
        if not all(isinstance(d, int) and d >= 0 for d in dims):
            raise UnsafeCheckpointError(f"numpy array of shape {shape!r} refused")
        n = int(np.prod([*dims, 1], dtype=object)) * max(1, getattr(np.dtype(dtype), "itemsize", 1))
        if n > budget:
            _refuse_size("a numpy array (bytes)", n, budget)
        return _np_reconstruct(subtype, shape, dtype)

    return make


_SIZED: dict[tuple[str, str], Any] = {
    **{("builtins", t.__name__): _sized_builtin(t) for t in (bytes, bytearray, list, tuple, set, frozenset, dict,
                                                             str)},
    **{(m, "_reconstruct"): _bounded_np_reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
}


# BUILD (setstate) is allowed only on fresh instances of these types, never on an allow-listed class or
# function itself: a crafted BUILD could otherwise setattr on them and change them for the whole process.
_BUILDABLE = (_TorchModuleStub, _EasyDict, collections.OrderedDict, np.dtype, np.ndarray)


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only :data:`SAFE_GLOBALS`; anything else raises :class:`UnsafeCheckpointError`.

    It subclasses the pure-Python ``pickle.Unpickler`` implementation so that BUILD can be checked as well.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f: BinaryIO, budget: int | None = None) -> None:
        super().__init__(f)
        self.budget = allocation_budget(_file_size(f)) if budget is None else budget

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SIZED:
            return _SIZED[(module, name)](self.budget)
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"checkpoint requests the global {module}.{name}, which is not on the allow-list; refusing to "
                "load it (it could run code)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"unexpected persistent id {pid!r} (a torch.save file? use load_state_checkpoint)")

    def load_build(self) -> None:
        inst = self.stack[-2]
        if not isinstance(inst, _BUILDABLE):
            raise UnsafeCheckpointError(f"refusing to set the state of {type(inst).__name__} {inst!r:.60}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _finalize(obj: Any) -> Any:
    """Turn top-level torch-container stubs into records (those under persisted objects already are)."""
    if isinstance(obj, _TorchModuleStub):
        return obj.record()
    if isinstance(obj, dict):
        return {k: _finalize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_finalize(v) for v in obj)
    return obj


def restricted_load(f: BinaryIO) -> Any:
    """Unpickle from an open binary file with :class:`RestrictedUnpickler` (allocations within
    :func:`allocation_budget` of the file's size)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        try:
            return _finalize(RestrictedUnpickler(f).load())
        except CheckpointError:
            raise
        except Exception as e:  # malformed input surfaces as many exception types inside the unpickler
            raise CheckpointError(f"not a readable pickle: {type(e).__name__}: {e}") from e


def load_pickle_restricted(path: str | os.PathLike) -> Any:
    """Unpickle a file with the restricted unpickler; EDM persistent objects come back as records."""
    with open(path, "rb") as f:
        return restricted_load(f)


# --- records -> mct modules -------------------------------------------------------------------------

# EDM's preconditioner constructors: positional parameter order and the default model_type.
_PRECOND_ARGS = {
    "EDMPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                    "sigma_data", "model_type"), "DhariwalUNet"),
    "VPPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "beta_d", "beta_min", "M",
                   "epsilon_t", "model_type"), "SongUNet"),
    "VEPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                   "model_type"), "SongUNet"),
    "iDDPMPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "C_1", "C_2", "M", "model_type"),
                     "DhariwalUNet"),
}
_NET_ARGS = ("img_resolution", "in_channels", "out_channels")


def _bind(names: tuple[str, ...], args: tuple | None, kwargs: dict | None, where: str) -> dict:
    args = tuple(args or ())
    if len(args) > len(names):
        raise CheckpointError(f"{where}: {len(args)} positional init args, at most {len(names)} expected")
    out = dict(zip(names, args, strict=False))
    out.update(kwargs or {})
    return out


def _plain(v: Any) -> Any:
    """numpy/torch scalars and tuples from the pickle -> Python values that our constructors expect."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _network_from_record(rec: PersistentRecord, use_checkpoint: bool) -> nn.Module:
    """An EDM preconditioner record -> the matching mct denoiser wrapping our raw network (random weights)."""
    names, default_model = _PRECOND_ARGS[rec.class_name]
    model_rec = rec.modules.get("model")
    if model_rec is None:
        raise CheckpointError(f"{rec.class_name} record has no 'model' submodule")
    if rec.init_kwargs is None and model_rec.init_kwargs is None:
        raise CheckpointError(f"{rec.class_name}: no recorded constructor arguments to rebuild the network from")
    pk = _plain(_bind(names, rec.init_args, rec.init_kwargs, rec.class_name)) if rec.init_kwargs is not None else {}
    attrs = _plain(rec.attributes)

    def get(name: str, default: Any = None) -> Any:  # an attribute of the live object wins over its init kwargs
        return attrs.get(name, pk.get(name, default))

    label_dim = int(get("label_dim", 0))
    if model_rec.init_kwargs is not None:  # the raw net's own recorded arguments: exactly what EDM passed
        model_type = model_rec.class_name
        mk = _plain(_bind(_NET_ARGS, model_rec.init_args, model_rec.init_kwargs, model_type))
    else:  # rebuild them as EDM's preconditioner does from its **model_kwargs
        model_type = pk.get("model_type", default_model)
        mk = {k: v for k, v in pk.items() if k not in names}
        channels = int(pk["img_channels"])
        mk.update(img_resolution=pk["img_resolution"], in_channels=channels, label_dim=label_dim,
                  out_channels=channels * (2 if rec.class_name == "iDDPMPrecond" else 1))
    with torch.device("meta"):  # recorded sizes are the file's word: compare shapes before allocating anything
        probe = build_network(model_type, **{**mk, "use_checkpoint": use_checkpoint})
        holder = nn.Module()
        holder.model = probe  # names as in the record: model.<...>
    load_state_strict(holder, model_rec.state_dict("model."), where=f"{rec.class_name} record")  # meta: shapes only
    model = build_network(model_type, **{**mk, "use_checkpoint": use_checkpoint})

    if rec.class_name == "EDMPrecond":
        return EDMPrecond(model, sigma_data=float(get("sigma_data", 0.5)), label_dim=label_dim,
                          sigma_min=float(get("sigma_min", 0.0)), sigma_max=float(get("sigma_max", float("inf"))))
    if rec.class_name == "VPPrecond":
        return VPPrecond(model, label_dim, beta_d=float(get("beta_d", 19.9)), beta_min=float(get("beta_min", 0.1)),
                         M=int(get("M", 1000)), epsilon_t=float(get("epsilon_t", 1e-5)))
    if rec.class_name == "VEPrecond":
        return VEPrecond(model, label_dim, sigma_min=float(get("sigma_min", 0.02)),
                         sigma_max=float(get("sigma_max", 100.0)))
    return IDDPMPrecond(model, label_dim, C_1=float(get("C_1", 0.001)), C_2=float(get("C_2", 0.008)),
                        M=int(get("M", 1000)))


PRECOND_CLASSES = tuple(_PRECOND_ARGS)


def network_from_record(rec: PersistentRecord, use_checkpoint: bool = False) -> nn.Module:
    """Build the mct denoiser for an EDM preconditioner record and load its tensors strictly (eval mode)."""
    if rec.class_name not in _PRECOND_ARGS:
        raise CheckpointError(f"cannot build a network from a {rec.class_name} record; known: {PRECOND_CLASSES}")
    net = _network_from_record(rec, use_checkpoint)
    load_state_strict(net, rec.state_dict(), where=f"{rec.class_name} record")
    return net.eval()


def load_edm_pickle(path: str | os.PathLike, sha256: str | None = None, device: str | torch.device = "cpu",
                    use_checkpoint: bool = False) -> dict[str, Any]:
    """Load an EDM network pickle (e.g. edm-imagenet-64x64-cond-adm.pkl) without running code from it.

    Returns EDM's dict (``ema``, ``loss_fn``, ``augment_pipe``, ``dataset_kwargs``, ...) with every
    preconditioner (EDMPrecond/VPPrecond/VEPrecond/iDDPMPrecond) replaced by the equivalent mct denoiser
    (eval mode, on ``device``, weights loaded strictly); other persisted objects stay :class:`PersistentRecord`.
    A pickle that is not a dict comes back as ``{'net': ...}``. ``sha256`` pins the file's checksum.
    """
    verify_sha256(path, sha256)
    data = load_pickle_restricted(path)
    if not isinstance(data, dict):
        data = {"net": data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, PersistentRecord) and value.class_name in _PRECOND_ARGS:
            value = network_from_record(value, use_checkpoint=use_checkpoint).to(device)
        out[key] = value
    return out


def load_state_checkpoint(path: str | os.PathLike, sha256: str | None = None,
                          map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only; refusals raise
    :class:`UnsafeCheckpointError`."""
    verify_sha256(path, sha256)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path}: refused by torch.load(weights_only=True): {e}") from e
    except RuntimeError as e:
        raise CheckpointError(f"{path}: not a torch.save checkpoint ({e}); EDM .pkl files: load_edm_pickle") from e


# --- inspection -------------------------------------------------------------------------------------

# torch.save's legacy (non-zip) format starts with a protocol-2 pickle of this magic number.
_TORCH_LEGACY_HEADER = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def detect_format(path: str | os.PathLike) -> str:
    """'state-dict' for torch.save files (zip or legacy), else 'edm-pickle'."""
    if zipfile.is_zipfile(path):
        return "state-dict"
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_HEADER))
    return "state-dict" if head == _TORCH_LEGACY_HEADER else "edm-pickle"


def _tensor_dicts(obj: Any, prefix: str = "") -> list[tuple[str, dict[str, Tensor]]]:
    """Dicts whose values are all tensors (state dicts), found anywhere in nested dicts."""
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return [(prefix or "<root>", obj)]
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _tensor_dicts(v, f"{prefix}.{k}" if prefix else str(k))
    return found


def _state_dict_kind(sd: dict[str, Tensor]) -> str | None:
    """Name a state dict's architecture where its keys say it: guided-diffusion's U-Net (mct.nets.adm)."""
    if {"time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight"} <= set(sd):
        return "guided-diffusion UNetModel (mct.nets.adm.ADMUNet)"
    return None


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Format, sha256, size and the networks in a checkpoint, read through the same safe loaders
    (nothing is executed; refusals raise :class:`UnsafeCheckpointError`).

    EDM pickles: one entry per preconditioner or parameter-holding record, with its parameter count (buffers
    apart) and recorded init kwargs. State dicts: one entry per dict of tensors; ``num_parameters`` there counts
    every tensor element, since a state dict does not tell parameters from buffers.
    """
    fmt = detect_format(path)
    info: dict[str, Any] = dict(path=str(path), format=fmt, sha256=sha256_file(path),
                                size_bytes=os.path.getsize(path), networks=[], other_keys=[])
    if fmt == "state-dict":
        obj = load_state_checkpoint(path)
        found = _tensor_dicts(obj)
        for key, sd in found:
            info["networks"].append(dict(key=key, class_name=_state_dict_kind(sd), model_class=None,
                                         num_tensors=len(sd), num_parameters=sum(t.numel() for t in sd.values())))
        if isinstance(obj, dict) and [k for k, _ in found] != ["<root>"]:
            info["other_keys"] = [str(k) for k, v in obj.items() if not _tensor_dicts(v, str(k))]
        return info
    data = load_pickle_restricted(path)
    if not isinstance(data, dict):
        data = {"net": data}
    for key, value in data.items():
        if isinstance(value, PersistentRecord) and (value.class_name in _PRECOND_ARGS or value.num_parameters()):
            model = value.modules.get("model")
            info["networks"].append(dict(
                key=str(key), class_name=value.class_name, model_class=model.class_name if model else None,
                num_parameters=value.num_parameters(), num_buffer_elements=value.num_buffer_elements(),
                init_kwargs=_plain(value.init_kwargs)))
        else:
            info["other_keys"].append(str(key))
    return info


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable summary of :func:`inspect_checkpoint`'s result, for ``mct inspect-checkpoint``."""
    lines = [f"path:    {info['path']}", f"format:  {info['format']}", f"sha256:  {info['sha256']}",
             f"size:    {info['size_bytes']:,} bytes"]
    if not info["networks"]:
        lines.append("networks: none found")
    for n in info["networks"]:
        cls = n.get("class_name") or "state dict"
        if n.get("model_class"):
            cls += f"({n['model_class']})"
        lines.append(f"network {n['key']}: {cls}, {n['num_parameters']:,} parameters")
        if n.get("init_kwargs"):
            kw = ", ".join(f"{k}={v!r}" for k, v in n["init_kwargs"].items())
            lines.append(f"  init: {kw}")
    if info.get("other_keys"):
        lines.append("other entries: " + ", ".join(info["other_keys"]))
    return "\n".join(lines)
