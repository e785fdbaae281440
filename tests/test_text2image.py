"""The text-to-image world on tiny real components (tests/t2i_fixture.py): guidance, checks before work, and the
whole pipeline through Snakemake (a real run) and DVC (the same DAG; a real `dvc repro` is the slow test).

The SD parts are random-weight diffusers/transformers models saved in their real formats, so every loader runs as it
would on Stable Diffusion v1.5; only the numbers they produce are meaningless."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mct import paths
from mct.config import parse_params
from mct.diffusion import GuidedDenoiser, denoiser_eps
from mct.nets.sd import SDFolderError, check_sd_folder
from mct.worlds.registry import make_world
from tests.t2i_fixture import EVAL_PROMPTS, EVAL_RESOLUTION, make_t2i_inputs, t2i_params
from tests.test_dag import (
    REPO,
    assert_same_dag,
    dry_run,
    dvc,
    dvc_stages,
    env_for,
    no_slurm_probe,  # noqa: F401 - module fixture: no Slurm controller probe in these engine runs
    parse_dry_run,
    scratch_copy,
    set_params,
)

SUITE, WORLD, TEACHER, EXP = "t2i_tiny", "t2i_tiny", "t2i_tiny_sd", "t2i_tiny_emd"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    return make_t2i_inputs(tmp_path_factory.mktemp("t2i") / "inputs")


def _world(inputs: dict[str, str], **over):
    raw = t2i_params(inputs, check_sd_folder(inputs["source"]))
    raw["worlds"][WORLD].update(over)
    return make_world(WORLD, parse_params(raw).worlds[WORLD])


def test_guided_denoiser_is_the_cfg_combination(inputs):
    """GuidedDenoiser (one batched call over [null, cond]) equals D_null + w (D_cond - D_null) computed from two
    separate calls, in D and equally in eps. float64 on the tiny SD UNet: only summation order differs, so 1e-10."""
    from mct.nets.sd import TextEncoder, sd_alpha_bar, sd_denoiser, unet_config, unet_from_config

    folder = inputs["source"]
    unet = unet_from_config(unet_config(folder))
    den = sd_denoiser(unet, sd_alpha_bar(folder)).double().eval()
    enc = TextEncoder(folder)
    cond = enc.encode(["a red cat", "two dogs", "a blue car"]).double()
    null = lambda n: enc.uncond(n).double()  # noqa: E731
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([0.3, 2.0, 14.0], dtype=torch.float64)
    w = 3.0
    with torch.no_grad():
        guided = GuidedDenoiser(den, null, w)(x, sigma, cond)
        d_null, d_cond = den(x, sigma, null(3)), den(x, sigma, cond)
        eps_guided = denoiser_eps(GuidedDenoiser(den, null, w), x, sigma, cond)
        eps_direct = denoiser_eps(den, x, sigma, null(3)) + w * (denoiser_eps(den, x, sigma, cond)
                                                                 - denoiser_eps(den, x, sigma, null(3)))
    torch.testing.assert_close(guided, d_null + w * (d_cond - d_null), rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_guided, eps_direct, rtol=0, atol=1e-10)
    assert (guided - d_cond).abs().max() > 1e-3  # guidance changed the prediction: the test can fail
    with torch.no_grad():
        torch.testing.assert_close(GuidedDenoiser(den, null, 1.0)(x, sigma, cond), d_cond, rtol=0, atol=1e-10)


def test_world_checks_name_what_is_missing(inputs, tmp_path):
    with pytest.raises(ValueError, match=r"worlds\.t2i_tiny\.source: the text2image world needs it"):
        parse_params({**t2i_params(inputs), "worlds": {WORLD: {"kind": "text2image"}}})
    world = _world(inputs, captions=str(tmp_path / "nowhere.txt"))
    with pytest.raises(ValueError, match="nowhere.txt"):
        world.prepare(tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(ValueError, match="resolution: must be a multiple of 64"):
        parse_params({**t2i_params(inputs), "worlds": {WORLD: {**t2i_params(inputs)["worlds"][WORLD],
                                                               "resolution": 72}}})


def test_prepare_refuses_a_pickle_and_a_wrong_pin_before_writing(inputs, tmp_path):
    import shutil

    folder = Path(shutil.copytree(inputs["source"], tmp_path / "sd"))
    pins = check_sd_folder(folder)
    bad_pin = dict(pins, **{"unet/diffusion_pytorch_model.safetensors": "0" * 64})
    out = tmp_path / "out.json"
    with pytest.raises(SDFolderError, match="unet/diffusion_pytorch_model.safetensors"):
        _world(inputs, source=str(folder), sha256_files=bad_pin).prepare(out)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SDFolderError, match=r"diffusion_pytorch_model\.bin"):
        _world(inputs, source=str(folder), sha256_files=pins).prepare(out)
    assert not out.exists()


def test_prepare_asks_for_pins_and_lists_the_hashes(inputs, tmp_path):
    """An unpinned model folder is never used: the error names the key and gives the hashes to paste."""
    pins = check_sd_folder(inputs["source"])
    with pytest.raises(ValueError, match=r"worlds\.t2i_tiny\.sha256_files: pin") as err:
        _world(inputs, sha256_files={}).prepare(tmp_path / "out.json")
    assert all(f"{path}: {digest}" in str(err.value) for path, digest in pins.items())
    assert not (tmp_path / "out.json").exists()


def test_paper_scale_text2image_suite_plans_in_both_engines_and_on_slurm(tmp_path):
    """t2i_sd15 (SD v1.5, COCO-2014 30k) plans the same DAG in both engines without any of its inputs present, its
    distillation launches on 4 nodes x 8 GPUs, and the Slurm profile plans it too."""
    root = scratch_copy(tmp_path / "repo")
    set_params(root, lambda raw: raw.update(suite="t2i_sd15"))
    smk = parse_dry_run(dry_run(root))
    assert_same_dag(smk, dvc_stages(root))
    distill = smk[("distill", "t2i_sd15_emd")].command
    assert distill.startswith("srun --nodes 4 --ntasks-per-node 1") and "--num_machines 4" in distill
    assert "--num_processes 32" in distill
    profile = REPO / "workflow" / "profiles" / "slurm"
    text = dry_run(root, "--profile", str(profile))
    assert "rule distill" in text and "t2i_sd15_emd" in text


def _engine_copy(root: Path, inputs: dict[str, str]) -> Path:
    root = scratch_copy(root)
    pins = check_sd_folder(inputs["source"])
    set_params(root, lambda raw: raw.clear() or raw.update(t2i_params(inputs, pins)))
    return root


def _env(root: Path, inputs: dict[str, str]) -> dict[str, str]:
    return {**env_for(root), "MCT_INCEPTION_PATH": inputs["inception"], "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_both_engines_plan_the_same_text2image_dag(inputs, tmp_path):
    """The tiny suite's DAG is the same in both engines, and the runs after `teacher` read the prompts."""
    root = _engine_copy(tmp_path / "repo", inputs)
    smk = parse_dry_run(dry_run(root))
    assert_same_dag(smk, dvc_stages(root))
    data = str(paths.world_data(WORLD, ".json"))
    for stage in ("distill", "sample", "evaluate"):
        assert data in smk[(stage, EXP)].inputs, stage
    assert data in smk[("teacher_eval", TEACHER)].inputs


