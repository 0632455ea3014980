"""
ELF: Embedded Language Flows, in one file.

A continuous flow-matching language model: tokens become embeddings, a transformer learns to turn
Gaussian noise into embeddings (t = 0 is noise, t = 1 is data), and at t = 1 the *same* network,
switched to "decode" mode by its mode tokens, turns the embeddings into tokens. Section numbers
(§) refer to ELF.md, the project's precise description of the paper (arXiv 2605.10938).

Read top to bottom: config -> embedding -> network -> training objective -> sampler math -> optimizer.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class ELFConfig:
    # sizes (§3)
    vocab_size: int = 50304       # GPT-2's 50257 tokens padded to a multiple of 64 for fast matmuls
    block_size: int = 1024        # text positions per sequence
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768             # hidden width of the transformer
    embed_dim: int = 512          # d: width of the token embeddings the flow lives in
    bottleneck_dim: int = 128     # input bottleneck; 128 was best in the paper
    n_mode_tokens: int = 4        # in-context control tokens, prepended without rotary positions
    n_time_tokens: int = 4
    n_scale_tokens: int = 4
    dropout: float = 0.0
    # embedding (§2)
    embedding: str = "gaussian"   # 'gaussian' (frozen N(0,1) table) or 'learned' (trainable, normalised)
    embedding_seed: int = 0       # the Gaussian table is regenerated from this seed, never stored
    latent_std: float = 1.0       # embeddings are divided by this scalar
    # flow and objective (§1, §4)
    prediction: str = "x"         # 'x' (x-prediction, the paper's) or 'v' (velocity prediction, ablation)
    noise_scale: float = 2.0      # sigma: z_t = t x + (1 - t) sigma eps
    t_eps: float = 0.05           # velocity denominator floor: v = (x - z) / max(1 - t, t_eps)
    t_mean: float = -1.5          # training times t = sigmoid(N(t_mean, t_std))
    t_std: float = 0.8
    decoder_prob: float = 0.2     # fraction of examples trained in decode mode
    decoder_noise_scale: float = 5.0   # s_dec of the decode-step corruption
    decoder_lambda_mean: float = 0.8   # per-token clean fraction lambda = sigmoid(N(mean, std))
    decoder_lambda_std: float = 0.8
    self_cond_prob: float = 0.5   # 0 turns self-conditioning off
    guidance: bool = True         # training-time self-conditioning guidance (§4); False is the ablation
    guidance_min: float = 0.5     # w range; (w + 1) is log-uniform on [1 + min, 1 + max]
    guidance_max: float = 5.0
    # conditions (§6): per example none, a clean prefix (prompting) or clean spans (infilling)
    cond_prefix_prob: float = 0.0  # the paper's unconditional model has neither
    cond_span_prob: float = 0.0
    cond_drop_prob: float = 0.1   # classifier-free guidance: conditions dropped (zeroed) this often

EOT, N_VOCAB = 50256, 50257  # GPT-2 BPE's end-of-text token and vocabulary size (vocab_size pads it)

# Named sizes (§3). 'elf-cpu' is this project's own: small enough to train on a laptop CPU in minutes.
# Its embeddings have d = 64 instead of 512; how well a noisy embedding identifies its token grows with
# d * SNR, so both noise scales shrink by sqrt(64/512) to keep the paper's signal-to-noise per token.
MODEL_SIZES = {
    "elf-b": dict(n_layer=12, n_embd=768, n_head=12),
    "elf-m": dict(n_layer=24, n_embd=1056, n_head=16),
    "elf-l": dict(n_layer=32, n_embd=1280, n_head=16),
    "elf-cpu": dict(n_layer=3, n_embd=192, n_head=3, embed_dim=64, bottleneck_dim=64, block_size=64,
                    noise_scale=0.7, decoder_noise_scale=1.8),
}

# ----------------------------------------------------------------------------------------------
# Embedding (§2): the "encoder" that turns tokens into the continuous x the flow works on.

class TokenEmbedding(nn.Module):
    """Token ids -> embeddings x of shape (B, L, embed_dim)."""

    def __init__(self, cfg):
        super().__init__()
        self.kind, self.latent_std = cfg.embedding, cfg.latent_std
        if cfg.embedding == "gaussian":
            # Frozen N(0, 1) table, regenerated from the seed: a buffer that is not saved (persistent=False).
            g = torch.Generator().manual_seed(cfg.embedding_seed)
            table = torch.randn(cfg.vocab_size, cfg.embed_dim, generator=g)
            self.register_buffer("table", table, persistent=False)
        elif cfg.embedding == "learned":
            self.table = nn.Parameter(torch.randn(cfg.vocab_size, cfg.embed_dim))
        else:
            raise ValueError(f"unknown embedding {cfg.embedding!r}: use 'gaussian' or 'learned'")

    def forward(self, tokens):
        x = self.table[tokens]
        if self.kind == "learned":
            # Unit-RMS rows: the loss could otherwise shrink all embeddings to zero (collapse).
            x = F.normalize(x, dim=-1) * math.sqrt(x.size(-1))
        return x / self.latent_std

# ----------------------------------------------------------------------------------------------
# The network (§3): one transformer for both denoising and decoding.

def sinusoidal(values, dim=256, max_period=10000.0):
    """Sinusoidal features of scalars (B,) -> (B, dim); values are scaled by 1000 to spread t in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    angles = 1000.0 * values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

