"""ESD on the text-to-image teacher (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023, arXiv
2303.07345): `text-esd-u` and `text-esd-x`, the official Stable Diffusion script `train-scripts/train-esd.py`
(rohitgandikota/erasing@a2189e9) on the tier's UNet2DConditionModel.

Per iteration (train-esd.py:190-240): a word of the concept (`words`, drawn uniformly), k ~ U{0..S-1}, x_t made by
the model being trained from noise with the word's prompt at `start_guidance` down to DDIM step k
(`quick_sample_till_t`), t_ddpm ~ U[round(k/S 1000), round((k+1)/S 1000)), and

  eps_theta(x_t, p, t)  ->  eps*(x_t, "", t) - eta [eps*(x_t, p, t) - eps*(x_t, "", t)],   MSE loss,

with eps* the frozen original and the text encoder frozen (only `model.diffusion_model` parameters train). The
x_t generation and timing are the class-conditional `esd`'s (methods/esd.py: old_esd_xt, old_esd_time), which
follow the same script; here the prompt's hidden states replace the class label and the empty prompt the null
class.

The words are the forgotten concept's training names ("t-shirt", "tee", "top": the script's `--prompt` split by
its `--seperator`); the teacher knows each alone, as "{}" is one of its training templates. Which parameters
train (train-esd.py:165-185): `noxattn` (ESD-u, the paper's choice for objects) every UNet parameter but the
cross-attention `attn2`, the time embedding and the output layers (ldm's `time_embed` and `out.`, diffusers'
`time_embedding`, `conv_norm_out`, `conv_out`); `xattn` (ESD-x, the paper's for styles) the `attn2` ones only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bench.api import NON_NEGATIVE, POSITIVE, Method, Range, Scaled, param
from bench.errors import BenchError
from bench.registry import METHODS
from bench.sampling import autocast
from bench.text.captions import NULL_PROMPT
from bench.text.model import TextDiffusionModel
from methods.esd import NOT_IN_ESD_U, esd_target, old_esd_time, old_esd_xt

SCRIPT = "ESD train-scripts/train-esd.py"
TEXT_TRAIN_METHODS = ("esd-u", "esd-x", "full")


def text_trainable(name: str, method: str) -> bool:
    """Whether UNet2DConditionModel parameter `name` trains under train-esd.py's noxattn (esd-u), xattn (esd-x) or
    full."""
    parts = name.split(".")
    if method == "full":
        return True
    if method == "esd-x":
        return "attn2" in parts
    if method == "esd-u":
        return "attn2" not in parts and parts[0] not in NOT_IN_ESD_U
    raise BenchError(f"train_method={method!r}: expected one of {', '.join(TEXT_TRAIN_METHODS)}")


class Prompted:
    """A text model seen through the class-conditional `eps(x, t, condition, guidance)` that methods/esd.py's x_t
    generation calls: the condition is prompt hidden states, guidance is over the null prompt's."""

    def __init__(self, model: TextDiffusionModel, null: torch.Tensor):
        self.model, self.null = model, null

    def eps(self, x, t, context, guidance: float = 1.0):
        return self.model.eps(x, t, context, self.null, guidance)


@dataclass(frozen=True)
class TextESDConfig:
    iterations: int = param(1000, f"{SCRIPT} --iterations", valid=POSITIVE)
    lr: float = param(1e-5, f"{SCRIPT} --lr (Adam)", valid=POSITIVE)
    eta: float = param(1.0, f"{SCRIPT} --negative_guidance", valid=NON_NEGATIVE)
    start_guidance: float = param(3.0, f"{SCRIPT} --start_guidance", valid=NON_NEGATIVE)
    ddim_steps: int = param(50, f"{SCRIPT} --ddim_steps", valid=Range(2, 1000))
    train_method: str = param("esd-u", f"{SCRIPT} --train_method noxattn (ESD-u, the paper's for objects)",
                              valid=TEXT_TRAIN_METHODS)  # fmt: skip


