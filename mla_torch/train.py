"""One optimisation step, and the optimiser state as numpy (for the shared checkpoint directory)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from convert.training import TrainConfig
from mnist_grid.tokens import PAD


def loss_fn(model, images, tokens, label_smoothing: float = 0.0):
    """Next-token cross-entropy, averaged over the non-pad targets."""
    logits = model(images, tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                           ignore_index=PAD, label_smoothing=label_smoothing)


class Trainer:
    """AdamW (bias-corrected, decoupled decay on every parameter), warm-up + cosine, global-norm clipping."""

    def __init__(self, model, tc: TrainConfig, device="cpu", bf16: bool = False):
        self.model, self.tc, self.device = model, tc, torch.device(device)
        self.bf16 = bf16 and self.device.type == "cuda"
        self.opt = torch.optim.AdamW(model.parameters(), lr=tc.lr_at(0), betas=tc.betas, eps=tc.eps,
                                     weight_decay=tc.weight_decay)
        self.step_count = 0

    def step(self, images, tokens):
        """Returns (loss, grad norm before clipping) as 0-d tensors (no host sync here)."""
        self.model.train()
        lr = self.tc.lr_at(self.step_count)
        for g in self.opt.param_groups:
            g["lr"] = lr
        images = torch.as_tensor(images).to(self.device, non_blocking=True)
        tokens = torch.as_tensor(tokens).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = loss_fn(self.model, images, tokens, self.tc.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip)
        self.opt.step()
        self.step_count += 1
        return loss.detach(), norm.detach()

    @torch.no_grad()
    def eval_loss(self, images, tokens) -> float:
        self.model.eval()
        images = torch.as_tensor(images).to(self.device)
        tokens = torch.as_tensor(tokens).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return float(loss_fn(self.model, images, tokens))

    # ---- state for --resume: Adam moments by parameter name, plus the dropout RNG -----------------
    def state(self) -> dict[str, np.ndarray]:
        out = {"step": np.array(self.step_count, dtype=np.int64)}
        for name, p in self.model.named_parameters():
            s = self.opt.state.get(p)
            if s:
                out[f"m.{name}"] = s["exp_avg"].float().cpu().numpy()
                out[f"v.{name}"] = s["exp_avg_sq"].float().cpu().numpy()
        out["rng.torch"] = torch.get_rng_state().numpy()
        if self.device.type == "cuda":
            out["rng.cuda"] = torch.cuda.get_rng_state(self.device).numpy()
        return out

    def load_state(self, state: dict[str, np.ndarray]):
        self.step_count = int(state["step"])
        for name, p in self.model.named_parameters():
            if f"m.{name}" in state:
                self.opt.state[p] = {
                    "step": torch.tensor(float(self.step_count)),
                    "exp_avg": torch.from_numpy(state[f"m.{name}"]).to(p.device, p.dtype),
                    "exp_avg_sq": torch.from_numpy(state[f"v.{name}"]).to(p.device, p.dtype),
                }
        if "rng.torch" in state:
            torch.set_rng_state(torch.from_numpy(state["rng.torch"].astype(np.uint8)))
        if "rng.cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.from_numpy(state["rng.cuda"].astype(np.uint8)), self.device)