def rope_tables(n_prefix, n_text, head_dim, base=10000.0, device=None):
    """cos/sin for rotary positions; the prefix tokens get the identity (no position), text gets 0..L-1."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(n_text, device=device).float()[:, None] * inv_freq[None]
    angles = torch.cat([torch.zeros(n_prefix, head_dim // 2, device=device), angles])
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    """Rotate pairs (first half, second half) of each head's channels; x is (B, H, T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=True)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)  # qk-norm keeps attention logits bounded
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, h, cos, sin):
        B, T, C = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        # Bidirectional and unpadded: no mask at all, so the flash kernel stays eligible.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        inner = int(2 / 3 * 4 * cfg.n_embd)
        self.gate_up = nn.Linear(cfg.n_embd, 2 * inner, bias=False)
        self.down = nn.Linear(inner, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h):
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(gate) * up))

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.n_embd, eps=1e-6), nn.RMSNorm(cfg.n_embd, eps=1e-6)
        self.attn, self.mlp = Attention(cfg), SwiGLU(cfg)

    def forward(self, h, cos, sin):
        h = h + self.attn(self.norm1(h), cos, sin)
        return h + self.mlp(self.norm2(h))

class ELF(nn.Module):
    """The denoiser f(z_t, t, w, x_sc, mode). `forward` returns the final hidden states of the text
    positions; `predict_x` and `decode_logits` are the two heads read off them."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, d = cfg.n_embd, cfg.embed_dim
        self.embed = TokenEmbedding(cfg)
        # Input: concat(z, x_sc) -> d, then the bottleneck d -> 128 -> hidden (§3).
        self.in_proj = nn.Linear(2 * d, d)
        self.bottleneck_down = nn.Linear(d, cfg.bottleneck_dim, bias=False)
        self.bottleneck_up = nn.Linear(cfg.bottleneck_dim, C)
        # In-context control tokens: mode (on in decode mode only), time t, guidance scale w.
        self.mode_tokens = nn.Parameter(torch.empty(cfg.n_mode_tokens, C))
        self.time_tokens = nn.Parameter(torch.empty(cfg.n_time_tokens, C))
        self.scale_tokens = nn.Parameter(torch.empty(cfg.n_scale_tokens, C))
        self.time_mlp = nn.Sequential(nn.Linear(256, C), nn.SiLU(), nn.Linear(C, C))
        self.scale_mlp = nn.Sequential(nn.Linear(256, C), nn.SiLU(), nn.Linear(C, C))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_out = nn.RMSNorm(C, eps=1e-6)
        self.x_head = nn.Linear(C, d)                                          # denoise: hidden -> x_hat
        self.decode_hidden, self.decode_out = nn.Linear(C, d), nn.Linear(d, cfg.vocab_size)  # decode
        self.n_prefix = cfg.n_mode_tokens + cfg.n_time_tokens + cfg.n_scale_tokens
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        mlp_weights = [m.weight for m in [*self.time_mlp, *self.scale_mlp] if isinstance(m, nn.Linear)]
        for p in [self.mode_tokens, self.time_tokens, self.scale_tokens, *mlp_weights]:
            nn.init.normal_(p, std=0.02)
        # Zero-initialised x_hat head: the untrained model predicts x_hat = 0, a calm starting point.
        nn.init.zeros_(self.x_head.weight)
        nn.init.zeros_(self.x_head.bias)

    def forward(self, z, t, w, x_sc, decode):
        """z, x_sc: (B, L, d); t, w: (B,); decode: (B,) 1.0 for decode mode, 0.0 for denoise mode."""
        B, L, _ = z.shape
        h = self.bottleneck_up(self.bottleneck_down(self.in_proj(torch.cat([z, x_sc], dim=-1))))
        mode = self.mode_tokens[None] * decode.to(h.dtype)[:, None, None]
        time = self.time_tokens[None] + self.time_mlp(sinusoidal(t))[:, None]
        scale = self.scale_tokens[None] + self.scale_mlp(sinusoidal(w))[:, None]
        h = torch.cat([mode.to(h.dtype), time.to(h.dtype), scale.to(h.dtype), h], dim=1)
        cos, sin = rope_tables(self.n_prefix, L, self.cfg.n_embd // self.cfg.n_head, device=z.device)
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.norm_out(h[:, self.n_prefix:])

    def predict_x(self, hidden, z, t):
        """Denoise head: x_hat. For the v-prediction ablation the head's output is read as a velocity."""
        out = self.x_head(hidden)
        if self.cfg.prediction == "v":
            return z + time_denominator(t, self.cfg.t_eps) * out
        return out

    def decode_logits(self, hidden):
        """Decode head (§3, code): GELU(Linear(hidden -> d)) -> Linear(d -> vocab)."""
        return self.decode_out(F.gelu(self.decode_hidden(hidden)))

    def denoise(self, z, t, w, x_sc):
        """x_hat = f(z_t, t, w, x_sc) in denoise mode: the call the sampler makes at every step."""
        hidden = self(z, t, w, x_sc, torch.zeros_like(t))
        return self.predict_x(hidden, z, t)

    def decode(self, z, w, x_sc=None):
        """Final pass (§5): decode mode at t = 1, self-conditioning input zero (but clean at condition
        positions, §6) -> logits (B, L, vocab)."""
        t = torch.ones(z.size(0), device=z.device)
        return self.decode_logits(self(z, t, w, torch.zeros_like(z) if x_sc is None else x_sc, torch.ones_like(t)))

