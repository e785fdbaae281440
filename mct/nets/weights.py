"""Network weights, whatever the family: count them, load them strictly by name, re-initialise them from scratch.

Re-initialisation follows one convention for every family mct builds (MLP, digits U-Net, EDM, ADM): each layer that
owns parameters defines ``reset_parameters()``, which re-draws them with the family's own initialiser (torch's
defaults for the torch layers, EDM's ``weight_init`` settings for :mod:`mct.nets.edm`'s layers), and a layer that a
family zero-initialises on purpose (ADM's residual-branch and output convolutions, see :func:`zero_init`) is zeroed
again afterwards. :func:`reinitialise` applies it; :func:`check_reinitialised` refuses a result that would leave
teacher weights behind.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mct.errors import CheckpointError

ZERO_INIT = "zero_init"  # attribute set on a layer whose parameters start at zero by design


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _head(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def load_state_strict(module: nn.Module, state: dict[str, Tensor], where: str = "checkpoint") -> None:
    """Copy ``state`` into ``module`` by name; any missing, unexpected or mis-shaped tensor is an error."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"{label}: {_head(xs)}" for label, xs in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if xs]
        raise CheckpointError(f"{where} does not fit {type(module).__name__}; " + "; ".join(problems))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters and mark them zero by design, so :func:`reinitialise` zeroes them again."""
    for p in module.parameters():
        nn.init.zeros_(p)
    setattr(module, ZERO_INIT, True)
    return module


@torch.no_grad()
def reinitialise(module: nn.Module) -> list[str]:
    """Re-draw every layer's parameters as its family initialises them; return the names of the parameters reset.

    Calls ``reset_parameters()`` of every submodule that has one, in module order, then zeroes the layers marked by
    :func:`zero_init`. Draws from torch's global RNG: seed it first for reproducibility. A parameter whose layer has
    no ``reset_parameters`` is not in the returned list (:func:`check_reinitialised` turns that into an error).
    """
    reset: list[str] = []
    for prefix, m in module.named_modules():
        fn = getattr(m, "reset_parameters", None)
        if not callable(fn):
            continue
        fn()
        own = list(m.named_parameters(recurse=False))
        if getattr(m, ZERO_INIT, False):
            for _, p in own:
                p.zero_()
        reset += [f"{prefix}.{n}" if prefix else n for n, _ in own]
    return reset


def _constant(t: Tensor) -> bool:
    return bool((t == t.reshape(-1)[0]).all())


def check_reinitialised(before: dict[str, Tensor], module: nn.Module, reset: list[str]) -> dict[str, int]:
    """Refuse a re-initialisation that could leave teacher weights in ``module``; return counts of what changed.

    ``before`` holds the parameters before :func:`reinitialise`, ``reset`` what it returned. Errors (ValueError):
    a parameter that no initialiser covered; a randomly initialised tensor (not constant after the reset) that equals
    its old value; no tensor changed at all. Tensors that are constant by design (zero-initialised layers, norm
    scales of one) may equal their old value, since an untrained network holds those constants too.
    """
    params = dict(module.named_parameters())
    uncovered = sorted(set(params) - set(reset))
    if uncovered:
        raise ValueError(f"scratch init: {len(uncovered)} of {len(params)} parameter tensors have no initialiser "
                         f"(no reset_parameters in their layer) and would keep the teacher's weights: "
                         f"{_head(uncovered)}")
    changed = [n for n, p in params.items() if not torch.equal(p, before[n])]
    stale = sorted(n for n, p in params.items() if n not in changed and not _constant(p))
    if stale:
        raise ValueError(f"scratch init: {len(stale)} randomly initialised parameter tensors kept their old values: "
                         f"{_head(stale)}")
    if not changed:
        raise ValueError(f"scratch init: none of the {len(params)} parameter tensors changed; nothing was reset")
    return {"tensors": len(params), "changed": len(changed), "constant_by_design": len(params) - len(changed)}
