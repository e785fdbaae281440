"""params.yaml: schema, validation and resolution of experiments.

Every setting is a typed dataclass field with a documented default. ``load_params`` checks the whole file before
any work starts: an unknown key, a wrong type, an impossible value or a dangling reference raises
:class:`ConfigError` whose message begins with the dotted key at fault.

Layout of params.yaml:
  suite: the default suite;  worlds: {name: WorldConfig};  teachers: {name: TeacherConfig}
  templates: {name: partial experiment};  experiments: {name: {template: NAME, ...overrides}}
  suites: {name: [experiment, ...]}
An experiment is its template deep-merged with its own overrides, then validated as :class:`ExperimentConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# No torch import here: Snakemake parses this module for every job.
SAMPLING_SPACES: tuple[str, ...] = ("eps_z", "x_z", "eps", "x")
MSTEP_WEIGHTS: tuple[str, ...] = ("sigma", "one", "sigma2")


class ConfigError(ValueError):
    """A params.yaml problem; the message starts with the dotted key at fault."""


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0 (got {v})"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0 (got {v})"


def _unit_interval(v: Any) -> str | None:
    return None if 0 <= v < 1 else f"must be in [0, 1) (got {v})"


def _open_unit_interval(v: Any) -> str | None:
    return None if 0 < v < 1 else f"must be in (0, 1) (got {v})"


def _betas(v: Any) -> str | None:
    return None if all(0 <= b < 1 for b in v) else f"Adam betas must be in [0, 1) (got {list(v)})"


def _seed_list(v: Any) -> str | None:
    if not v or len(set(v)) != len(v) or min(v) < 0:
        return f"must be a non-empty list of distinct seeds >= 0 (got {list(v)})"
    return None


def _at_most(hi: int, check=_positive):
    """``check`` (default: > 0) and an upper bound: a value beyond it is a typo or a hang, never a setting."""

    def fn(v: Any) -> str | None:
        return check(v) or (None if v <= hi else f"must be <= {hi:,} (got {v:,})")

    return fn


def _sha256(v: Any) -> str | None:
    return None if re.fullmatch(r"[0-9a-fA-F]{64}", v) else f"must be 64 hex digits (`sha256sum FILE`), got {v!r}"


def _closed_unit_interval(v: Any) -> str | None:
    return None if 0 <= v <= 1 else f"must be in [0, 1] (got {v})"


def _check(fn):  # field metadata helper
    return {"check": fn}


# Upper bounds of the integer settings (tests/test_reliability_inputs.py names each): far above any run this
# project plans (the paper's largest: K = 16, batch 1024, 300k iterations, 50k FID samples), far below sizes that
# hang or fail to allocate.
MAX_ITERATIONS = 10_000_000
MAX_BATCH = 65_536
MAX_K = 1_024
MAX_PROCESSES = 1_024
MAX_SAMPLES = 10_000_000
MAX_IMAGES = 1_000_000_000
MAX_CLASSES = 100_000
MAX_RESOLUTION = 1_024
MAX_ARCH_INT = 65_536  # any integer in a teacher's arch_kwargs (widths, depths, sizes): beyond it, a typo or a bomb


def _check_arch_numbers(key: str, value: Any) -> None:
    """arch_kwargs are free-form (each family has its own flags), but a number in them is a size or a rate."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_arch_numbers(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_arch_numbers(f"{key}[{i}]", v)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number (got {value})")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ARCH_INT:
        raise ConfigError(f"{key}: must be <= {MAX_ARCH_INT:,} in magnitude (got {value:,})")


@dataclass(frozen=True)
class SigmaConfig:
    """Noise-level distribution: 'lognormal' (EDM: p_mean, p_std) or 'loguniform' (sigma_min, sigma_max)."""

    kind: Literal["lognormal", "loguniform"] = "lognormal"
    p_mean: float = -1.2
    p_std: float = field(default=1.2, metadata=_check(_positive))
    sigma_min: float = field(default=0.002, metadata=_check(_positive))
    sigma_max: float = field(default=80.0, metadata=_check(_positive))

    def build(self):
        from mct.diffusion import LogNormalSigma, LogUniformSigma

        if self.kind == "lognormal":
            return LogNormalSigma(self.p_mean, self.p_std)
        return LogUniformSigma(self.sigma_min, self.sigma_max)