# ----------------------------------------------------------------------------------------------
# Training objective (§1, §4)

def time_denominator(t, t_eps):
    """max(1 - t, t_eps), shaped (B, 1, 1) to broadcast over positions and channels."""
    return (1 - t).clamp(min=t_eps)[:, None, None]

def velocity(x, z, t, t_eps):
    """Rectified-flow velocity implied by a clean estimate: v = (x - z) / max(1 - t, t_eps)."""
    return (x - z) / time_denominator(t, t_eps)

def noisy_state(x, t, eps, noise_scale):
    """z_t = t x + (1 - t) sigma eps: t = 0 is pure noise, t = 1 is data (§1)."""
    t = t[:, None, None]
    return t * x + (1 - t) * noise_scale * eps

def corrupt_for_decode(x, lam, eps, decoder_noise_scale):
    """Decode-step corruption (§4): per token z = lam x + (1 - lam) s_dec eps, so decoding is not trivial."""
    lam = lam[..., None]
    return lam * x + (1 - lam) * decoder_noise_scale * eps

def sample_guidance_scale(n, cfg, generator=None, device=None):
    """w with (w + 1) log-uniform on [1 + guidance_min, 1 + guidance_max] (§4)."""
    lo, hi = math.log(1 + cfg.guidance_min), math.log(1 + cfg.guidance_max)
    u = torch.rand(n, generator=generator, device=device)
    return torch.exp(lo + (hi - lo) * u) - 1

