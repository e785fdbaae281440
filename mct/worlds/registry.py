"""One interface over every world: data shape, labels, sigma_data, data access and network construction."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mct.config import WorldConfig
from mct.diffusion import EDMPrecond
from mct.worlds.toy2d import GaussianMixture, MixtureDenoiser, grid_mixture

DIGITS_SIGMA_DATA = 0.5  # images in [-1, 1], EDM's convention


@dataclass
class World:
    name: str
    cfg: WorldConfig

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @cached_property
    def mixture(self) -> GaussianMixture:
        if self.kind != "toy2d":
            raise ValueError(f"world {self.name!r} is not a toy2d world")
        return grid_mixture(self.cfg.grid, self.cfg.spacing, self.cfg.std, self.cfg.weights)

    @property
    def data_shape(self) -> tuple[int, ...]:
        if self.kind == "toy2d":
            return (2,)
        if self.kind == "digits":
            return (1, 8, 8)
        return (3, self.cfg.resolution, self.cfg.resolution)

    @property
    def label_dim(self) -> int:
        return {"toy2d": 0, "digits": 10}.get(self.kind, self.cfg.num_classes)

    @cached_property  # read on every training step
    def sigma_data(self) -> float:
        return self.mixture.data_std() if self.kind == "toy2d" else DIGITS_SIGMA_DATA

    def analytic_denoiser(self) -> nn.Module:
        return MixtureDenoiser(self.mixture)

    def prepare(self, out: Path, num_train: int = 100_000, num_test: int = 20_000) -> None:
        """Write the world's data file (atomic): toy2d draws fixed train/test sets, digits makes its split."""
        from mct.io import atomic_path

        if self.kind == "toy2d":
            gen = torch.Generator().manual_seed(self.cfg.seed)
            train = self.mixture.sample(num_train, gen).numpy()
            test = self.mixture.sample(num_test, gen).numpy()
            with atomic_path(out) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, train_x=train, test_x=test, means=self.mixture.means.numpy(),
                             weights=self.mixture.weights.numpy(), std=np.float32(self.cfg.std))
        elif self.kind == "digits":
            from mct.worlds.digits import load_digits_split, save_split

            save_split(out, load_digits_split(self.cfg.held_out_fraction, self.cfg.seed))
        else:
            from mct.worlds.imagenet import prepare_imagenet

            if not self.cfg.source:
                raise ValueError(f"worlds.{self.name}.source: set the ImageNet folder or zip to prepare")
            prepare_imagenet(self.cfg.source, out, self.cfg.resolution, max_images=self.cfg.max_images or None,
                             num_classes=self.cfg.num_classes or None)

    def load_split(self, path: Path, split: str = "train") -> tuple[Tensor, Tensor | None]:
        """(x, one-hot labels or None) of a prepared data file."""
        if self.kind == "toy2d":
            with np.load(path) as f:
                return torch.from_numpy(f[f"{split}_x"]).float(), None
        if self.kind == "digits":
            from mct.worlds.digits import load_split, one_hot

            s = load_split(path)
            x, y = (s.train_x, s.train_y) if split == "train" else (s.test_x, s.test_y)
            x, y = torch.as_tensor(x).float(), torch.as_tensor(y).long()
            return x, one_hot(y, self.label_dim)
        raise NotImplementedError(f"load_split is not available for {self.kind} worlds; use ImageZipDataset")

    def reference_batches(self, path: Path, batch_size: int = 500) -> Iterator[Tensor]:
        """The FID reference set in batches: the held-out split (toy2d, digits; float) or the prepared ImageNet
        archive as uint8 images, streamed in a fixed shuffled order (seed 0), so any prefix of it (the
        precision/recall subset, ``ref_images``) spreads over all classes; memory stays bounded."""
        if self.kind != "imagenet":
            x, _ = self.load_split(path, "test")
            yield from x.split(batch_size)
            return
        from mct.worlds.imagenet import ImageZipDataset, iter_uint8_batches

        dataset = ImageZipDataset(path, one_hot=False)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        if self.cfg.ref_images:
            order = order[:self.cfg.ref_images]
        yield from iter_uint8_batches(dataset, order.tolist(), batch_size)

    def build_network(self, arch: str, arch_kwargs: dict) -> EDMPrecond:
        if arch == "mlp":
            from mct.nets.mlp import build_mlp_denoiser

            return build_mlp_denoiser(dim=self.data_shape[0], sigma_data=self.sigma_data, label_dim=self.label_dim,
                                      **arch_kwargs)
        if arch == "conv":
            from mct.nets.conv import build_digits_denoiser

            return build_digits_denoiser(sigma_data=self.sigma_data, **arch_kwargs)
        if arch == "edm":
            use_checkpoint = bool(arch_kwargs.get("use_checkpoint", False))
            if "network" in arch_kwargs:  # EDM's architecture from its constructor kwargs (random weights)
                from mct.nets.edm import build_network

                net = build_network(arch_kwargs.get("model_type", "DhariwalUNet"),
                                    **{**arch_kwargs["network"], "use_checkpoint": use_checkpoint})
                return EDMPrecond(net, sigma_data=float(arch_kwargs.get("sigma_data", 0.5)),
                                  label_dim=self.label_dim)
            # EDM pickles carry their architecture: a fresh instance is the pickle loaded again (safely).
            from mct.checkpoint import load_edm_pickle

            return load_edm_pickle(arch_kwargs["source"], use_checkpoint=use_checkpoint)["ema"]
        if arch == "adm":
            # guided-diffusion's flags of the checkpoint; the VP schedule is its linear one over diffusion_steps.
            from mct.nets.adm import build_adm_denoiser

            return build_adm_denoiser(arch_kwargs, T=int(arch_kwargs.get("diffusion_steps", 1000)))
        raise ValueError(f"arch {arch!r} cannot be built for world {self.name!r}")


def make_world(name: str, cfg: WorldConfig) -> World:
    return World(name, cfg)
