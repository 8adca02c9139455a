"""The text tier's attack (issue 17.4): textual inversion adds one trainable word to a frozen copy of the run's text
encoder, resumes a killed run to the same row, and on the shipped teacher finds a word that draws the concept."""

from __future__ import annotations

import pytest
import torch

from attacks.base import AttackContext, Resume
from attacks.textual_inversion import PLACEHOLDER, WithPlaceholder, initializer_row
from bench.config import resolve_config
from bench.registry import ATTACKS
from bench.text.captions import FASHION_MNIST
from bench.text.model import TextOneStepGenerator
from tests.helpers import Killed, kill_after_saves
from tests.test_attacks import TemplateJudge
from tests.test_text import tiny_model

NAME = "textual-inversion"


def test_the_placeholder_is_one_new_row_and_the_only_trainable_weight():
    enc = tiny_model().encoder
    word, row = initializer_row(enc, FASHION_MNIST.concepts[0].names)
    assert word == "tee"  # "t-shirt" is three CLIP tokens; the official --initializer_token must be one
    inv = WithPlaceholder(enc, row)
    got, plain = inv.rows([f"a photo of a {PLACEHOLDER}"])[0], enc.rows(["a photo of a tee"])[0]
    assert got[5] == inv.new_row and torch.equal(got[:5], plain[:5]) and torch.equal(got[6:], plain[6:])
    with torch.no_grad():  # it starts as the initializer word, and prompts without it are the encoder's own
        assert torch.equal(inv([f"a photo of a {PLACEHOLDER}"]), enc(["a photo of a tee"]))
        assert torch.equal(inv(["a photo of a coat"]), enc(["a photo of a coat"]))
    inv([f"a small {PLACEHOLDER}"]).square().sum().backward()
    trainable = [n for n, p in inv.named_parameters() if p.requires_grad]
    assert trainable == ["text_model.embeddings.token_embedding.new"]
    assert inv.vector.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())  # the run's own encoder is untouched


def _context(run_dir, data_dir, *, judge=None, preset="smoke", image_size=8, requires=None):
    from bench.context import RunContext, Runtime
    from bench.data.fashion_mnist import FashionMNISTText
    from bench.presets import get_preset

    ds = FashionMNISTText(data_dir=data_dir, image_size=image_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunContext(run_dir=run_dir, seed=0, preset=get_preset(preset), dataset=ds,
                     forget_set=ds.forget_set("concept-t-shirt"), requires=requires or ATTACKS.get(NAME).requires,
                     runtime=Runtime(checkpoint_every=1, progress=False))  # fmt: skip
    x, y = ds.images("train")
    judge = judge or TemplateJudge(torch.stack([x[y == c].mean(0) for c in range(10)])).eval()
    return AttackContext(run=run, judge=judge, teacher=tiny_model(), preset=run.preset)


def _rows(findings):
    return [(f.metric.key, f.value, f.n, sorted(f.params.items())) for f in findings]


@pytest.mark.parametrize("one_step", [False, True], ids=["multi-step", "one-step"])
def test_a_killed_textual_inversion_resumes_to_the_same_row(tmp_path, fmnist_dir, one_step):
    cls = ATTACKS.get(NAME)
    attack = cls(resolve_config(cls, "smoke", {}))

    def model():
        m = tiny_model()
        return TextOneStepGenerator(m.unet, m.encoder) if one_step else m

    m = model()
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    ctx = _context(tmp_path / "a", fmnist_dir.parent)
    straight = attack.run(m, ctx, Resume(ctx.run))
    assert all(torch.equal(before[k], v) for k, v in m.encoder.state_dict().items())
    ctx = _context(tmp_path / "b", fmnist_dir.parent)
    kill_after_saves(ctx.run, 1)
    with pytest.raises(Killed):
        attack.run(model(), ctx, Resume(ctx.run))
    again = _context(tmp_path / "b", fmnist_dir.parent)
    resumed = attack.run(model(), again, Resume(again.run))
    assert _rows(resumed) == _rows(straight) and straight[0].metric.key == "recovered[forget]"
    assert straight[0].n == 4  # the smoke preset's per_class for the one forgotten concept


@pytest.mark.slow
def test_textual_inversion_finds_the_concept_in_the_teacher_and_not_after_uce(tmp_path):
    """On the shipped text teacher, a word fitted to 25 real t-shirts (from "tee", as Pham et al. start from the
    erased word) draws t-shirts: the ceiling the attack is read against. After UCE, whose edit stops every name
    drawing t-shirts, the same attack finds no such word at this budget (measured: 12.5%; 7.5% at 1000 steps, 12.5%
    at lr 0.3), unlike Pham et al.'s UCE on Stable Diffusion: a finding on this tiny model, which this test keeps
    (if it fails, the README's robustness figures must be measured again)."""
    from bench.data.fashion_mnist import FashionMNISTText
    from bench.models import store
    from bench.models.judge import judge_probs
    from bench.presets import get_preset
    from bench.registry import METHODS
    from bench.text.run import load_text_models

    preset = get_preset("default")
    ds = FashionMNISTText(image_size=preset.image_size)  # the real data: 25 clear t-shirts of 6000
    try:
        ds.check()
    except Exception as e:  # the Debian package is not installed here
        pytest.skip(f"no fashion-mnist data: {e}")
    teacher, judge, _ = load_text_models(ds, store.recipe_preset(ds.name, preset), seed=0,
                                         device=torch.device("cpu"), amp=False)  # fmt: skip
    uce_cls = METHODS.get("text-uce")
    uce_ctx = _context(tmp_path / "uce", None, judge=judge, preset="default", image_size=16,
                       requires=uce_cls.requires)  # fmt: skip
    uce = uce_cls(resolve_config(uce_cls, "default", {})).unlearn(
        teacher, uce_ctx.run.forget_set, uce_ctx.run
    )
    prompts = FASHION_MNIST.prompts(0, "train") * 2
    images = uce.sample(prompts, list(range(len(prompts))), steps=preset.attack_sampler_steps,
                        guidance=preset.attack_guidance)  # fmt: skip
    erased = (judge_probs(judge, images).argmax(-1) == 0).float().mean().item()
    cls = ATTACKS.get(NAME)
    config = resolve_config(cls, "default", {"per_class": 40})
    found = {}
    for name, model in (("original", teacher), ("text-uce", uce)):
        ctx = _context(tmp_path / name, None, judge=judge, preset="default", image_size=16)
        (found[name],) = cls(config).run(model, ctx, Resume(ctx.run))
    print(
        f"t-shirt from its names after UCE: {erased:.2f}; recovered by textual inversion:",
        {k: f.value for k, f in found.items()},
    )
    assert erased < 0.3
    assert found["original"].value > 0.8 and found["text-uce"].value < 0.3
