"""`rl` (random label): SalUn without its saliency mask, i.e. the "RL" baseline SalUn builds on (Fan et al., ICLR 2024;
official OPTML-Group/Unlearn-Saliency `DDPM/runners/diffusion.py::saliency_unlearn` l.557-572 with `--method rl
--alpha 1e-3` and no `--mask_path`):

  L = MSE( eps_theta(x_t, c_f), stop-grad eps_theta(x_t, c') ) + alpha l(x_r, c_r),   alpha = 1e-3

the loop of `ga` (methods/ga.py) with this forget term, and methods/salun.py's relabel loss and targets (c' = the next
retained class, (c_f + 1) mod K in the official code; `rl.relabel=random` for a random retained class).
Unlike methods/salun.py, which drops labels only in the retained term (the paper's equation), the forget term's two
forward passes each drop labels with p 0.1 here, as the official code's do (`rl.forget_label_dropout=0` gives
salun.py's choice, so that `salun` is exactly `rl` plus the mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.api import DECAY, FRACTION, NON_NEGATIVE, POSITIVE, Range, Scaled, param
from bench.models.unet import num_classes_of
from bench.registry import METHODS
from bench.sampling import autocast
from methods.ga import DROPOUT, RUNNER, SRC, GradientAscent, ddpm_error
from methods.sa import drop_labels
from methods.salun import RELABELS, effective_alpha, relabel_loss, relabel_targets


def relabel_predictions(unet, x_t, t, labels, targets, dropout: float, g: torch.Generator, amp: bool = False):
    """eps_theta(x_t, c_f) with gradient and eps_theta(x_t, c') without, each pass dropping labels with p `dropout`."""
    null, dev = num_classes_of(unet), x_t.device
    c_f, c_new = drop_labels(labels, dropout, null, g), drop_labels(targets, dropout, null, g)
    with autocast(dev, amp):
        eps_forget = unet(x_t, t, class_labels=c_f.to(dev)).sample
        with torch.no_grad():
            eps_new = unet(x_t, t, class_labels=c_new.to(dev)).sample
    return eps_forget, eps_new


def rl_objective(eps_forget, eps_new, pred_r, noise_r, alpha: float) -> torch.Tensor:
    """SalUn `--method rl`: MSE(eps(c_f), stop-grad eps(c')) + alpha l(retain)."""
    return relabel_loss(eps_forget, eps_new) + alpha * ddpm_error(pred_r, noise_r).mean()


@dataclass(frozen=True)
class RLConfig:
    iterations: int = param(1000, f"{SRC} training.n_iters", valid=POSITIVE)
    batch_size: int = param(
        128, f"{SRC} training.batch_size (forget and retained batches each)", valid=POSITIVE
    )
    lr: float = param(1e-4, f"{SRC} optim.lr (Adam, no weight decay)", valid=POSITIVE)
    adam_beta1: float = param(0.9, f"{SRC} optim.beta1", valid=DECAY)
    adam_eps: float = param(1e-8, f"{SRC} optim.eps", valid=POSITIVE)
    grad_clip: float = param(1.0, f"{SRC} optim.grad_clip (norm; {RUNNER}:582-587)", valid=POSITIVE)
    alpha: float = param(
        1e-3, "SalUn DDPM/README.md --alpha 1e-3 --method rl (maintainers, issue #19)", valid=NON_NEGATIVE
    )
    alpha_pixels: int = param(
        3 * 32 * 32,
        "as salun.alpha_pixels: alpha is rescaled by alpha_pixels / (C*H*W), since the relabel term is "
        "a per-element mean and the retained term a per-pixel sum (0: alpha as given)",
        valid=Range(0),
    )
    relabel: str = param(
        "next", f"{RUNNER}:564-568 pseudo_c = (label_to_forget + 1) % 10; or 'random'", valid=RELABELS
    )
    label_dropout: float = param(0.1, f"{DROPOUT}, retained term", valid=FRACTION)
    forget_label_dropout: float = param(
        0.1, f"{DROPOUT}, both forget passes ({RUNNER}:561, 569)", valid=FRACTION
    )


@METHODS.register("rl")
class RandomLabel(GradientAscent):
    name = "rl"
    version = "1"
    paper = "RL as in SalUn's DDPM code (Fan et al., ICLR 2024): relabel to c' = next retained class, no mask"
    Config = RLConfig
    requires = frozenset({"forget", "retain"})
    scaled = {
        "smoke": Scaled({"iterations": 3, "batch_size": 4}, "seconds-long test runs"),
        "default": Scaled(
            {"iterations": 15},
            "CPU budget: 15 of 1000 iterations (27 s on this project's slower Zen 3 machine). Measured with alpha "
            "rescaled as salun's (x12 at 1x16x16): forget accuracy 0.51, retained 0.85, fd_judge 1.0 (teacher "
            "0.85 / 0.86 / 0.37): at this budget it does not halve the class. With alpha unscaled (alpha_pixels=0) "
            "the same 15 iterations erased it (0.00, 75% to the relabel target) but kept only 0.65 of the retained "
            "classes, and longer runs only cost them more (probe grid: 0.51 at 30, 0.53 at 60).",
        ),
    }  # fmt: skip

    def anchors(self, forget_set):  # where the relabel term sends the forgotten classes, as salun
        from methods.salun import SalUn

        return SalUn.anchors(self, forget_set)

    def validate(self, forget_set):
        relabel_targets(self.config.relabel, torch.tensor(forget_set.forget), forget_set, torch.Generator())

    def forget_objective(self, unet, x_t, t, labels, noise, pred_r, noise_r, forget_set, g, amp):
        cfg = self.config
        targets = relabel_targets(cfg.relabel, labels, forget_set, g)
        eps_forget, eps_new = relabel_predictions(
            unet, x_t, t, labels, targets, cfg.forget_label_dropout, g, amp
        )
        alpha = effective_alpha(cfg, tuple(x_t.shape[1:]))
        return rl_objective(eps_forget, eps_new, pred_r, noise_r, alpha), relabel_loss(eps_forget, eps_new)