def draw_condition(cfg, batch, length, generator=None):
    """Condition positions (B, L) bool, per example (§6): none, a clean prefix of random length
    (prompting) or one to three clean spans at random places (infilling). A position is a condition
    when an odd number of the example's cut points lie at or before it."""
    kind = torch.rand(batch, generator=generator)
    prefix, conditioned = kind < cfg.cond_prefix_prob, kind < cfg.cond_prefix_prob + cfg.cond_span_prob
    cuts = torch.randint(0, length + 1, (batch, 6), generator=generator)
    n_cuts = 2 * torch.randint(1, 4, (batch, 1), generator=generator)     # two per clean span
    cuts[prefix, 0], n_cuts[prefix] = 0, 2                                # a prefix: one span from 0
    cuts[(torch.arange(6) >= n_cuts) | ~conditioned[:, None]] = length    # cut points at `length` do nothing
    return (torch.arange(length)[None, :, None] >= cuts[:, None]).sum(-1) % 2 == 1

@dataclass
class Draws:
    """All randomness of one training step. Rows are split into three blocks: [0, n_self_cond) are
    self-conditioned denoise examples, [n_self_cond, B - n_decode) plain denoise examples and the
    last n_decode decode examples. Windows are drawn i.i.d., so roles by block with binomial counts
    are the same distribution as a coin per example, and every sub-batch is a slice (no host sync)."""
    n_self_cond: int
    n_decode: int
    t: torch.Tensor      # (B,) times, 1 for decode rows
    w: torch.Tensor      # (B,) guidance scales
    eps: torch.Tensor    # (B, L, d) noise
    lam: torch.Tensor    # (B, L) clean fraction of the decode corruption
    cond: torch.Tensor = None   # (B, L) bool: clean condition positions (§6); None: unconditional
    drop: torch.Tensor = None   # (B,) bool: the examples whose condition is dropped (classifier-free guidance)

def draw_training_noise(cfg, batch, length, generator=None, device_generator=None, device=None, cond=None):
    """Draw the roles, times and scales of one step on the host (small, and the block sizes must be
    known there), and the large noise tensors on the device. Two generators make it reproducible.
    cond: the data's own condition positions (paired data); else they are drawn from the mixture."""
    n_decode = int((torch.rand(batch, generator=generator) < cfg.decoder_prob).sum())
    n_self_cond = int((torch.rand(batch - n_decode, generator=generator) < cfg.self_cond_prob).sum())
    t = torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(batch, generator=generator))
    t[batch - n_decode:] = 1.0
    w = sample_guidance_scale(batch, cfg, generator)
    lam_n = torch.randn(batch, length, generator=device_generator, device=device)
    lam = torch.sigmoid(cfg.decoder_lambda_mean + cfg.decoder_lambda_std * lam_n)
    eps = torch.randn(batch, length, cfg.embed_dim, generator=device_generator, device=device)
    if cond is None and cfg.cond_prefix_prob + cfg.cond_span_prob > 0:
        cond = to_device(draw_condition(cfg, batch, length, generator), device)
    drop = None if cond is None else to_device(torch.rand(batch, generator=generator) < cfg.cond_drop_prob, device)
    return Draws(n_self_cond, n_decode, to_device(t, device), to_device(w, device), eps, lam, cond, drop)

def to_device(tensor, device):
    """Host -> device copy that does not wait for the GPU: from pinned memory a CUDA copy is async,
    from ordinary (pageable) memory it first waits for all queued GPU work."""
    if device is not None and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

def micro_batch_generators(seed, it, index, device):
    """Host and device generators for micro-batch `index` of step `it`. Data windows and noise depend on
    (seed, it, index) alone, so a resumed run draws exactly what an uninterrupted one would, and any
    split of a step's micro-batches over processes draws what one process would."""
    s = (seed * 1_000_003 + it) * 4099 + index
    return torch.Generator().manual_seed(s), torch.Generator(device=device).manual_seed(s + 1)

