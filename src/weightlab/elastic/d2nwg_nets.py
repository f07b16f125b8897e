"""D2NWG's networks and diffusion maths: the weight VAE, the dataset encoder, the denoiser, DDPM/DDIM.

- Weight VAE (paper: Linear -> LDM conv encoder on a 64x64 image -> 4x16x16 latent; here, at CPU scale, an MLP
  P -> hidden -> (mu, log var) of size ``latent``). Loss as the reference's ``Myloss``: L1 reconstruction as
  a Laplace-style NLL with one learned log-scale s, |v - v_hat| e^-s + s per entry, plus beta KL (1e-6), plus
  1000 MSE; sums are per sample, averaged over the batch.
- Dataset encoder: K samples per class -> DeepSets per class (phi, mean over the K samples, rho): invariant
  to the samples' order, as the paper's intra-class set transformer. Across classes the class embeddings are
  concatenated in label order and projected: the output layer's row j must know which class is label j, so
  the encoder is indexed by label like the reference's default MLP encoder (``MyMLPEncoder``), not invariant
  to a relabelling like the paper's inter-class set transformer.
- Denoiser: eps_theta([z_t ; c], t): the condition joins the latent as input (the reference concatenates it as
  a second UNet channel), time by a sinusoidal embedding; residual MLP blocks.
- Schedule: the LDM "linear" one, beta_t = linspace(sqrt(1.5e-3), sqrt(1.55e-2), T)^2, computed in float64.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class WeightVAE(nn.Module):
    def __init__(self, numel: int, hidden: int = 256, latent: int = 32):
        super().__init__()
        self.numel, self.latent = numel, latent
        self.enc = nn.Sequential(nn.Linear(numel, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, numel))
        self.logvar = nn.Parameter(torch.zeros(()))  # the NLL's learned log-scale s (reference: logvar init 0)

    def encode(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.enc(v).chunk(2, dim=-1)
        return mu, logvar.clamp(-30.0, 20.0)  # the LDM posterior's clamp

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)

    def loss(self, v: torch.Tensor, gen: torch.Generator | None = None, kl_weight: float = 1e-6,
             mse_weight: float = 1000.0) -> tuple[torch.Tensor, dict]:
        mu, logvar = self.encode(v)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
        rec = self.decode(z)
        b = v.shape[0]
        nll = ((v - rec).abs() / torch.exp(self.logvar) + self.logvar).sum() / b
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum() / b
        mse = F.mse_loss(rec, v)
        return nll + kl_weight * kl + mse_weight * mse, {"nll": nll.item(), "kl": kl.item(), "mse": mse.item()}


class SetEncoder(nn.Module):
    """(B, C, K, F) samples -> (B, out): DeepSets per class, then the label-ordered class embeddings projected."""

    def __init__(self, features: int, num_classes: int, hidden: int = 64, out: int = 32):
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.phi = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.rho = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(num_classes * hidden, out))

    def classes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, K, F) -> (B, C, hidden): one embedding per class, invariant to the order of its K samples."""
        return self.rho(self.phi(x).mean(dim=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.classes(x).flatten(1))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The DDPM/LDM sinusoidal embedding: [cos(t f_i), sin(t f_i)], f_i = 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Denoiser(nn.Module):
    def __init__(self, latent: int, cond: int, hidden: int = 256, blocks: int = 3, temb: int = 64):
        super().__init__()
        self.temb_dim = temb
        self.temb = nn.Sequential(nn.Linear(temb, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(latent + cond, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                                  nn.Linear(hidden, hidden)) for _ in range(blocks))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, latent))

    def forward(self, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        e = self.temb(timestep_embedding(t, self.temb_dim))
        h = self.inp(torch.cat([z, c], dim=1))
        for blk in self.blocks:
            h = h + blk(h + e)
        return self.out(h)


class Schedule:
    """DDPM quantities of the LDM linear schedule (float64 products, float32 results)."""

    def __init__(self, timesteps: int = 1024, linear_start: float = 1.5e-3, linear_end: float = 1.55e-2):
        b = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        a = torch.cumprod(1.0 - b, 0)
        a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
        self.T = timesteps
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = b, a, a_prev
        self.post_var = b * (1.0 - a_prev) / (1.0 - a)  # beta~_t, the DDPM posterior variance
        self.post_c0 = b * a_prev.sqrt() / (1.0 - a)  # posterior mean = c0 * z0 + ct * z_t
        self.post_ct = (1.0 - a_prev) * (1.0 - b).sqrt() / (1.0 - a)
        # log of the clipped variance (LDM: its first entry replaced by the second, t=0 has none)
        self.post_logvar = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))

    def _at(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v[t].float().unsqueeze(1)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps (t indexes 0..T-1, t=0 is the first noising step)."""
        return self._at(self.alphas_cumprod.sqrt(), t) * z0 + self._at((1 - self.alphas_cumprod).sqrt(), t) * noise

    def predict_z0(self, zt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._at((1 / self.alphas_cumprod).sqrt(), t) * zt - self._at((1 / self.alphas_cumprod - 1).sqrt(), t) * eps


@torch.no_grad()
def sample_ddpm(eps_fn, sched: Schedule, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Ancestral sampling over all T steps (LDM p_sample: posterior of the predicted z0, no noise at t=0)."""
    z = torch.randn(shape, generator=gen)
    for i in reversed(range(sched.T)):
        t = torch.full((shape[0],), i, dtype=torch.long)
        z0 = sched.predict_z0(z, t, eps_fn(z, t))
        mean = sched._at(sched.post_c0, t) * z0 + sched._at(sched.post_ct, t) * z
        noise = torch.randn(shape, generator=gen) if i > 0 else torch.zeros(shape)
        z = mean + torch.exp(0.5 * sched._at(sched.post_logvar, t)) * noise
    return z


@torch.no_grad()
def sample_ddim(eps_fn, sched: Schedule, shape: tuple[int, int], gen: torch.Generator, steps: int = 50,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM over ``steps`` evenly spaced timesteps (eta = 0: deterministic given z_T)."""
    ts = torch.linspace(0, sched.T - 1, steps).round().long().unique().tolist()
    z = torch.randn(shape, generator=gen)
    a = sched.alphas_cumprod
    for k in reversed(range(len(ts))):
        i = ts[k]
        t = torch.full((shape[0],), i, dtype=torch.long)
        eps = eps_fn(z, t)
        a_t = float(a[i])
        a_p = float(a[ts[k - 1]]) if k > 0 else 1.0
        z0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        noise = torch.randn(shape, generator=gen) if sigma > 0 else 0.0
        z = math.sqrt(a_p) * z0 + math.sqrt(max(1 - a_p - sigma ** 2, 0.0)) * eps + sigma * noise
    return z


class EMA:
    """LitEma's rule: decay_n = min(decay, (1 + n) / (10 + n)), shadow -= (1 - decay_n) (shadow - param)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay, self.n = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for k, v in model.state_dict().items():
            self.shadow[k].sub_((1.0 - d) * (self.shadow[k] - v))
