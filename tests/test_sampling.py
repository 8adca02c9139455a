"""One interface for multi-step and one-step models: seeds pair images, saved models reproduce them."""

import torch

from bench.runner import eval_grid
from bench.sampling import DiffusionModel, OneStepGenerator, load_sampler
from tests.helpers import tiny_teacher


def test_image_i_depends_only_on_its_seed():
    model = tiny_teacher()
    labels = torch.tensor([0, 1, 2, 3])
    full = model.sample(labels, [10, 11, 12, 13], steps=3, guidance=1.0, batch_size=4)
    part = model.sample(labels[2:], [12, 13], steps=3, guidance=1.0, batch_size=1)
    assert torch.allclose(full[2:], part, atol=1e-5)
    assert not torch.allclose(full[0], full[1])


def test_one_step_and_multi_step_save_reload_reproduce(tmp_path):
    labels, seeds = eval_grid(10, 2, seed=0)
    for model in (tiny_teacher(), OneStepGenerator(tiny_teacher(1).unet, t_init=440)):
        kw = {"steps": 4, "guidance": 2.0, "eta": 1.0}
        before = model.sample(labels, seeds, **kw)
        model.save(tmp_path / model.kind)
        again = load_sampler(tmp_path / model.kind)
        assert type(again) is type(model)
        assert torch.equal(before, again.sample(labels, seeds, **kw))
    assert again.t_init == 440 and again.nfe(steps=4, guidance=2.0) == 1
    assert DiffusionModel(again.unet).nfe(steps=4, guidance=2.0) == 8
    assert DiffusionModel(again.unet).nfe(steps=4, guidance=1.0) == 4


def test_guidance_uses_the_null_class():
    model = tiny_teacher()
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        cond = model.unet(x, torch.tensor([5, 5]), class_labels=labels).sample
        uncond = model.unet(x, torch.tensor([5, 5]), class_labels=torch.tensor([10, 10])).sample
        assert torch.allclose(model.eps(x, 5, labels, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-5)


def test_eval_grid_pairs_images_across_seeds():
    labels, seeds = eval_grid(3, 4, seed=0)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and len(set(seeds)) == 12
    assert set(seeds).isdisjoint(eval_grid(3, 4, seed=1)[1])