def guided_target(v, v_cond, v_uncond, w):
    """Training-time self-conditioning guidance (§4): v + (1 - 1/w)(v_cond - v_uncond), no gradient."""
    return v + (1 - 1 / w)[:, None, None] * (v_cond - v_uncond)

def elf_loss(model, tokens, draws):
    """The ELF objective for one mixed batch (§4). Returns (loss, mse, ce): loss is (sum of decode-token
    CE + sum of denoise-token velocity MSE) / number of tokens in the loss (all but conditions, §6);
    mse and ce are the means over their own tokens.

    Cost: one no-grad forward on the self-conditioned rows only, then one forward+backward. The
    no-grad pass gives x_sc and v_uncond; the main pass's detached output *is* v_cond (dropout 0)."""
    cfg, d = model.cfg, draws
    B, L = tokens.shape
    n_den, n_sc = B - d.n_decode, d.n_self_cond
    x = model.embed(tokens)
    # Inputs: noisy z_t for denoise rows, token-corrupted clean embeddings for decode rows.
    z = torch.cat([noisy_state(x[:n_den], d.t[:n_den], d.eps[:n_den], cfg.noise_scale),
                   corrupt_for_decode(x[n_den:], d.lam[n_den:], d.eps[n_den:], cfg.decoder_noise_scale)])
    decode = (torch.arange(B, device=tokens.device) >= n_den).float()
    # Conditions (§6): clean embeddings in z and in x_sc at every t, out of the loss. Where classifier-
    # free guidance drops an example's condition, its positions hold zeros instead.
    cond = torch.zeros_like(tokens, dtype=torch.bool) if d.cond is None else d.cond
    shown = cond if d.drop is None else cond & ~d.drop[:, None]
    x_cond = torch.where(shown[..., None], x, 0.0)
    z = torch.where(cond[..., None], x_cond, z)
    in_loss = (~cond).float()
    # Self-conditioning: x_sc = stopgrad(f(z, t, x_sc = 0)) on the self-conditioned rows, 0 elsewhere (but
    # the condition, as above, at condition positions).
    x_sc = x_cond
    if n_sc > 0:
        with torch.no_grad():
            z_sc, t_sc, w_sc = z[:n_sc], d.t[:n_sc], d.w[:n_sc]
            x_uncond = model.predict_x(model(z_sc, t_sc, w_sc, x_cond[:n_sc], decode[:n_sc]), z_sc, t_sc)
        x_sc = torch.cat([torch.where(cond[:n_sc, :, None], x_cond[:n_sc], x_uncond.to(z.dtype)), x_cond[n_sc:]])
    hidden = model(z, d.t, d.w, x_sc, decode)
    # Denoising loss on the first n_den rows: velocity MSE against the (guided) target.
    loss_sum = mse = ce = z.new_zeros(())
    if n_den > 0:
        z_den, t_den = z[:n_den], d.t[:n_den]
        x_hat = model.predict_x(hidden[:n_den], z_den, t_den).float()
        v_hat = velocity(x_hat, z_den, t_den, cfg.t_eps)
        target = velocity(x[:n_den], z_den, t_den, cfg.t_eps)
        if n_sc > 0 and cfg.guidance:
            v_uncond = velocity(x_uncond.float(), z[:n_sc], d.t[:n_sc], cfg.t_eps)
            guided = guided_target(target[:n_sc], v_hat[:n_sc].detach(), v_uncond, d.w[:n_sc])
            target = torch.cat([guided, target[n_sc:]])
        mse_sum = ((v_hat - target).pow(2).mean(-1) * in_loss[:n_den]).sum()
        loss_sum, mse = loss_sum + mse_sum, mse_sum / in_loss[:n_den].sum().clamp(min=1)
    # Decode loss on the last n_decode rows: cross-entropy of the logits (computed only there) in fp32.
    if d.n_decode > 0:
        logits = model.decode_logits(hidden[n_den:])
        ce_per_token = F.cross_entropy(logits.flatten(0, 1).float(), tokens[n_den:].flatten(), reduction="none")
        ce_sum = (ce_per_token * in_loss[n_den:].flatten()).sum()
        loss_sum, ce = loss_sum + ce_sum, ce_sum / in_loss[n_den:].sum().clamp(min=1)
    return loss_sum / in_loss.sum().clamp(min=1), mse, ce