def _world_kind(v: str) -> str | None:
    """A kind of mct.worlds.registry: a built-in one, a world registered by its module, an installed package's entry
    point, or a "module:Class" outside mct, imported here so that a wrong one stops validation (torch-free for mct's
    own worlds)."""
    from mct.worlds.registry import BUILTIN, WORLDS, WorldImportError

    if v not in WORLDS:
        return (f"unknown value {v!r}; expected one of {list(WORLDS)}, or a world class of your own as "
                "'module:Class' (importable: installed, or on PYTHONPATH)")
    try:
        if v not in BUILTIN:  # mct's own worlds are known good; import them where they run
            WORLDS[v]
    except WorldImportError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class WorldConfig:
    """A world's settings; ``kind`` picks its class (mct.worlds.registry), the other keys are that class's."""

    kind: str = field(metadata=_check(_world_kind))
    # toy2d
    grid: int = field(default=5, metadata=_check(_at_most(100)))
    spacing: float = field(default=1.0, metadata=_check(_positive))
    std: float = field(default=0.05, metadata=_check(_positive))
    weights: Literal["equal", "unequal", "skewed"] = "unequal"
    # digits / imagenet
    held_out_fraction: float = field(default=0.2, metadata=_check(_unit_interval))
    source: str = ""
    resolution: int = field(default=64, metadata=_check(_at_most(MAX_RESOLUTION)))
    num_classes: int = field(default=1000, metadata=_check(_at_most(MAX_CLASSES, _non_negative)))
    max_images: int = field(default=0, metadata=_check(_at_most(MAX_IMAGES, _non_negative)))  # 0 = all
    ref_images: int = field(default=0, metadata=_check(_at_most(MAX_IMAGES, _non_negative)))  # FID reference, 0 = all
    seed: int = 0
    # text2image (source: the local diffusers Stable Diffusion folder; resolution: of the generated images)
    sha256_files: dict[str, str] = field(default_factory=dict)  # the folder's weight files, pinned by path
    captions: str = ""  # training prompts: a .txt (one per line) or a COCO captions JSON
    annotations: str = ""  # evaluation captions: COCO's captions_val2014.json
    images: str = ""  # evaluation reference images: COCO's val2014 folder
    eval_prompts: int = field(default=30000, metadata=_check(_at_most(MAX_SAMPLES)))
    eval_resolution: int = field(default=256, metadata=_check(_at_most(MAX_RESOLUTION)))
    clip_weights: str = ""  # open_clip weights file (safetensors) for the CLIP score
    clip_model: str = "ViT-g-14"  # an open_clip model name, or a model config .json file


@dataclass(frozen=True)
class TeacherConfig:
    """How a teacher comes to be: trained by a stage, fetched (pinned by sha256) or analytic (toy2d)."""

    world: str
    # train: by a stage; fetch: downloaded, pinned; local: imported from the world's own model folder (text2image)
    kind: Literal["train", "fetch", "local"] = "train"
    # edm: an EDM pickle; adm: guided-diffusion flags; sd_unet: a diffusers UNet2DConditionModel (kind local)
    arch: Literal["mlp", "conv", "edm", "adm", "sd_unet"] = "mlp"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    iterations: int = field(default=3000, metadata=_check(_at_most(MAX_ITERATIONS, _non_negative)))
    batch_size: int = field(default=512, metadata=_check(_at_most(MAX_BATCH)))
    lr: float = field(default=2e-3, metadata=_check(_positive))
    ema_decay: float = field(default=0.999, metadata=_check(_unit_interval))
    sigma: SigmaConfig = field(default_factory=SigmaConfig)
    sampler_steps: int = field(default=18, metadata=_check(_at_most(10_000)))
    sigma_max: float = field(default=80.0, metadata=_check(_positive))
    sigma_min: float = field(default=0.002, metadata=_check(_positive))
    guidance_scale: float = field(default=1.0, metadata=_check(_positive))  # teacher-eval's CFG (1: none)
    source: str = ""
    sha256: str | None = field(default=None, metadata=_check(_sha256))
    seed: int = 0


@dataclass(frozen=True)
class StudentConfig:
    """g(z) = D(sigma_init z, sigma_init): a copy of the teacher ('teacher') or re-initialised ('scratch').
    Give either sigma_init or log_snr_init (lambda* = -2 log sigma*), not both."""

    init: Literal["teacher", "scratch"] = "teacher"
    sigma_init: float | None = field(default=None, metadata=_check(_positive))
    log_snr_init: float | None = None

    def resolved_sigma(self) -> float:
        if self.log_snr_init is not None:
            import math

            return math.exp(-self.log_snr_init / 2)
        return 2.5 if self.sigma_init is None else self.sigma_init


