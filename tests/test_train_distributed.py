"""Data-parallel training (ldm/train/loop.py under torchrun): 2 CPU processes (gloo) train the weights of 1.

One torchrun launch runs scripts/train.py's `main` for both stages with world size 2 (12 steps each); the same
commands run here in one process. The global batch is split over the ranks, every draw is made for the whole
batch, and DistributedDataParallel averages the gradients, so the runs differ only by float rounding (the
gradient sums over the batch run in another order). Then each run resumes in one process: a checkpoint of
world size 2 continues at world size 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_config_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402  scripts/train.py

CONFIG = str(tiny_config_path("tiny-v1"))

pytestmark = pytest.mark.usefixtures("one_thread")

# Both torchrun processes join one process group and run the two stages through train.main, which leaves a
# group it did not create to its creator.
DRIVER = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train
dist.init_process_group("gloo")
for argv in json.loads(sys.argv[2]):
    train.main(argv)
dist.destroy_process_group()
"""


def autoencoder(out: Path) -> list[str]:
    # global batch 2: one 32 px image per rank
    return ["autoencoder", "--config", CONFIG, "--out", str(out), "--steps", "12", "--batch-size", "2",
            "--warmup", "2", "--log-every", "1", "--threads", "1", "--image-size", "32"]


def diffusion(first_stage: Path, out: Path, steps: int = 12) -> list[str]:
    # tiny-v1 trains its text encoder too (cond_stage_trainable); no latent pool: each rank encodes its rows
    return ["diffusion", "--config", CONFIG, "--first-stage", str(first_stage), "--out", str(out), "--steps",
            str(steps), "--batch-size", "4", "--warmup", "2", "--log-every", "1", "--ema-decay", "0.9",
            "--threads", "1", "--image-size", "32"]


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def update_distance(start: dict, reference: dict, other: dict) -> float:
    """|other - reference| / |reference - start| over every tensor the run changed (weights and EMA)."""
    keys = [k for k in reference if reference[k].is_floating_point() and not torch.equal(reference[k], start[k])]
    assert keys
    update = torch.cat([(reference[k] - start[k]).double().flatten() for k in keys])
    gap = torch.cat([(other[k] - reference[k]).double().flatten() for k in keys])
    return float(gap.norm() / update.norm())


def log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# AdamW divides each gradient by its running RMS, so on parameters whose gradient is rounding noise (biases
# ahead of a GroupNorm) a last-bit difference in the gradient sums becomes a step of ~lr. Measured on this
# CPU with these settings, as |difference| / |update of the run|: one process against itself with 2 threads
# instead of 1 (the same kind of rounding) 2.9e-3 (autoencoder) and 1.2e-3 (diffusion); world size 2 against
# world size 1 3.4e-3 and 1.2e-3; a run that sees other samples (half the batch) 1.18 and 1.22. The bound
# sits 6x above the rounding and 60x below other samples.
TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both stages at world size 1 (here) and 2 (torchrun), and their initial weights."""
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    one.mkdir(), two.mkdir()
    train.main(autoencoder(one / "vae.ckpt"))
    train.main(diffusion(one / "vae.ckpt", one / "start.ckpt", steps=0))  # the initial weights
    train.main(diffusion(one / "vae.ckpt", one / "ldm.ckpt"))
    stages = [autoencoder(two / "vae.ckpt"), diffusion(one / "vae.ckpt", two / "ldm.ckpt")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--no-python", sys.executable, "-c", DRIVER, str(ROOT / "scripts"), json.dumps(stages)],
                            capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return one, two


def test_two_processes_train_the_weights_of_one(runs):
    one, two = runs
    distance = update_distance(state(one / "start.ckpt"), state(one / "ldm.ckpt"), state(two / "ldm.ckpt"))
    assert distance < TOLERANCE
    # the autoencoder stage starts from the random VAE of the seed
    vae_start = train.build(train.build_parser().parse_args(autoencoder(one / "vae.ckpt"))).first_stage_model
    start = {k: v.detach() for k, v in vae_start.state_dict().items()}
    assert update_distance(start, state(one / "vae.ckpt"), state(two / "vae.ckpt")) < TOLERANCE


def test_every_log_line_records_the_world_size_and_the_global_loss(runs):
    one, two = runs
    for name, lines in (("vae.jsonl", 12), ("ldm.jsonl", 12)):
        a, b = log(one / name), log(two / name)
        assert [r["world_size"] for r in a] == [1] * lines and [r["world_size"] for r in b] == [2] * lines
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, lines + 1))
        for x, y in zip(a, b):
            # the loss of the same global batch (the mean of the ranks' means); 1e-3: the weights it is
            # computed with differ by rounding amplified as above
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-3) and y["lr"] == x["lr"]
    assert not (two / "start.ckpt").exists()  # rank 0 wrote what it was asked to, nothing else


def test_a_checkpoint_of_two_processes_resumes_in_one(runs, tmp_path):
    one, two = runs
    for folder in (one, two):
        shutil.copy(folder / "ldm.ckpt", tmp_path / f"{folder.name}.ckpt")
        train.main(diffusion(one / "vae.ckpt", tmp_path / f"{folder.name}.ckpt", steps=14))
    resumed = state(tmp_path / "two.ckpt")
    assert int(torch.load(tmp_path / "two.ckpt", weights_only=True)["global_step"]) == 14
    assert update_distance(state(one / "start.ckpt"), state(tmp_path / "one.ckpt"), resumed) < TOLERANCE
    assert log(tmp_path / "two.jsonl")[-1]["world_size"] == 1


def test_a_global_batch_must_split_evenly(tmp_path, monkeypatch):
    from ldm import distributed

    # rank 0 of 3, as torchrun --nproc_per_node 3 would start it (without joining a process group)
    monkeypatch.setattr(distributed, "init", lambda device: distributed.World(0, 3, 0, torch.device("cpu")))
    with pytest.raises(SystemExit) as exit_info:
        train.main(diffusion(tmp_path / "vae.ckpt", tmp_path / "ldm.ckpt"))
    assert "train.py: error: --batch-size 4 does not split evenly over 3 processes" in str(exit_info.value)
    assert not any(tmp_path.iterdir())