# ----------------------------------------------------------------------------------------------
# Sampler math (§5). The loop that uses these lives in sample.py.

def time_grid(steps, schedule="logit_normal", cfg=None, generator=None):
    """t_0 = 0 < ... < t_N = 1. 'uniform', or 'logit_normal': N - 1 sorted draws of the training-time
    distribution between the endpoints (more steps where training put its effort)."""
    if schedule == "uniform":
        return torch.linspace(0, 1, steps + 1)
    if schedule != "logit_normal":
        raise ValueError(f"unknown schedule {schedule!r}: use 'logit_normal' or 'uniform'")
    device = generator.device if generator is not None else None
    noise = torch.randn(steps - 1, generator=generator, device=device).cpu()
    inner = torch.sigmoid(cfg.t_mean + cfg.t_std * noise).sort().values
    return torch.cat([torch.zeros(1), inner, torch.ones(1)])

def sde_step(denoise_fn, z, x_prev, t, t_next, gamma, noise, cfg):
    """One step from t to t_next with churn gamma (§5); gamma = 0 is the plain Euler ODE step.
    Churn first moves back to t_b = alpha t by re-noising, then an Euler step goes from t_b to t_next.
    denoise_fn(z, t_batch, x_sc) -> x_hat. Returns (z_next, x_hat), x_hat feeding the next step's x_sc."""
    alpha = min(max(1.0 - gamma * (t_next - t), 0.0), 1.0)
    t_b = alpha * t
    z_b = alpha * z + (1 - alpha) * cfg.noise_scale * noise if alpha < 1 else z
    t_batch = torch.full((z.size(0),), t_b, device=z.device)
    x_hat = denoise_fn(z_b, t_batch, x_prev)
    v_hat = velocity(x_hat, z_b, t_batch, cfg.t_eps)
    return z_b + (t_next - t_b) * v_hat, x_hat

def hold_condition(z, cond, x_cond):
    """Condition positions (§6) hold their clean embedding x_cond, whatever the flow did there."""
    return z if cond is None else torch.where(cond[..., None], x_cond, z)

def conditioned(denoise_fn, cond, x_cond, cfg_scale=1.0):
    """denoise_fn(z, t, x_sc) -> x_hat for conditional sampling (§6): the condition is held clean in both
    inputs. Classifier-free guidance (cfg_scale c != 1) adds a pass with the condition dropped (zeros,
    as in training) and returns x_u + c (x_c - x_u); both passes share z at the generated positions,
    so its velocity is v_u + c (v_c - v_u)."""
    def denoise(z, t, x_sc):
        x_c = denoise_fn(hold_condition(z, cond, x_cond), t, hold_condition(x_sc, cond, x_cond))
        if cond is None or cfg_scale == 1:
            return x_c
        x_u = denoise_fn(hold_condition(z, cond, 0.0), t, hold_condition(x_sc, cond, 0.0))
        return x_u + cfg_scale * (x_c - x_u)
    return denoise

def argmax_tokens(logits, n_vocab=None):
    """Final decode (§5): the most likely token per position, ignoring the vocabulary's padding rows."""
    return logits[..., :n_vocab].argmax(-1)

# ----------------------------------------------------------------------------------------------
# Evaluation (§7): a diffusion LM has no simple perplexity; samples are judged by these two numbers.

def cut_at_eot(row):
    """A sample's tokens up to its first end-of-text token, which is kept (ELF.md §7 scores it once)."""
    return row[:row.index(EOT) + 1] if EOT in row else row

