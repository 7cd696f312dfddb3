"""Block hooks by original name with a step filter (ldm/hooks.py), on the demo model."""

import pytest
import torch

import ldm
from ldm import hooks, pipeline
from ldm.demo import DEMO_CKPT, DEMO_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a blue background, top left", "a green square on a white background, bottom right"]


@pytest.fixture(scope="module")
def model():
    return ldm.load_model(str(DEMO_CONFIG), str(DEMO_CKPT))


def images(model, sampler="euler", steps=4):
    return pipeline.txt2img(model, PROMPTS, sampler=sampler, steps=steps, scale=3.0, H=64, W=64, f=4, seed=5,
                            disable=True)


def test_scaling_a_block_changes_the_image_only_at_the_chosen_steps(model):
    plain = images(model)
    with hooks.BlockHooks(model) as h:
        h.scale("middle_block.1", 1.0)
        assert torch.equal(images(model), plain)  # x * 1.0 is x
    with hooks.BlockHooks(model) as h:
        h.scale("model.diffusion_model.middle_block.1", 3.0, steps=range(10, 20))  # the full key; steps never run
        assert torch.equal(images(model), plain)
    with hooks.BlockHooks(model) as h:
        h.scale("middle_block.1", 3.0, steps=0)
        changed = images(model)
    assert not torch.equal(changed, plain)
    # the hooks are gone after the block
    assert torch.equal(images(model), plain)


def test_the_step_index_and_timesteps_a_hook_sees(model):
    seen = []
    with hooks.BlockHooks(model) as h:
        h.observe("input_blocks.3", lambda output, call: seen.append((call.step, call.t.tolist(), output.shape)))
        images(model, sampler="heun", steps=3)
        first = len(seen)
        h.reset()
        images(model, sampler="heun", steps=3)
    # steps count UNet evaluations: heun's 2 per step, 1 on the last (to sigma 0); reset() starts again at 0;
    # the CFG batch holds both halves (4 rows)
    assert [s for s, _, _ in seen[:first]] == [0, 1, 2, 3, 4] and seen[first:] == seen[:first]
    assert all(len(t) == 4 and shape[0] == 4 for _, t, shape in seen)
    # heun evaluates at sigmas 0, 1 | 1, 2 | 2 (then Euler to 0): the timesteps the hooks see
    t = [ts[0] for _, ts, _ in seen[:first]]
    assert t[0] > t[1] == t[2] > t[3] == t[4]


def test_wrap_replaces_and_observe_cannot(model):
    plain = images(model)
    with hooks.BlockHooks(model) as h:
        h.observe("output_blocks.2", lambda output, call: torch.zeros_like(output))
        assert torch.equal(images(model), plain)
    calls = []
    with hooks.BlockHooks(model) as h:
        h.wrap("output_blocks.2", lambda output, call: calls.append(call.name))  # None keeps the output
        h.wrap("output_blocks.2", lambda output, call: torch.zeros_like(output), steps=lambda step: step == 3)
        zeroed = images(model)
    assert calls == ["output_blocks.2"] * 4 and not torch.equal(zeroed, plain)


def test_names_are_checked_when_added(model):
    with pytest.raises(ValueError, match="no block 'middle_block.7'.*input_blocks, middle_block"):
        hooks.BlockHooks(model).wrap("middle_block.7", lambda output, call: output)
    assert isinstance(hooks.block(model.unet, "input_blocks.3.1"), torch.nn.Module)
