"""Optimizers and weight averaging for the training loop, all updated on the device (no host sync).

`build_optimizer` returns, for --optimizer adamw, the fused AdamW the trainer always used; for
--optimizer muon, `MuonAdamW`: PyTorch's `torch.optim.Muon` for the 2-D matrices inside the blocks
(attention wq/wk/wv/wo, MLP w1/w2/w3) and fused AdamW for the rest (token embedding / tied LM head,
an untied head, the RMSNorm gains).

`MuonAdamW.step(ok)` updates only when the device boolean `ok` is true, without reading it: AdamW
through `found_inf` (as GradScaler does), Muon (which has no such input) by snapshotting its weights
and momentum buffers before the step and writing the snapshot back with `torch.where(ok, new, old)`
after it. `where` selects, so a NaN update is discarded bit for bit; the cost is two copies and two
selects of the Muon parameters per step.

`Ema`: an `torch.optim.swa_utils.AveragedModel` holding the averaged copy, updated with the library's
`get_ema_multi_avg_fn` (one `_foreach_lerp_`). `AveragedModel.update_parameters` itself is not
called: it reads its `n_averaged` counter on the host twice per call (`bool(n_averaged == 0)`,
`n_averaged > 0`), a device sync on every step on a GPU.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from storyllama.config import TrainConfig

# torch.optim.Muon's adjust_lr_fn: "original" (Keller Jordan's) scales the lr by sqrt(max(1, rows / cols)), so an
# orthogonalised update (singular values ~1) moves each matrix by about --muon_lr in spectral norm; Muon lrs in
# the 0.02 range are for this one. "match_rms_adamw" (Moonshot's) scales by 0.2 * sqrt(max(rows, cols)) so
# that AdamW's lr and weight decay carry over (it would be used with --muon_lr near --max_lr).
MUON_ADJUST_LR = "original"


def hidden_matrices(model: torch.nn.Module) -> list[str]:
    """Names of the parameters Muon updates: the 2-D weights inside the transformer blocks."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and n.startswith("layers.")]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    # Fused AdamW (CPU and CUDA) skips a step on the device when `found_inf` is set: no host sync.
    fused = device.type in ("cuda", "cpu")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=fused)
    return MuonAdamW(model, cfg, fused)


class MuonAdamW:
    """Muon for the blocks' matrices, AdamW for everything else, behind one optimizer's interface (step,
    zero_grad, param_groups, state_dict / load_state_dict). Every param group's lr is set by the trainer from
    one schedule: lr_at(step) * group["lr_scale"], the scale being muon_lr / max_lr for the Muon group."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, fused: bool):
        muon_names = set(hidden_matrices(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.muon_params = [p for n, p in named if n in muon_names]
        matrices = [p for n, p in named if n not in muon_names and p.ndim >= 2]  # embedding, untied head
        gains = [p for n, p in named if n not in muon_names and p.ndim < 2]  # RMSNorm weights
        self.adamw = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                                        {"params": gains, "weight_decay": 0.0}], lr=cfg.max_lr,
                                       betas=(cfg.beta1, cfg.beta2), fused=fused)
        self._muon_hparams = {"lr_scale": cfg.muon_lr / cfg.max_lr, "momentum": cfg.muon_momentum,
                              "weight_decay": cfg.muon_weight_decay}
        self.muon = torch.optim.Muon(self.muon_params, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                                     momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn=MUON_ADJUST_LR)
        self.muon.param_groups[0]["lr_scale"] = self._muon_hparams["lr_scale"]
        self.fused = fused
        # The momentum buffers exist from the start (torch makes them at the first step), so that a skipped first
        # step leaves the state exactly as it was, and the snapshot below has a fixed set of tensors.
        for p in self.muon_params:
            self.muon.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._snapshot = [torch.empty_like(p) for p in self.muon_params for _ in range(2)]

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def defaults(self) -> dict:
        return self.adamw.defaults

    def _muon_tensors(self) -> list[torch.Tensor]:
        # looked up every step: load_state_dict replaces the state's tensors
        return [t for p in self.muon_params for t in (p, self.muon.state[p]["momentum_buffer"])]

    @torch.no_grad()
    def step(self, ok: torch.Tensor) -> None:
        """One update of both optimizers when the device boolean `ok` is true; nothing changes otherwise."""
        if not self.fused:  # devices without fused AdamW: the host decides
            if bool(ok):
                self.adamw.step()
                self.muon.step()
            return
        self.adamw.found_inf = (~ok).float()
        self.adamw.step()
        live = self._muon_tensors()
        torch._foreach_copy_(self._snapshot, live)
        self.muon.step()  # no host sync inside: float lr, Newton-Schulz on the device
        for t, old in zip(live, self._snapshot):
            torch.where(ok, t, old, out=t)  # selects: a NaN update is dropped exactly

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"adamw", "muon"}:
            raise KeyError(f"not a Muon + AdamW optimizer state (keys {sorted(state)[:4]}): was the checkpoint "
                           "trained with --optimizer adamw?")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
        # the run's settings, not the saved group's: a resumed run that changes --muon_lr (or momentum, decay)
        # means it; and torch.optim.Muon's own group keys stay as the constructor made them
        self.muon.param_groups[0].update(self._muon_hparams)


class Ema:
    """An exponential moving average of the model's weights: ema = decay * ema + (1 - decay) * weights after
    every optimizer step, starting from the weights the run starts with (or the checkpoint's average)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.avg.requires_grad_(False)
        self.decay = decay
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = (
            [p.detach() for p in self.avg.module.parameters()], [p.detach() for p in model.parameters()])

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (a plain Llama: what is evaluated, saved as model_ema.safetensors and sampled)."""
        return self.avg.module

    @torch.no_grad()
    def update(self) -> None:
        self.avg.multi_avg_fn(*self._pairs, self.avg.n_averaged)
        self.avg.n_averaged += 1  # on the device, never read by the loop