def unigram_entropy(tokens):
    """Entropy in nats of one sample's token frequencies; repetitive text scores low."""
    counts = torch.unique(torch.tensor(tokens, dtype=torch.long), return_counts=True)[1].double()
    p = counts / counts.sum()
    return float(-(p * p.log()).sum()) if len(tokens) else 0.0

@torch.no_grad()
def pooled_nll(judge, samples, bos=EOT):
    """(sum of the judge's token NLL over all samples, number of tokens scored). Each sample is scored
    after a BOS token (GPT-2's is end-of-text), up to the judge's context length."""
    device, n_ctx = next(judge.parameters()).device, judge.config.n_positions
    total, count = 0.0, 0
    for tokens in samples:
        ids = torch.tensor([([bos] + list(tokens))[:n_ctx]], device=device)
        logp = judge(ids).logits[0, :-1].float().log_softmax(-1)
        total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.size(1) - 1
    return total, count

def generative_perplexity(samples, judge_name="gpt2-large", device="cpu"):
    """exp(pooled NLL) of the samples under a causal LM from `transformers` (an optional dependency), or
    None, with a one-line reason, when it is not installed or the judge's weights cannot be loaded."""
    try:
        from transformers import AutoModelForCausalLM
        judge = AutoModelForCausalLM.from_pretrained(judge_name).to(device).eval()
    except ImportError:
        return print("no generative perplexity: the judge needs `pip install transformers`; entropy only")
    except Exception as e:
        return print(f"no generative perplexity: cannot load judge {judge_name!r} ({type(e).__name__}); entropy only")
    total, count = pooled_nll(judge, samples)
    return math.exp(total / max(count, 1))

# ----------------------------------------------------------------------------------------------
# Cost model, for the MFU that train.py logs.

def flops_per_token(mc):
    """FLOPs per trained token for the work a step really does: one forward+backward of the trunk
    (3x the forward), a no-grad forward on the self-conditioned share of the rows, and the decode
    head (hidden -> d -> vocab) forward+backward on the decode share only."""
    C, L, d = mc.n_embd, mc.block_size, mc.embed_dim
    T = L + mc.n_mode_tokens + mc.n_time_tokens + mc.n_scale_tokens
    inner = int(2 / 3 * 4 * C)
    per_layer = 2 * (C * 3 * C + C * C + 3 * C * inner) * T / L + 4 * T * C * T / L  # matmuls + attention
    trunk = mc.n_layer * per_layer + 2 * (2 * d * d + d * mc.bottleneck_dim + mc.bottleneck_dim * C + C * d)
    head = 2 * (C * d + d * mc.vocab_size)
    share_sc = (1 - mc.decoder_prob) * mc.self_cond_prob
    return 3 * trunk + share_sc * trunk + mc.decoder_prob * 3 * head

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense, per GPU

def peak_flops(device):
    """bf16 dense peak FLOP/s of the GPU, looked up by name; None where unknown (no MFU then)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)

# ----------------------------------------------------------------------------------------------
# Optimizer (§4): Muon for the transformer's 2-D weight matrices, AdamW for everything else.

def configure_optimizers(model, optimizer="muon", lr=2e-3, weight_decay=0.0, betas=(0.9, 0.95), adam_lr=None):
    """Returns a list of optimizers to step together. Muon orthogonalises updates of hidden 2-D
    matrices; embeddings, heads, norms, biases and learned tokens go to AdamW (Muon takes 2-D only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        return [torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=params[0].is_cuda)]
    if optimizer != "muon":
        raise ValueError(f"unknown optimizer {optimizer!r}: use 'muon' or 'adamw'")
    hidden = {id(p) for n, p in model.blocks.named_parameters() if p.dim() == 2}
    muon = [p for p in params if id(p) in hidden]
    adam = [p for p in params if id(p) not in hidden]
    return [torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="original"),
            torch.optim.AdamW(adam, lr=adam_lr or lr, betas=betas, weight_decay=weight_decay,
                              fused=adam[0].is_cuda)]   # fused: one kernel launch for all tensors