@dataclass(frozen=True)
class LangevinConfig:
    """The E-step sampler's settings, defined once: params.yaml's ``distill`` section holds them flat
    (:class:`DistillConfig` extends this class) and :func:`mct.emd.langevin_estep` consumes them.

    Step sizes are in units of the N(0, I) priors of eps and z, so one pair serves every noise level; in the x spaces
    the x step is gamma_eps * sigma^2, the same step measured in eps units.

    z step schemes (the z posterior's precision is about 1 + |J|^2 / sigma^2, so a constant step is unstable at small
    sigma and a tiny one does not move):
      'shrink'     gamma_z * sigma^2 / (sigma^2 + z_step_ref^2) (constant when z_step_ref = 0), the same for every
                   chain at one sigma;
      'curvature'  gamma_z / (1 + lambda / sigma^2) with lambda the largest eigenvalue of J^T J at the chain's start
                   (``z_power_iters`` power iterations): gamma_z is then a step in units of the z posterior's width.
    Either way the step is fixed per chain for the whole chain, so each chain is plain Langevin for rho.

    Noise cancellation (``cancel_noise``): 'linear' subtracts the tracked injected noise eta_K (exact while z is fixed;
    biased for a nonlinear g when z moves, because z's drift carries the noise into z_K); 'antithetic' pairs every
    chain with its mirror (-eps_0, -n_k, -m_k) from the same z_0 and subtracts nothing, so the batch mean cancels the
    noise to first order and stays exactly unbiased; 'auto' is 'linear' when z is fixed, 'antithetic' when it moves.
    ``cancel_initial`` (linear only): also subtract eps_0.

    Chain guard: a chain whose z moves more than ``z_guard`` (RMS per coordinate, in prior standard deviations) or
    turns non-finite is reset to its start and contributes no signal; more than ``max_reset_fraction`` of a batch
    stops the E-step with an error.
    """

    K: int = field(default=8, metadata=_check(_at_most(MAX_K, _non_negative)))
    gamma_eps: float = field(default=0.3, metadata=_check(_non_negative))
    gamma_z: float = field(default=0.01, metadata=_check(_non_negative))
    space: Literal["eps_z", "x_z", "eps", "x"] = "eps_z"
    cancel_noise: bool = True
    cancel_initial: bool = True
    cancel_scheme: Literal["auto", "linear", "antithetic"] = "auto"
    z_step: Literal["shrink", "curvature"] = "shrink"
    z_step_ref: float = field(default=0.0, metadata=_check(_non_negative))
    z_power_iters: int = field(default=3, metadata=_check(_at_most(100)))
    z_guard: float = field(default=10.0, metadata=_check(_positive))
    max_reset_fraction: float = field(default=0.05, metadata=_check(_closed_unit_interval))

    def __post_init__(self) -> None:
        # The same checks as params.yaml's, for code that builds the settings directly.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
            if choices and value not in choices:
                raise ValueError(f"{f.name}: unknown value {value!r}; expected one of {list(choices)}")
            check = f.metadata.get("check")
            problem = check(value) if (check is not None and value is not None) else None
            if problem:
                raise ValueError(f"{f.name}: {problem}")

    @property
    def moves_z(self) -> bool:
        return self.space in ("eps_z", "x_z") and self.gamma_z > 0

    @property
    def resolved_cancel(self) -> str:
        """What the sampler does: 'none', 'linear' or 'antithetic'."""
        if not self.cancel_noise:
            return "none"
        if self.cancel_scheme == "auto":
            return "antithetic" if self.moves_z else "linear"
        return self.cancel_scheme

    @property
    def antithetic(self) -> bool:
        return self.resolved_cancel == "antithetic"


