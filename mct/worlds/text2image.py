"""Text-to-image world: Stable Diffusion's latent space, prompts as conditions, the zero-shot COCO-2014 protocol.

What differs from the other worlds, and only here:

* **samples are SD latents** (4 x resolution/8 x resolution/8, scaled by the VAE's scaling factor so they have
  about unit variance: sigma_data = 1). The generator, score network and E-step run on latents; the VAE decodes only
  when samples are finished (:meth:`finish_samples`), so evaluation sees images.
* **the teacher** is the local diffusers folder's UNet (kind ``local``, arch ``sd_unet``): VP eps-prediction,
  wrapped as a VE denoiser by :class:`mct.diffusion.VPEpsDenoiser` (input scaled by 1/sqrt(1 + sigma^2), the nearest
  of the 1000 discrete timesteps in log-SNR; sigma_max about 14.6 on the scaled-linear schedule). The folder is
  verified before anything loads: safetensors only, every weight file pinned by its sha256 (``sha256_files``).
* **conditions are prompt embeddings** (the CLIP text encoder's last hidden states, B x 77 x D), passed where the
  class labels of the other worlds go; the unconditional input of classifier-free guidance is the empty prompt's.
  Training prompts come from a local captions file; evaluation prompts are the COCO val2014 captions of
  :func:`mct.coco.coco_eval_pairs`, in order, so sample i is scored against its own caption.
* **evaluation**: generated images (``resolution`` px) and the val2014 reference photos both go through centre crop
  and a Lanczos resize to ``eval_resolution`` (256), then clean-fid's Inception in 'clean' mode; the CLIP score
  (open_clip, "A photo depicts " + prompt) is the world's conditional metric.

Torch-free at module level (the stage table reads this class while Snakemake parses the workflow).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mct.worlds.base import EvalNeeds, World

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor

    from mct.config import TeacherConfig, WorldConfig
    from mct.diffusion import VPEpsDenoiser

DATA_FORMAT = "mct-text2image-v1"
VAE_FACTOR = 8  # SD's VAE: 4 blocks, 3 downsamplings
LATENT_CHANNELS = 4
PAPER_EVAL_PROMPTS = 30_000
TEXT_BATCH = 64  # prompts per text-encoder call
EVAL_PAIRS_SEED = 2014  # the seeded choice of the evaluation images (mct.coco.coco_eval_pairs)


class Text2Image(World):
    data_suffix: ClassVar[str] = ".json"
    reference_split: ClassVar[str] = "COCO val2014 (the evaluation captions' images)"
    feature_space: ClassVar[str] = "inception-clean"
    fd_name: ClassVar[str] = "FID"
    samples_uint8: ClassVar[bool] = True
    conditional_metric_keys: ClassVar[tuple[str, ...]] = ("clip_score",)
    primary_metrics: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "lower"), ("clip_score", "higher"))  # DMD
    sample_figure: ClassVar[str] = "grid"
    # Inception and CLIP ViT-g-14 over 30k images at 256 px: a GPU and hours
    eval_needs: ClassVar[EvalNeeds] = EvalNeeds(mem_mb=32000, runtime=8 * 60, gpu=1, ref_threads=4)
    takes_local_teacher: ClassVar[bool] = True  # the model folder's UNet (import_teacher)
    training_reads_data: ClassVar[bool] = True  # the prompts are in the prepared data file
    speed_batch: ClassVar[int] = 4  # a UNet pass per sample (CFG teacher: two); the tiny test world times on CPU

    def __init__(self, name: str, cfg: WorldConfig) -> None:
        super().__init__(name, cfg)
        self._cache: dict[str, Any] = {}

    # --- static ---------------------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: WorldConfig, key: str) -> str | None:
        for field in ("source", "captions", "annotations", "images"):
            if not getattr(cfg, field):
                return (f"{key}.{field}: the text2image world needs it (source: the local Stable Diffusion folder; "
                        "captions: training prompts; annotations: COCO's captions_val2014.json; images: the val2014 "
                        "folder)")
        if cfg.resolution % (VAE_FACTOR * 8):
            return (f"{key}.resolution: must be a multiple of {VAE_FACTOR * 8} (SD's VAE and UNet), "
                    f"got {cfg.resolution}")
        return None

    @property
    def data_shape(self) -> tuple[int, ...]:
        side = self.cfg.resolution // VAE_FACTOR
        return (LATENT_CHANNELS, side, side)

    @property
    def sigma_data(self) -> float:
        return 1.0  # SD scales its latents by the VAE's scaling factor to about unit variance

    @property
    def paper_dataset(self) -> str | None:
        return "COCO-2014 30k, SD v1.5" if self.cfg.eval_prompts == PAPER_EVAL_PROMPTS else None

    # --- the data: prompts ----------------------------------------------------------------------------------

    def prepare(self, out: Path) -> None:
        """Verify the model folder (safetensors, pins) and write the prompts: training captions and the evaluation
        (image, caption) pairs, with the folder's hashes."""
        from mct.coco import coco_eval_pairs, read_captions
        from mct.io import atomic_path
        from mct.nets.sd import check_sd_folder

        hashes = check_sd_folder(self.cfg.source, self.cfg.sha256_files or None)
        if not self.cfg.sha256_files:  # like a fetched teacher's sha256: nothing unpinned is used
            found = "".join(f"\n      {path}: {digest}" for path, digest in sorted(hashes.items()))
            raise ValueError(f"worlds.{self.name}.sha256_files: pin the model folder's weight files before use; "
                             f"after checking them, set:\n    sha256_files:{found}")
        self._check_vae()
        train = read_captions(self.cfg.captions)
        pairs = coco_eval_pairs(self.cfg.annotations, self.cfg.eval_prompts, EVAL_PAIRS_SEED)
        images = Path(self.cfg.images)
        missing = [f for f, _ in pairs if not (images / f).is_file()]
        if missing:
            from mct.coco import CaptionsError

            raise CaptionsError(f"worlds.{self.name}.images: {len(missing)} evaluation image(s) missing under "
                                f"{images}, e.g. {missing[0]} (the folder must hold COCO's val2014 images)")
        record = {"format": DATA_FORMAT, "source": str(Path(self.cfg.source).resolve()), "sha256_files": hashes,
                  "train_prompts": train, "eval": [[f, c] for f, c in pairs]}
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(record))

    def _check_vae(self) -> None:
        cfg = json.loads((Path(self.cfg.source) / "vae" / "config.json").read_text())
        factor = 2 ** (len(cfg.get("block_out_channels", ())) - 1)
        if factor != VAE_FACTOR or cfg.get("latent_channels") != LATENT_CHANNELS:
            raise ValueError(f"worlds.{self.name}.source: the VAE maps images to {cfg.get('latent_channels')} "
                             f"channels at 1/{factor} of the size; this world expects SD's {LATENT_CHANNELS} at "
                             f"1/{VAE_FACTOR}")

    @functools.cached_property
    def prompts(self) -> dict[str, Any]:
        """The prepared data file: training prompts and evaluation (image, caption) pairs."""
        path = self.data_file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the text2image world's prompts are not prepared; run "
                                    f"`mct prepare --world {self.name}` first")
        record = json.loads(path.read_text())
        if record.get("format") != DATA_FORMAT:
            raise ValueError(f"{path}: not a prepared text2image file (format {record.get('format')!r})")
        return record

    def reference_batches(self, path: Path, batch_size: int = 500) -> Iterator[Tensor]:
        from mct.coco import reference_batches

        files = [f for f, _ in json.loads(Path(path).read_text())["eval"]]
        yield from reference_batches(self.cfg.images, files, self.cfg.eval_resolution, min(batch_size, 100))

    # --- conditioning ---------------------------------------------------------------------------------------

    def _text_encoder(self, device: torch.device | str):
        key = f"text:{device}"
        if key not in self._cache:
            from mct.nets.sd import TextEncoder

            self._cache[key] = TextEncoder(self.cfg.source, device=device)
        return self._cache[key]

    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> Tensor:
        """Prompt embeddings (B, 77, D), in batches of TEXT_BATCH."""
        import torch

        enc = self._text_encoder(device)
        return torch.cat([enc.encode(prompts[i:i + TEXT_BATCH]) for i in range(0, len(prompts), TEXT_BATCH)])

    def draw_labels(self, n: int, rng: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        import torch

        train = self.prompts["train_prompts"]
        idx = torch.randint(0, len(train), (n,), generator=rng, device=device).tolist()
        return self.encode([train[i] for i in idx], device)

    def eval_labels(self, start: int, n: int, rng: torch.Generator, device: torch.device | str = "cpu"
                    ) -> tuple[Tensor, Tensor]:
        """The evaluation captions start .. start + n - 1, in order (cycled past the end)."""
        import torch

        pairs = self.prompts["eval"]
        ids = torch.arange(start, start + n) % len(pairs)
        return self.encode([pairs[i][1] for i in ids.tolist()], device), ids

    def null_labels(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        return self._text_encoder(device).uncond(n)

    # --- networks -------------------------------------------------------------------------------------------

    def build_network(self, arch: str, arch_kwargs: dict) -> VPEpsDenoiser:
        """``sd_unet``: a UNet2DConditionModel from its config, in the VE denoiser wrapper of its schedule."""
        if arch != "sd_unet":
            raise ValueError(f"arch {arch!r} cannot be built for world {self.name!r} (text2image: sd_unet)")
        import torch

        from mct.nets.sd import sd_denoiser, unet_from_config

        unet = unet_from_config(arch_kwargs["config"], use_checkpoint=bool(arch_kwargs.get("use_checkpoint")))
        return sd_denoiser(unet, torch.tensor(arch_kwargs["alpha_bar"], dtype=torch.float64))

    def import_teacher(self, tcfg: TeacherConfig, out: Path) -> dict[str, Any]:
        """The folder's UNet (verified: safetensors only, pinned) as an mct denoiser file: its config, its
        schedule's alpha_bar and its weights, so every later stage loads it like any other teacher."""
        from mct.nets.sd import check_sd_folder, load_unet_state, sd_alpha_bar, unet_config
        from mct.teacher import denoiser_spec, save_denoiser

        if tcfg.arch != "sd_unet":
            raise ValueError(f"teachers.{tcfg.world}: a local text2image teacher has arch sd_unet, not {tcfg.arch!r}")
        folder = tcfg.source or self.cfg.source
        hashes = check_sd_folder(folder, self.cfg.sha256_files or None)
        kwargs = {"config": unet_config(folder), "alpha_bar": sd_alpha_bar(folder).tolist()}
        net = self.build_network("sd_unet", kwargs)
        net.eps_net.unet.load_state_dict(load_unet_state(folder))
        info = {"source": str(Path(folder).resolve()), "sha256_files": hashes,
                "parameters": sum(p.numel() for p in net.parameters())}
        save_denoiser(out, net, denoiser_spec(self, "sd_unet", kwargs), info)
        return info

    # --- samples as evaluated -------------------------------------------------------------------------------

    def finish_samples(self, x: Tensor, ids: Tensor | None) -> Tensor:
        """Latents -> VAE decode at ``resolution`` -> centre crop and Lanczos resize to ``eval_resolution``, uint8."""
        from mct.coco import images_to_uint8_resized
        from mct.nets.sd import decode_latents, load_vae

        key = f"vae:{x.device}"
        if key not in self._cache:
            self._cache[key] = load_vae(self.cfg.source, device=x.device)
        images = decode_latents(self._cache[key], x.float())
        return images_to_uint8_resized(images.cpu(), self.cfg.eval_resolution)

    def conditional_metrics(self, images: Tensor, ids: Tensor | None) -> dict[str, np.ndarray]:
        """CLIP score of each image against its evaluation caption (open_clip, local weights)."""
        if ids is None:
            raise ValueError(f"world {self.name!r}: samples carry no prompt ids, so the CLIP score has no captions")
        pairs = self.prompts["eval"]
        # DMD's tables report the mean cosine (0.3 for SD v1.5 at guidance 8): ClipScorer's 100 max(cos, 0) / 100
        return {"clip_score": self._clip().score(images, [pairs[i][1] for i in ids.tolist()]) / 100.0}

    def _clip(self):
        if "clip" not in self._cache:
            import torch

            from mct.metrics.clip_score import ClipScorer

            model = self.cfg.clip_model
            if model.endswith(".json"):  # a model config file (tests: a tiny CLIP), registered under its stem
                import open_clip

                open_clip.add_model_config(model)
                model = Path(model).stem
            self._cache["clip"] = ClipScorer(self.cfg.clip_weights, model,
                                            device="cuda" if torch.cuda.is_available() else "cpu")
        return self._cache["clip"]