def _check_outputs(root: Path, inputs: dict[str, str]) -> None:
    """What the stages wrote: prompts, the imported teacher, decoded samples with their prompt ids, FID and the CLIP
    score, and the report's text-to-image table."""
    prepared = json.loads((root / paths.world_data(WORLD, ".json")).read_text())
    assert len(prepared["eval"]) == EVAL_PROMPTS and len(prepared["train_prompts"]) == 20
    assert set(prepared["sha256_files"]) == {"unet/diffusion_pytorch_model.safetensors",
                                             "vae/diffusion_pytorch_model.safetensors",
                                             "text_encoder/model.safetensors"}
    with np.load(root / paths.samples_file(EXP)) as f:
        x, ids = f["x"], f["labels"]
    assert x.dtype == np.uint8 and x.shape == (EVAL_PROMPTS, 3, EVAL_RESOLUTION, EVAL_RESOLUTION)
    np.testing.assert_array_equal(ids, np.arange(EVAL_PROMPTS))  # sample i is scored against caption i
    rec = json.loads((root / paths.experiment_metrics(EXP)).read_text())
    assert np.isfinite(rec["fid"]) and rec["guidance_scale"] == 3.0 and rec["K"] == 2
    # The CLIP score is the mean cosine of the stored images and their captions, recomputed here.
    import open_clip

    from mct.metrics.clip_score import ClipScorer

    open_clip.add_model_config(inputs["clip_model"])
    scorer = ClipScorer(inputs["clip_weights"], Path(inputs["clip_model"]).stem)
    direct = scorer.score(torch.from_numpy(x), [prepared["eval"][i][1] for i in ids]).mean() / 100
    assert rec["clip_score"] == pytest.approx(direct, rel=1e-5)
    trec = json.loads((root / paths.teacher_metrics(TEACHER)).read_text())
    assert trec["nfe"] == 2 * 3 and np.isfinite(trec["fid"]) and 0 <= trec["clip_score"] <= 1  # 3 Heun NFE, guided
    table = (root / paths.REPORTS / "tables" / "text_to_image.csv").read_text()
    assert "9.66" in table and EXP in table and "not run" not in table  # ours not run: a line under the table
    page = (root / paths.REPORTS / "index.md").read_text()
    assert "Not run here: EMD on COCO-2014 30k, SD v1.5; " in page and "the paper's protocol needs" in page


@pytest.mark.slow  # 277 s on the idle 2-core machine: CI runs it after the default suite (.ci/run)
def test_tiny_text2image_suite_runs_through_snakemake(inputs, tmp_path):
    """prepare -> ref-stats -> teacher (local folder, pinned) -> teacher-eval -> init-student -> distill (K = 2,
    guidance 3) -> sample -> evaluate -> report, for real, in Snakemake (about 2-3 min on 2 cores)."""
    root = _engine_copy(tmp_path / "repo", inputs)
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2"], cwd=root, env=_env(root, inputs),
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    _check_outputs(root, inputs)


@pytest.mark.slow  # a second real run of the same stages, by DVC (342 s); CI runs it after the default suite
def test_tiny_text2image_suite_runs_through_dvc(inputs, tmp_path):
    root = _engine_copy(tmp_path / "repo", inputs)
    env = _env(root, inputs)
    r = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    _check_outputs(root, inputs)
    assert dvc(root, "status").stdout.strip().endswith("up to date.") or "changed" not in dvc(root, "status").stdout