@dataclass(frozen=True)
class DistillConfig(LangevinConfig):
    """EM distillation settings (the E-step's come from :class:`LangevinConfig`); paper values where known
    (docs/method.md), documented defaults otherwise."""

    iterations: int = field(default=2000, metadata=_check(_at_most(MAX_ITERATIONS, _non_negative)))
    batch_size: int = field(default=256, metadata=_check(_at_most(MAX_BATCH)))
    estep_teacher: Literal["network", "analytic"] = "network"
    # The E-step: 'langevin' (the paper's chain, the keys of LangevinConfig) or 'exact' (mct.exact_em: x_t drawn
    # from the data exactly and log q_t by importance sampling over a 2-D z from a grid-built proposal; worlds with
    # World.has_exact_estep only). exact_grid: proposal cells per axis; exact_draws: importance draws per x_t;
    # exact_defensive: the prior's share of the proposal; exact_control_variate: subtract the same objective on the
    # student's own samples (zero expected gradient, less variance).
    estep: Literal["langevin", "exact"] = "langevin"
    # The distillation method (mct.methods): 'emd' (the E-step above and the M-step), or a peer in the same loop:
    # 'sid' (mct.sid; sid_alpha is its alpha, 1.2 in the paper) or 'dmd2' (mct.dmd2; its two time-scale rule is
    # score_steps, 5 in the paper). normalize_gradient: SiD's and DMD2's per-sample division by the teacher's
    # denoising error on the generator's sample (as their authors' code does).
    method: Literal["emd", "sid", "dmd2"] = "emd"
    sid_alpha: float = 1.2
    normalize_gradient: bool = True
    # DMD's regression loss, an option of 'dmd2' (0: off, DMD2's own setting; DMD used 0.25): the mean squared error
    # of g(z) against the teacher's deterministic sample from the same noise, on regression_pairs pairs made once per
    # run by EDM's Heun sampler in regression_steps steps (mct.dmd2.RegressionPairs).
    regression_weight: float = field(default=0.0, metadata=_check(_non_negative))
    regression_pairs: int = field(default=4096, metadata=_check(_at_most(1_000_000)))
    regression_steps: int = field(default=18, metadata=_check(_at_most(1000)))
    exact_grid: int = field(default=64, metadata=_check(_at_most(1024)))
    exact_draws: int = field(default=16, metadata=_check(_at_most(4096)))
    exact_defensive: float = field(default=0.1, metadata=_check(_open_unit_interval))
    exact_control_variate: bool = True
    mstep_weight: Literal["sigma", "one", "sigma2"] = "sigma"
    mstep_sigma: SigmaConfig = field(default_factory=SigmaConfig)
    dsm_sigma: SigmaConfig = field(default_factory=SigmaConfig)
    lr_g: float = field(default=1e-4, metadata=_check(_positive))
    lr_s: float = field(default=1e-3, metadata=_check(_positive))
    betas_g: tuple[float, float] = field(default=(0.0, 0.99), metadata=_check(_betas))
    betas_s: tuple[float, float] = field(default=(0.0, 0.99), metadata=_check(_betas))
    score_steps: int = field(default=1, metadata=_check(_at_most(100)))
    ema_decay: float = field(default=0.999, metadata=_check(_unit_interval))
    grad_clip: float = field(default=1.0, metadata=_check(_non_negative))
    checkpoint_every: int = field(default=500, metadata=_check(_at_most(MAX_ITERATIONS)))
    seed: int = 0
    gpus: int = field(default=0, metadata=_check(_at_most(MAX_PROCESSES, _non_negative)))
    num_processes: int = field(default=1, metadata=_check(_at_most(MAX_PROCESSES)))  # in total, over all nodes
    # Machines (Slurm nodes) the run spans; `gpus` is per node. With nodes > 1, mct.stages.launcher starts one
    # `accelerate launch` per node and num_processes must be nodes * gpus (nodes * k on CPU nodes): check_nodes.
    nodes: int = field(default=1, metadata=_check(_at_most(MAX_PROCESSES)))
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accum: int = field(default=1, metadata=_check(_at_most(MAX_BATCH)))
    grad_checkpoint: bool = False
    # Classifier-free guidance of the teacher's score in the E-step (1: none; conditional worlds with an
    # unconditional input, World.null_labels); the score network is guided only when guide_score_net is set.
    guidance_scale: float = field(default=1.0, metadata=_check(_positive))
    guide_score_net: bool = False
    # The frozen teacher's weights in bf16 (half its memory; it needs no fp32 master copy); needs bf16 autocast.
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    # Tracking (mct.tracking): accelerate's tracker for the training metrics, every `log_every` iterations; the EMA
    # generator's quality on `eval_samples` samples every `eval_every` iterations (0: off).
    log_with: Literal["dvclive", "tensorboard", "wandb", "none"] = "dvclive"
    log_every: int = field(default=10, metadata=_check(_at_most(MAX_ITERATIONS, _non_negative)))
    eval_every: int = field(default=0, metadata=_check(_at_most(MAX_ITERATIONS, _non_negative)))
    eval_samples: int = field(default=2000, metadata=_check(_at_most(MAX_SAMPLES)))

    def langevin(self) -> LangevinConfig:
        return LangevinConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LangevinConfig)})


