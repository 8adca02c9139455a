"""`text-finetune`: keep training the text teacher's UNet on the retained classes' images under their training
captions, the classic "FT" baseline (methods/finetune.py) on the text tier, with its config and budget (SalUn's
DDPM config). The text encoder stays frozen, as Stable Diffusion fine-tuning trains the UNet alone; the captions
drop to the null prompt at the teacher's rate, which keeps classifier-free guidance working.
"""

from __future__ import annotations

import copy

import torch

from bench.api import Method
from bench.registry import METHODS
from bench.text.captions import NULL_PROMPT
from bench.training import ddpm_loss
from methods.finetune import Finetune, FinetuneConfig


@METHODS.register("text-finetune")
class TextFinetune(Method):
    name = "text-finetune"
    version = "1"
    paper = Finetune.paper + "; on the text tier"
    Config = FinetuneConfig
    tier = "text"
    stable_diffusion = True  # on its VAE's latents (encode_images)
    requires = frozenset({"retain"})
    scaled = Finetune.scaled

    def unlearn(self, teacher, forget_set, ctx):
        cfg, dev = self.config, ctx.device
        encoder = copy.deepcopy(teacher.encoder).to(dev).eval().requires_grad_(False)
        unet = copy.deepcopy(teacher.unet).to(dev).train()
        opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
        g = ctx.generator("finetune")
        x, y = ctx.data("retain")
        x = teacher.encode_images(
            x, g
        )  # a Stable Diffusion teacher's latents; the images themselves otherwise
        abar = teacher.schedule.alphas_cumprod
        start = 0
        if (state := ctx.load_state()) is not None:
            unet.load_state_dict(state["unet"])
            opt.load_state_dict(state["opt"])
            start = state["step"]
        bar = ctx.progress(cfg.iterations, self.name, initial=start)
        for step in range(start, cfg.iterations):
            idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
            prompts = forget_set.captions.training_prompts(y[idx], g)
            drop = (torch.rand(len(prompts), generator=g) < cfg.label_dropout).tolist()
            with torch.no_grad():
                context = encoder([NULL_PROMPT if d else p for p, d in zip(prompts, drop, strict=True)])
            loss = ddpm_loss(unet, x[idx], None, g, device=dev, amp=ctx.amp, reduction=cfg.loss,
                             antithetic=cfg.antithetic, context=context, abar=abar)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            opt.step()
            bar.update()
            ctx.log(step + 1, loss=loss.item())
            ctx.probe(step + 1, lambda: teacher.replaced(unet=unet))
            if ctx.should_save(step + 1):
                ctx.save_state({"unet": unet.state_dict(), "opt": opt.state_dict(), "step": step + 1})
        bar.close()
        return teacher.with_unet(unet.eval())
