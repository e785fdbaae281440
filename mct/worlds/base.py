"""What mct needs to know about a world, asked in one place: the :class:`World` interface.

A world is a data distribution together with everything that differs between distributions: the shape and the
labels of a sample, EDM's sigma_data, how its data file is made and read, the reference set and the feature space
of its evaluation, the networks that can denoise it, an exact denoiser or exact metrics when the world has them,
and what its stages ask of a scheduler. Everything else in mct (the stage table, the CLI, training, evaluation, the
report) asks the world and never tests which world it holds, so a new world is one new class (one file) and a
``kind`` in params.yaml: no other module learns its name.

Two kinds of knowledge live here, and the split is deliberate:

* class attributes and classmethods are *static*: the data file's suffix, whether evaluation needs a trained
  feature network, the evaluation resources, the config checks. The stage table and the params validation read
  them while Snakemake parses the workflow, so this module and every world class file import no torch at module
  level (torch costs seconds, paid for every job);
* instance methods are *runtime*: sampling shapes, data, networks, features. They import torch where they run.

A world instance is cheap (a name and its :class:`~mct.config.WorldConfig`); build one with
:func:`mct.worlds.registry.make_world`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor, nn

    from mct.config import TeacherConfig, WorldConfig
    from mct.diffusion import EDMPrecond


@dataclass(frozen=True)
class EvalNeeds:
    """What a world's evaluation stages (ref-stats, teacher-eval, evaluate) ask a scheduler for. Small worlds are
    scored on a CPU in minutes; Inception over 50k samples or a whole training set wants a GPU, memory and hours."""

    mem_mb: int = 8000
    runtime: int = 120  # minutes
    gpu: int = 0
    ref_threads: int = 2  # ref-stats: decoding workers for image archives


class World(ABC):
    """One world: a name (params.yaml's key), its config and the answers every stage asks of it.

    Subclasses set the class attributes that differ from the defaults below and implement the abstract methods;
    :func:`mct.worlds.registry.register` gives the class its ``kind``.
    """

    kind: ClassVar[str] = ""  # params.yaml's `kind`, set by registry.register
    data_suffix: ClassVar[str] = ".npz"  # the prepared data file (paths.world_data)
    reference_split: ClassVar[str] = "test"  # what the FID reference statistics are computed over (their metadata)
    needs_feature_net: ClassVar[bool] = False  # evaluation measures FID through a network trained by `mct features`
    # where FID and precision/recall are measured: a space of mct.evaluate.FEATURE_SPACES ('identity': the samples
    # themselves, exact for low-dimensional worlds; 'digits-feature-net': the classifier `mct features` trains;
    # 'inception-legacy-tf'). Named, not built here: every stage imports its world, only evaluation the metrics.
    feature_space: ClassVar[str] = "identity"
    fd_name: ClassVar[str] = "FD"  # the report's column header of the Frechet distance in this feature space
    samples_uint8: ClassVar[bool] = False  # `mct sample` stores quantised uint8 images (as EDM saves them)
    takes_published_checkpoints: ClassVar[bool] = False  # fetched EDM/ADM teachers (arch edm, adm) fit this world
    takes_local_teacher: ClassVar[bool] = False  # a teacher of kind 'local' (import_teacher) exists for this world
    has_analytic_denoiser: ClassVar[bool] = False  # distill.estep_teacher: analytic is possible
    # distill.estep: exact is possible: a 2-D latent (quadrature over z) and exact data samples (exact_data_sample)
    has_exact_estep: ClassVar[bool] = False
    exact_metric_keys: ClassVar[tuple[str, ...]] = ()  # keys of exact_metrics(); the report's extra columns
    conditional_metric_keys: ClassVar[tuple[str, ...]] = ()  # keys of conditional_metrics() (e.g. clip_score)
    convergence_metric: ClassVar[str | None] = None  # the training_metric() key convergence_auc integrates
    convergence_panels: ClassVar[tuple[str, ...]] = ()  # training_metric() keys the report plots over training
    # The metrics that can see what distillation changes in this world (mode coverage, sample quality), as
    # (metrics.json key, "higher" | "lower" better): the report judges claims on these alone and leads with them;
    # every other metric is a secondary column. A metric blind to the effect would make a verdict meaningless.
    primary_metrics: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "lower"), ("precision", "higher"),
                                                                ("recall", "higher"))
    # the report's sample figure: 'points' (a scatter of the first two coordinates), 'grid' (images) or None: from
    # data_shape (a vector: points; (C, H, W): a grid; anything else: no figure, and the page says why)
    sample_figure: ClassVar[str | None] = None
    eval_needs: ClassVar[EvalNeeds] = EvalNeeds()
    # distillation, sampling and evaluation read the prepared data file (text2image: the prompts); other worlds'
    # distillation is data-free, and their evaluation reads only the reference statistics
    training_reads_data: ClassVar[bool] = False
    speed_batch: ClassVar[int] = 256  # samples per timed batch of the student/teacher speed measurement

    def __init__(self, name: str, cfg: WorldConfig) -> None:
        self.name, self.cfg = name, cfg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # --- static: read torch-free by params validation and the stage table -------------------------------------

    @classmethod
    def check_config(cls, cfg: WorldConfig, key: str) -> str | None:
        """A problem with this world's settings, as the message after ``key`` (worlds.<name>), or None."""
        return None

    @property
    def data_file(self) -> Path:
        from mct import paths

        return paths.world_data(self.name, self.data_suffix)

    # --- the data ---------------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one sample (without the batch dimension)."""

    @property
    def label_dim(self) -> int:
        """Classes of the class-conditional world (one-hot labels of this length); 0: unconditional."""
        return 0

    # --- conditioning: what the networks are given beside x and sigma ---------------------------------------

    def draw_labels(self, n: int, rng: torch.Generator, device: torch.device | str = "cpu") -> Tensor | None:
        """Conditioning of n training samples (score network and E-step), drawn from ``rng``: uniform one-hot classes
        (None: unconditional). A world whose conditions are not classes (text2image: prompt embeddings) overrides
        this and :meth:`eval_labels`. Drawn where ``rng`` lives (a CPU generator gives the same set on any device),
        then moved to ``device``."""
        return one_hot_labels(n, self.label_dim, rng, device)

    def eval_labels(self, start: int, n: int, rng: torch.Generator, device: torch.device | str = "cpu"
                    ) -> tuple[Tensor | None, Tensor | None]:
        """(conditioning, integer ids stored with the samples) of evaluation samples ``start .. start + n - 1``:
        random classes by default (:func:`class_labels`, the draw of :meth:`draw_labels`, as mct.student.generate
        draws for a bare class count); a world evaluated on a fixed prompt list gives its prompts in order."""
        return class_labels(n, self.label_dim, rng, device)

    def null_labels(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """The unconditional input of classifier-free guidance (mct.diffusion.GuidedDenoiser), for worlds whose
        networks were trained with one."""
        raise ValueError(f"world {self.name!r} ({self.kind}) has no unconditional input: classifier-free guidance "
                         "(distill.guidance_scale, teachers.<name>.guidance_scale) must stay 1")

    # --- samples as evaluated ---------------------------------------------------------------------------------

    def finish_samples(self, x: Tensor, ids: Tensor | None) -> Tensor:
        """Generator outputs -> the samples `mct sample` stores and evaluation measures: as they are, or quantised
        to uint8 as EDM saves images (``samples_uint8``); a latent world decodes them here."""
        if self.samples_uint8:
            from mct.images import quantize

            return quantize(x)
        return x

    def conditional_metrics(self, images: Tensor, ids: Tensor | None) -> dict[str, np.ndarray]:
        """Per-sample metrics of samples against their conditions (keys ``conditional_metric_keys``; text2image:
        CLIP score against the prompt); the evaluator reports their means."""
        return {}

    def import_teacher(self, tcfg: TeacherConfig, out: Path) -> dict[str, Any]:
        """A teacher of kind 'local': imported from the world's own model folder into an mct denoiser file."""
        raise ValueError(f"world {self.name!r} ({self.kind}) has no local teacher; teacher kinds: train, fetch")

    @property
    @abstractmethod
    def sigma_data(self) -> float:
        """EDM's sigma_data: the data's standard deviation per coordinate, which the preconditioning assumes."""

    @abstractmethod
    def prepare(self, out: Path) -> None:
        """Write the world's data file to ``out`` (atomically): the `prepare` stage."""

    def load_split(self, path: Path, split: str = "train") -> tuple[Tensor, Tensor | None]:
        """(x, one-hot labels or None) of a split ('train' or 'test') of a prepared data file."""
        raise NotImplementedError(f"world {self.name!r} ({self.kind}) has no in-memory splits")

    def reference_batches(self, path: Path, batch_size: int = 500) -> Iterator[Tensor]:
        """The FID reference set in batches; by default the held-out split."""
        x, _ = self.load_split(path, "test")
        yield from x.split(batch_size)

    # --- networks ---------------------------------------------------------------------------------------------

    def build_network(self, arch: str, arch_kwargs: dict) -> EDMPrecond:
        """A fresh denoiser of architecture ``arch`` for this world (teacher, generator, score network)."""
        if arch == "mlp":
            from mct.nets.mlp import build_mlp_denoiser

            return build_mlp_denoiser(dim=self.data_shape[0], sigma_data=self.sigma_data, label_dim=self.label_dim,
                                      **arch_kwargs)
        raise ValueError(f"arch {arch!r} cannot be built for world {self.name!r}")

    def analytic_denoiser(self) -> nn.Module:
        """The exact denoiser E[x0 | x_sigma], where the world knows its density in closed form."""
        raise ValueError(f"world {self.name!r} ({self.kind}) has no analytic denoiser")

    # --- evaluation -------------------------------------------------------------------------------------------

    def figure_kind(self) -> str | None:
        """How the report draws this world's samples: ``sample_figure``, else what ``data_shape`` allows."""
        if self.sample_figure is not None:
            return self.sample_figure
        return {1: "points", 3: "grid"}.get(len(self.data_shape))

    def true_distribution(self) -> Any | None:
        """The data distribution in closed form, where the world knows it: an object with ``sample(n, generator)``
        and ``log_prob(x)`` (the report draws the data panel and the density contour from it); None otherwise."""
        return None

    def exact_data_sample(self, n: int, rng: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        """n exact draws of the data distribution (the exact E-step's x_0), for worlds with ``has_exact_estep``."""
        raise ValueError(f"world {self.name!r} ({self.kind}) has no exact data sampler (distill.estep: exact)")

    def exact_log_prob(self, x: Tensor, sigma: float) -> Tensor:
        """log p_t(x) of the data convolved with N(0, sigma^2 I), for worlds with ``has_exact_estep``."""
        raise ValueError(f"world {self.name!r} ({self.kind}) has no exact density")

    def exact_metrics(self, x: Tensor) -> dict[str, Any]:
        """Metrics against the true distribution (keys ``exact_metric_keys``), for worlds that know it."""
        return {}

    def training_metric(self) -> Callable[[Tensor], dict[str, float]] | None:
        """A cheap quality metric of samples, computed during training (convergence curves); None: none."""
        return None

    def noise_floor_ready(self, feature_path: Path | None) -> bool:
        """Whether the report can measure this world's data against itself (train vs held-out split)."""
        return False

    @property
    def paper_dataset(self) -> str | None:
        """The dataset name under which the paper's tables (mct/data/paper_numbers.csv) report this world, if any."""
        return None


def one_hot_labels(n: int, label_dim: int, rng: torch.Generator, device: torch.device | str = "cpu") -> Tensor | None:
    """Uniform class labels drawn from ``rng`` (deterministic given its state) where it lives (a CPU generator gives
    the same set on any device), one-hot, then moved to ``device``; None if unconditional."""
    if label_dim == 0:
        return None
    import torch

    idx = torch.randint(0, label_dim, (n,), generator=rng, device=rng.device)
    return torch.nn.functional.one_hot(idx, label_dim).float().to(device)


def class_labels(n: int, label_dim: int, rng: torch.Generator, device: torch.device | str = "cpu"
                 ) -> tuple[Tensor | None, Tensor | None]:
    """The labels of n samples of a world conditioned on ``label_dim`` uniform classes (0: unconditional), as
    (one-hot conditioning, integer class ids stored with the samples), or (None, None). The one definition of
    :meth:`World.eval_labels`'s default and of mct.student.generate's labels for a class count."""
    labels = one_hot_labels(n, label_dim, rng, device)
    return labels, (None if labels is None else labels.argmax(1))