def check_nodes(d: DistillConfig) -> str | None:
    """Why ``d``'s processes cannot be split over its nodes ("<key>: <reason>"), or None. num_processes is the
    total over all nodes, split evenly: one process per GPU (nodes * gpus), or on CPU nodes (gpus: 0) any multiple
    of nodes. nodes: 1 is checked no further (gpus and num_processes stay as independent as they were)."""
    if d.nodes == 1:
        return None
    if d.gpus and d.num_processes != d.nodes * d.gpus:
        return (f"num_processes: the total process count must be nodes * gpus = {d.nodes} * {d.gpus} = "
                f"{d.nodes * d.gpus} (distill.gpus is per node, one process per GPU), not {d.num_processes}")
    if not d.gpus and d.num_processes % d.nodes:
        return (f"num_processes: the total process count must be a multiple of nodes ({d.nodes}) to split evenly "
                f"over the nodes (gpus: 0), not {d.num_processes}")
    return None


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = field(default=10000, metadata=_check(_at_most(MAX_SAMPLES)))
    seed: int = 1234
    batch_size: int = field(default=1000, metadata=_check(_at_most(MAX_BATCH)))


@dataclass(frozen=True)
class ExperimentConfig:
    world: str
    teacher: str
    template: str = ""
    method: Literal["emd", "diff_instruct", "sid", "dmd2"] | None = None  # the report's label (default: method_name)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # One run per seed (distill.seed = the seed; outputs under <experiment>/seed<k>, mct.paths.run_name).
    # None: the suite's seeds, else one run with distill.seed as given (outputs under <experiment>).
    seeds: list[int] | None = field(default=None, metadata=_check(_seed_list))

    @property
    def method_name(self) -> str:
        """``distill.method`` for a peer (sid, dmd2); for EMD 'diff_instruct' at the K=1, gamma_z=0 corner with
        cancellation (docs/method.md), else 'emd'."""
        if self.method is not None:
            return self.method
        d = self.distill
        if d.method != "emd":
            return d.method
        return "diff_instruct" if (d.K == 1 and (d.gamma_z == 0 or d.space in ("eps", "x")) and d.cancel_noise) \
            else "emd"


@dataclass(frozen=True)
class Params:
    suite: str
    worlds: dict[str, WorldConfig]
    teachers: dict[str, TeacherConfig]
    templates: dict[str, dict[str, Any]]
    experiments: dict[str, ExperimentConfig]
    suites: dict[str, list[str]]
    suite_seeds: dict[str, list[int]] = field(default_factory=dict)  # suites given as {experiments, seeds}

    def suite_experiments(self, suite: str | None = None) -> list[str]:
        name = suite or self.suite
        if name not in self.suites:
            raise ConfigError(f"suite: unknown suite {name!r}; known suites: {sorted(self.suites)}")
        return list(self.suites[name])

    def suite_teachers(self, suite: str | None = None) -> list[str]:
        return sorted({self.experiments[e].teacher for e in self.suite_experiments(suite)})

    def suite_worlds(self, suite: str | None = None) -> list[str]:
        return sorted({self.experiments[e].world for e in self.suite_experiments(suite)})

    def experiment(self, name: str) -> ExperimentConfig:
        if name not in self.experiments:
            raise ConfigError(f"experiments: unknown experiment {name!r}; known: {sorted(self.experiments)}")
        return self.experiments[name]

    def experiment_seeds(self, name: str, suite: str | None = None) -> list[int] | None:
        """The experiment's seeds in a suite: its own (or its template's), else the suite's, else None (one run)."""
        return self.experiment(name).seeds or self.suite_seeds.get(suite or self.suite)

    def suite_runs(self, suite: str | None = None) -> list[tuple[str, int | None]]:
        """(experiment, seed) of every run of a suite; seed None: the experiment's single unseeded run."""
        return [(e, s) for e in self.suite_experiments(suite) for s in (self.experiment_seeds(e, suite) or [None])]

    def run_config(self, name: str, seed: int | None) -> ExperimentConfig:
        """The settings one run uses: distill.seed is the run's seed (``seeds`` dropped: it names runs only)."""
        exp = self.experiment(name)
        if seed is None:
            return exp
        return dataclasses.replace(exp, seeds=None, distill=dataclasses.replace(exp.distill, seed=seed))

    def teacher(self, name: str) -> TeacherConfig:
        if name not in self.teachers:
            raise ConfigError(f"teachers: unknown teacher {name!r}; known: {sorted(self.teachers)}")
        return self.teachers[name]