@dataclass(frozen=True)
class TextESDXConfig(TextESDConfig):
    train_method: str = param("esd-x", f"{SCRIPT} --train_method xattn (ESD-x, the paper's for styles)",
                              valid=TEXT_TRAIN_METHODS)  # fmt: skip


@METHODS.register("text-esd-u")
class TextESD(Method):
    name = "text-esd-u"
    version = "1"
    paper = "Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023; ESD-u, official SD script"
    Config = TextESDConfig
    tier = "text"
    stable_diffusion = True  # data-free: it runs on a Stable Diffusion teacher too
    scaled = {
        "smoke": Scaled({"iterations": 3, "ddim_steps": 4}, "seconds-long test runs"),
        "default": Scaled({"iterations": 500, "ddim_steps": 10},
                          "CPU budget, as the class-conditional esd's default: 500 iterations instead of 1000 and "
                          "x_t on the evaluation sampler's 10-step DDIM grid instead of 50; learning rate, eta "
                          "and start guidance as the script's. Measured (README): the t-shirt at 52% under ESD-u, 100% under ESD-x"),
    }  # fmt: skip

    def validate(self, forget_set):
        text_trainable("x", self.config.train_method)

    def unlearn(self, teacher, forget_set, ctx):
        cfg, dev = self.config, ctx.device
        encoder = copy.deepcopy(teacher.encoder).to(dev).eval().requires_grad_(False)
        frozen = copy.deepcopy(teacher.unet).to(dev).eval().requires_grad_(False)
        unet = copy.deepcopy(teacher.unet).to(dev).train()
        for name, p in unet.named_parameters():
            p.requires_grad_(text_trainable(name, cfg.train_method))
        opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=cfg.lr)
        g = ctx.generator("esd")
        start = 0
        if (state := ctx.load_state()) is not None:
            unet.load_state_dict(state["unet"])
            opt.load_state_dict(state["opt"])
            start = state["step"]
        words = forget_set.names()
        with torch.no_grad():
            null = encoder([NULL_PROMPT])
            contexts = encoder(list(words))
        trained = Prompted(TextDiffusionModel(unet, encoder), null)
        abar = teacher.schedule.alphas_cumprod  # a Stable Diffusion teacher's own
        bar = ctx.progress(cfg.iterations, self.name, initial=start)
        for step in range(start, cfg.iterations):
            c = contexts[int(torch.randint(len(words), (1,), generator=g))][None]
            stop = int(torch.randint(cfg.ddim_steps, (1,), generator=g))
            t = old_esd_time(stop, cfg.ddim_steps, g)
            z = torch.randn((1, *teacher.image_shape), generator=g).to(dev)
            with torch.no_grad(), autocast(dev, ctx.amp):
                x_t = old_esd_xt(
                    trained, z, c, ddim_steps=cfg.ddim_steps, k=stop, guidance=cfg.start_guidance, abar=abar
                )
                tt = torch.full((2,), t, device=dev)
                eps_c, eps_0 = frozen(torch.cat([x_t, x_t]), tt,
                                      encoder_hidden_states=torch.cat([c, null])).sample.float().chunk(2)  # fmt: skip
                target = esd_target(eps_c, eps_0, cfg.eta)
            with autocast(dev, ctx.amp):
                pred = unet(x_t, tt[:1], encoder_hidden_states=c).sample
            loss = nn.functional.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
            ctx.log(step + 1, loss=loss.item(), t=t)
            ctx.probe(step + 1, lambda: teacher.replaced(unet=unet))
            if ctx.should_save(step + 1):
                ctx.save_state({"unet": unet.state_dict(), "opt": opt.state_dict(), "step": step + 1})
        bar.close()
        return teacher.with_unet(unet.requires_grad_(True).eval())


@METHODS.register("text-esd-x")
class TextESDX(TextESD):
    name = "text-esd-x"
    paper = "Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023; ESD-x, official SD script"
    Config = TextESDXConfig
    # The paper's choice for styles; the default sweep erases objects (ESD-u's) within its 15-minute budget.
    default_sweep = False
