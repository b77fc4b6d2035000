"""Optimizers and weight averaging for the training loop, all updated on the device (no host sync).

`build_optimizer` returns, for --optimizer adamw, the fused AdamW the trainer always used; for
--optimizer muon, `MuonAdamW`: `Muon` (torch.optim.Muon's update, Newton-Schulz in fp32 off CUDA) for the 2-D
matrices inside the blocks
(attention wq/wk/wv/wo, MLP w1/w2/w3) and fused AdamW for the rest (token embedding / tied LM head,
an untied head, the RMSNorm gains).

`MuonAdamW.step(ok)` updates only when the device boolean `ok` is true, without reading it: AdamW
through `found_inf` (as GradScaler does), Muon (which has no such input) by snapshotting its weights
and momentum buffers before the step and writing the snapshot back with `torch.where(ok, new, old)`
after it. `where` selects, so a NaN update is discarded bit for bit; the cost is two copies and two
selects of the Muon parameters per step.

`Ema`: an `torch.optim.swa_utils.AveragedModel` holding the averaged copy, updated by one `_foreach_lerp_`
whose weight is a host float from the step count (a running mean first, then the EMA). Its
`update_parameters` is not called: it reads its `n_averaged` counter on the host twice per call
(`bool(n_averaged == 0)`, `n_averaged > 0`), a device sync on every step on a GPU.
"""

from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel

from storyllama.config import TrainConfig

# Newton-Schulz quintic coefficients and step count: torch.optim.Muon's (Keller Jordan's).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


class Muon(torch.optim.Optimizer):
    """Muon with torch.optim.Muon's update, the Newton-Schulz precision chosen by the caller, and the
    matrices of one shape orthogonalised together in one batched matmul chain.

    Per matrix W (rows x cols) with gradient G, as torch.optim.Muon computes it (tests/test_recipe.py checks
    the two agree, and both against a float64 reference):
        buf <- lerp(buf, G, 1 - mu)                 momentum, kept as a lerp like torch's
        U   <- lerp(G, buf, mu) (Nesterov) or buf
        O   <- NS5(U): U / ||U||_F, then 5 x  X <- a X + (b A + c A A) X,  A = X X^T  (on the wide orientation)
        W   <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) O     (torch's "original" lr adjustment)
    Why not torch.optim.Muon itself: it runs Newton-Schulz in bfloat16 (right on GPUs), and a CPU without
    bf16 matrix units multiplies bf16 about 26x slower than fp32 (tiny preset: a 1.7 s Muon step against 5 ms
    for AdamW), which makes it useless for CPU training. Here `ns_dtype` is bfloat16 on CUDA and float32
    elsewhere; stacking same-shape matrices (12 of the `small` preset's 28 are 256 x 768 once oriented) turns
    28 small matmul chains into a few batched ones.
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0, nesterov: bool = True,
                 ns_dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      eps=eps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon updates 2-D matrices only; got a parameter of shape {tuple(p.shape)}")
                # made now, not lazily: a skipped first step then leaves the state exactly as it was
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            mu = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault((min(p.shape), max(p.shape)), []).append(i)
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)  # decoupled decay with the unadjusted lr, as torch's
            for idx in by_shape.values():
                wide = [updates[i].T if params[i].shape[0] > params[i].shape[1] else updates[i] for i in idx]
                ortho = newton_schulz(torch.stack(wide), self.ns_dtype, group["eps"])  # (N, m, n), m <= n
                for j, i in enumerate(idx):
                    p = params[i]
                    o = ortho[j].T if p.shape[0] > p.shape[1] else ortho[j]
                    p.add_(o.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))


def newton_schulz(u: torch.Tensor, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of each wide matrix of u (N, m, n), m <= n, in `dtype`:
    singular values are pushed into roughly [0.7, 1.2] (not exactly 1: the coefficients favour speed)."""
    a, b, c = NS_COEFFICIENTS
    x = u.to(dtype)
    x = x / torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(NS_STEPS):
        gram = x @ x.mT  # (N, m, m)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def hidden_matrices(model: torch.nn.Module) -> list[str]:
    """Names of the parameters Muon updates: the 2-D weights inside the transformer blocks."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and n.startswith("layers.")]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    # Fused AdamW (CPU and CUDA) skips a step on the device when `found_inf` is set: no host sync.
    fused = device.type in ("cuda", "cpu")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=fused)
    return MuonAdamW(model, cfg, fused, ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


class MuonAdamW:
    """Muon for the blocks' matrices, AdamW for everything else, behind one optimizer's interface (step,
    zero_grad, param_groups, state_dict / load_state_dict). Every param group's lr is set by the trainer from
    one schedule: lr_at(step) * group["lr_scale"], the scale being muon_lr / max_lr for the Muon group."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, fused: bool,
                 ns_dtype: torch.dtype = torch.float32):
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
        self.muon = Muon(self.muon_params, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                         momentum=cfg.muon_momentum, nesterov=True, ns_dtype=ns_dtype)
        self.muon.param_groups[0]["lr_scale"] = self._muon_hparams["lr_scale"]
        self.fused = fused
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
    """An average of the model's weights after every optimizer step: the mean of all of them until the run has
    taken 1 / (1 - decay) steps, the exponential average (ema = decay * ema + (1 - decay) * weights) from then
    on. So a short run's average is of its trained weights, not mostly the initial ones (after 12 steps at
    0.99 those would still weigh 89%); from step 1 / (1 - decay) on it is the plain EMA. The step is the run's
    (restored on resume), so a resumed run averages exactly as an uninterrupted one."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.avg = AveragedModel(model)  # the copy; updated below, not through update_parameters (module docstring)
        self.avg.requires_grad_(False)
        self.decay = decay
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = (
            [p.detach() for p in self.avg.module.parameters()], [p.detach() for p in model.parameters()])

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (a plain Llama: what is evaluated, saved as model_ema.safetensors and sampled)."""
        return self.avg.module

    def weight(self, step: int) -> float:
        """The share of the weights after optimizer step `step` (1, 2, ...) in the average."""
        return max(1.0 - self.decay, 1.0 / step)

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(*self._pairs, self.weight(step))  # one fused pass; a host float, no device read