# --- generic typed construction ---------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: unknown value {value!r}; expected one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # no setting here has a meaning for infinity, and none for NaN
            raise ConfigError(f"{key}: must be a finite number (got {value})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build(cls: type, data: Any, key: str) -> Any:
    """Construct dataclass ``cls`` from a mapping, naming ``key.field`` in every error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; allowed keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{sub}: required key is missing")
            continue
        value = _coerce(data[name], hints[name], sub)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{sub}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_fetched_arch(key: str, t: TeacherConfig, world: WorldConfig) -> None:
    """Published checkpoints (edm pickles, adm state dicts) are fetched, and must fit their world."""
    from mct.worlds.registry import WORLDS, world_class

    if t.arch in ("edm", "adm"):
        if t.kind != "fetch":
            raise ConfigError(f"{key}.kind: arch {t.arch!r} is a published checkpoint; use kind: fetch")
        if not world_class(world.kind).takes_published_checkpoints:
            fits = [k for k, c in WORLDS.items() if c.takes_published_checkpoints]
            raise ConfigError(f"{key}.arch: {t.arch!r} teachers need a world of kind {' or '.join(fits)}, "
                              f"not {world.kind!r}")
    if (t.kind == "local") != (t.arch == "sd_unet") or (t.kind == "local"
                                                        and not world_class(world.kind).takes_local_teacher):
        fits = [k for k, c in WORLDS.items() if c.takes_local_teacher]
        raise ConfigError(f"{key}.kind: a local teacher (kind: local, arch: sd_unet) is the Stable Diffusion UNet of "
                          f"a world of kind {' or '.join(fits)}; got kind {t.kind!r}, arch {t.arch!r}, world kind "
                          f"{world.kind!r}")
    if t.arch == "adm":
        size = t.arch_kwargs.get("image_size")
        if size != world.resolution:
            raise ConfigError(f"{key}.arch_kwargs.image_size: {size!r} must equal the world's resolution "
                              f"{world.resolution} (guided-diffusion flags of the checkpoint)")
        if t.arch_kwargs.get("noise_schedule", "linear") != "linear":
            raise ConfigError(f"{key}.arch_kwargs.noise_schedule: only 'linear' (ADM ImageNet-128) is supported, "
                              f"got {t.arch_kwargs['noise_schedule']!r}")
        classes = world.num_classes if t.arch_kwargs.get("class_cond") else 0
        if classes not in (0, 1000):
            raise ConfigError(f"{key}.arch_kwargs.class_cond: ADM models have 1000 classes; the world has "
                              f"num_classes {world.num_classes}")


@dataclass(frozen=True)
class SuiteConfig:
    """A suite written as a mapping: its experiments and the seeds each runs (unless an experiment sets its own)."""

    experiments: list[str]
    seeds: list[int] | None = field(default=None, metadata=_check(_seed_list))


def _parse_suites(raw: Any) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """suites: {name: [experiment, ...]} or {name: {experiments: [...], seeds: [0, 1, 2]}}."""
    specs = _coerce(raw, dict[str, Any], "suites")
    suites, seeds = {}, {}
    for name, spec in specs.items():
        if isinstance(spec, dict):
            s = build(SuiteConfig, spec, f"suites.{name}")
            suites[name] = s.experiments
            if s.seeds is not None:
                seeds[name] = s.seeds
        else:
            suites[name] = _coerce(spec, list[str], f"suites.{name}")
    return suites, seeds


TOP_LEVEL = ("suite", "worlds", "teachers", "templates", "experiments", "suites")


def parse_params(raw: Any, overrides: dict[str, Any] | None = None) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError("params: the file must hold a mapping")
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level key; allowed: {list(TOP_LEVEL)}")
    for k in TOP_LEVEL:
        if k not in raw:
            raise ConfigError(f"{k}: required top-level key is missing")
    worlds = _coerce(raw["worlds"], dict[str, WorldConfig], "worlds")
    teachers = _coerce(raw["teachers"], dict[str, TeacherConfig], "teachers")
    templates = _coerce(raw["templates"], dict[str, dict[str, Any]], "templates")
    suites, suite_seeds = _parse_suites(raw["suites"])
    if raw["suite"] in (None, ""):  # e.g. `snakemake --config suite=`
        raise ConfigError(f"suite: empty; name one of the suites {sorted(raw['suites'] or {})}")
    suite = _coerce(raw["suite"], str, "suite")
    from mct.worlds.registry import world_class

    for name, w in worlds.items():
        problem = world_class(w.kind).check_config(w, f"worlds.{name}")
        if problem:
            raise ConfigError(problem)
    for name, t in teachers.items():
        if t.world not in worlds:
            raise ConfigError(f"teachers.{name}.world: unknown world {t.world!r}; known: {sorted(worlds)}")
        _check_fetched_arch(f"teachers.{name}", t, worlds[t.world])
        _check_arch_numbers(f"teachers.{name}.arch_kwargs", t.arch_kwargs)
    raw_experiments = _coerce(raw["experiments"], dict[str, dict[str, Any]], "experiments")
    experiments: dict[str, ExperimentConfig] = {}
    for name, exp in raw_experiments.items():
        key = f"experiments.{name}"
        merged = exp
        if "template" in exp:
            if exp["template"] not in templates:
                raise ConfigError(f"{key}.template: unknown template {exp['template']!r}; known: {sorted(templates)}")
            merged = deep_merge(templates[exp["template"]], exp)
        try:
            cfg = build(ExperimentConfig, merged, key)
        except ConfigError as e:
            raise ConfigError(_where_written(str(e), key, exp, raw["templates"])) from None
        if cfg.world not in worlds:
            raise ConfigError(f"{key}.world: unknown world {cfg.world!r}; known: {sorted(worlds)}")
        if cfg.teacher not in teachers:
            raise ConfigError(f"{key}.teacher: unknown teacher {cfg.teacher!r}; known: {sorted(teachers)}")
        if teachers[cfg.teacher].world != cfg.world:
            raise ConfigError(f"{key}.teacher: teacher {cfg.teacher!r} belongs to world "
                              f"{teachers[cfg.teacher].world!r}, not {cfg.world!r}")
        if cfg.student.sigma_init is not None and cfg.student.log_snr_init is not None:
            raise ConfigError(f"{key}.student: give sigma_init or log_snr_init, not both")
        problem = check_nodes(cfg.distill)
        if problem:
            raise ConfigError(f"{key}.distill.{problem}")
        d = cfg.distill
        if d.batch_size % d.grad_accum:
            raise ConfigError(f"{key}.distill.grad_accum: must divide batch_size ({d.batch_size})")
        if d.method != "emd" and d.estep != "langevin":
            raise ConfigError(f"{key}.distill.estep: {d.estep!r} is an E-step of method 'emd'; method "
                              f"{d.method!r} has no E-step (leave estep at 'langevin')")
        if d.regression_weight and d.method != "dmd2":
            raise ConfigError(f"{key}.distill.regression_weight: DMD's regression loss is an option of method 'dmd2'; "
                              f"method {d.method!r} does not read it (leave it at 0)")
        if d.method == "emd" and d.antithetic and (d.batch_size // d.grad_accum) % 2:
            raise ConfigError(f"{key}.distill.batch_size: antithetic noise cancellation pairs chains, so each "
                              f"micro-batch (batch_size / grad_accum) must be even")
        if d.estep == "exact" and not world_class(worlds[cfg.world].kind).has_exact_estep:
            raise ConfigError(f"{key}.distill.estep: 'exact' needs a world with a 2-D latent and exact data samples "
                              f"(World.has_exact_estep, e.g. toy2d); {worlds[cfg.world].kind!r} has neither")
        if d.estep_teacher == "analytic" and not world_class(worlds[cfg.world].kind).has_analytic_denoiser:
            raise ConfigError(f"{key}.distill.estep_teacher: 'analytic' exists only for worlds with an exact "
                              f"denoiser; {worlds[cfg.world].kind!r} has none")
        experiments[name] = cfg
    for sname, members in suites.items():
        for i, e in enumerate(members):
            if e not in experiments:
                raise ConfigError(f"suites.{sname}[{i}]: unknown experiment {e!r}")
    if suite not in suites:
        raise ConfigError(f"suite: unknown suite {suite!r}; known suites: {sorted(suites)}")
    params = Params(suite, worlds, teachers, templates, experiments, suites, suite_seeds)
    return params


# Experiment keys that cannot change a run's numbers, so a change to them keeps the resume state: the tracker and
# its cadence (trackers only read the log), the convergence evaluation (its own torch.Generator, never the training
# stream: mct.tracking), the checkpoint cadence (saving reads the RNG state, never draws from it), and what only the
# sample/evaluate stages and the run's naming read.
NEUTRAL_KEYS = ("template", "seeds", "eval", "distill.log_with", "distill.log_every", "distill.eval_every",
                "distill.eval_samples", "distill.checkpoint_every")



def flatten_settings(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"distill.lr_g": 0.0003, ...}``; tuples become lists (as JSON stores them)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten_settings(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: _leaf(obj)}


def _leaf(v: Any) -> Any:
    """A setting's value as JSON stores it, so a value read back from settings.json compares equal."""
    if isinstance(v, dict):
        return {str(k): _leaf(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_leaf(x) for x in v]
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def is_neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL_KEYS)


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (a key only one side has shows ``<unset>``)."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys
            if old.get(k, "<unset>") != new.get(k, "<unset>")]


# distill keys that only some methods read (mct.methods): a run's settings leave out the keys its method does not
# read, since they cannot change its numbers (an SiD run's K, an EMD run's sid_alpha)
_EMD_KEYS = (*(f.name for f in dataclasses.fields(LangevinConfig)), "estep", "exact_grid", "exact_draws",
             "exact_defensive", "exact_control_variate", "mstep_weight")
REGRESSION_KEYS = ("regression_weight", "regression_pairs", "regression_steps")
METHOD_KEYS: dict[str, tuple[str, ...]] = {"emd": _EMD_KEYS, "sid": ("sid_alpha", "normalize_gradient"),
                                           "dmd2": ("normalize_gradient", *REGRESSION_KEYS)}


def method_settings(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat experiment settings without the method-only keys of the methods the run does not use; without
    ``distill.method`` itself for 'emd', the method of every run made before there was a choice, and without the
    regression keys while the regression is off (so their fingerprints and records stay valid)."""
    method = flat.get("distill.method", "emd")
    unused = {f"distill.{k}" for m, keys in METHOD_KEYS.items() for k in keys} - {
        f"distill.{k}" for k in METHOD_KEYS.get(method, ())}
    if method == "emd":
        unused.add("distill.method")
    if not flat.get("distill.regression_weight"):  # off: DMD2 runs made before the option keep their fingerprints
        unused |= {f"distill.{k}" for k in REGRESSION_KEYS}
    return {k: v for k, v in flat.items() if k not in unused}


def numeric_settings(exp: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    """An experiment's resolved settings that can change its numbers, flat (``{"distill.lr_g": 0.001, ...}``):
    what the resume fingerprint hashes (with the input files) and what the report's one-factor ablations compare.
    ``exp`` is the experiment or its ``dataclasses.asdict``."""
    tree = exp if isinstance(exp, dict) else dataclasses.asdict(exp)
    return method_settings({k: v for k, v in flatten_settings(tree).items() if not is_neutral(k)})


def _lookup(node: Any, parts: list[str]) -> bool:
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return True


def _where_written(message: str, key: str, exp: dict[str, Any], raw_templates: Any) -> str:
    """An experiment's error names the key where the user wrote it: a key that only its template has (a typo
    under templates.T.distill, say) is reported as templates.T.<key>, for the experiment that uses it."""
    bad, sep, rest = message.partition(":")
    template = exp.get("template")
    if not sep or not bad.startswith(key + ".") or not isinstance(template, str):
        return message
    parts = re.split(r"\.|(?=\[)", bad[len(key) + 1:])
    parts = [p for p in parts if p and not p.startswith("[")] or parts
    if _lookup(exp, parts) or not _lookup((raw_templates or {}).get(template), parts):
        return message
    return f"templates.{template}.{bad[len(key) + 1:]}{sep}{rest} (in experiment {key.split('.', 1)[1]!r})"


# params sections whose entries a `-S SECTION.NAME.key=value` override may only change, not create
NAMED_SECTIONS = {"worlds": "world", "teachers": "teacher", "templates": "template", "experiments": "experiment",
                  "suites": "suite"}


def check_override_target(raw: dict, dotted: str) -> None:
    """``-S experiments.digits_emd_k5.distill.K=4`` with no experiment digits_emd_k5 is a typo, not a new
    experiment: refused with the known names. Setting a whole entry (``-S experiments.mine={...}``) may create one."""
    parts = dotted.split(".")
    if len(parts) > 2 and parts[0] in NAMED_SECTIONS:
        known = raw.get(parts[0])
        if isinstance(known, dict) and parts[1] not in known:
            raise ConfigError(f"{dotted}: unknown {NAMED_SECTIONS[parts[0]]} {parts[1]!r}; known: {sorted(known)}")


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Apply an override like ``experiments.toy2d_k8.distill.K=16`` to the raw mapping."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{dotted or '<empty>'}: not a dotted key (e.g. experiments.NAME.distill.K)")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: cannot set a key below a non-mapping")
        node = node.setdefault(p, {})
    if not isinstance(node, dict):
        raise ConfigError(f"{dotted}: cannot set a key below a non-mapping")
    node[parts[-1]] = value


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override (KEY=VALUE, VALUE parsed as YAML) and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params: file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"params: {path} is not a regular file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"params: {path} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise ConfigError(f"params: cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"params: {path} is not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(f"params: {path} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {path} must hold a mapping at the top level, not a {type(raw).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        check_override_target(raw, k)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"{k}: the value {v!r} (-S) is not valid YAML: {e}") from None
        set_dotted(raw, k, value)
    return parse_params(raw)


__all__ = ["ConfigError", "Params", "ExperimentConfig", "DistillConfig", "TeacherConfig", "WorldConfig",
           "StudentConfig", "EvalConfig", "SigmaConfig", "load_params", "parse_params", "SAMPLING_SPACES",
           "MSTEP_WEIGHTS"]
