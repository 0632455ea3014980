"""ELF: Embedded Language Flows (arXiv 2605.10938) in one file; "README: X" names its section X.

Tokens become embeddings x; a transformer learns to turn Gaussian noise into x (t = 0 is noise,
t = 1 is data), and at t = 1 the *same* network, switched to "decode" mode by its mode tokens,
turns x into tokens. Top to bottom: config, embedding, network, flow, training objective, condition
math, cost model, optimizer. The sampler's steps and loop, and judging, live in sample.py."""
import functools
import math
import sys
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", "Mismatch dtype between input and")  # bf16 autocast's RMSNorm

@dataclass
class ELFConfig:
    # sizes (README: The network)
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
    # embedding (README: Embeddings)
    embedding: str = "gaussian"   # 'gaussian' (frozen N(0,1) table), 'learned' or 't5' (frozen)
    embedding_seed: int = 0       # the Gaussian table is regenerated from this seed, never stored
    latent_std: float = 1.0       # embeddings are divided by this scalar (t5: 0.2)
    encoder: str = "t5-small"     # --embedding=t5: the pretrained encoder (name or folder)
    tokenizer: str = "gpt2"       # what the token ids mean (train.py: from the data's meta.json)
    # flow and objective (README: The flow, Training objective)
    prediction: str = "x"         # 'x' (x-prediction, the paper's) or 'v' (v-prediction, ablation)
    noise_scale: float = 2.0      # sigma: z_t = t x + (1 - t) sigma eps
    t_eps: float = 0.05           # velocity denominator floor: v = (x - z) / max(1 - t, t_eps)
    t_mean: float = -1.5          # training times t = sigmoid(N(t_mean, t_std))
    t_std: float = 0.8
    decoder_prob: float = 0.2     # fraction of examples trained in decode mode
    decoder_noise_scale: float = 5.0   # s_dec of the decode-step corruption
    decoder_lambda_mean: float = 0.8   # per-token clean fraction lambda = sigmoid(N(mean, std))
    decoder_lambda_std: float = 0.8
    decode_vocab: int = 0         # > 0: the decode head scores only this many ids (ELF.decode_ids)
    self_cond_prob: float = 0.5   # 0 turns self-conditioning off
    guidance: bool = True         # training-time self-conditioning guidance; False: the ablation
    guidance_min: float = 0.5     # w range; (w + 1) is log-uniform on [1 + min, 1 + max]
    guidance_max: float = 5.0
    # conditions (README: Conditions): none, a clean prefix (prompting) or clean spans (infilling)
    cond_prefix_prob: float = 0.0  # the paper's unconditional model has neither
    cond_span_prob: float = 0.0
    cond_drop_prob: float = 0.1   # classifier-free guidance: conditions dropped (zeroed) this often

# Named sizes (README: The network). 'elf-cpu' is this project's: minutes on a laptop CPU. With
# d = 64 instead of 512 both noise scales shrink by sqrt(64/512): how well a noisy embedding
# identifies its token grows with d * SNR, and this keeps the paper's signal-to-noise per token.
MODEL_SIZES = {
    "elf-b": dict(n_layer=12, n_embd=768, n_head=12),
    "elf-m": dict(n_layer=24, n_embd=1056, n_head=16),
    "elf-l": dict(n_layer=32, n_embd=1280, n_head=16),
    "elf-cpu": dict(n_layer=3, n_embd=192, n_head=3, embed_dim=64, bottleneck_dim=64, block_size=64,
                    noise_scale=0.7, decoder_noise_scale=1.8),
}

# ----------------------------------------------------------------------------------------------
# Embedding (README: Embeddings): the "encoder" that turns tokens into the continuous x the flow
# works on.

class TokenEmbedding(nn.Module):
    """Token ids -> embeddings x of shape (B, L, embed_dim)."""

    def __init__(self, cfg):
        super().__init__()
        self.kind, self.latent_std, self.encoder_name = cfg.embedding, cfg.latent_std, cfg.encoder
        if cfg.embedding == "gaussian":
            # Frozen N(0, 1) table, regenerated from the seed: a buffer that is not saved.
            g = torch.Generator().manual_seed(cfg.embedding_seed)
            table = torch.randn(cfg.vocab_size, cfg.embed_dim, generator=g)
            self.register_buffer("table", table, persistent=False)
        elif cfg.embedding == "learned":
            self.table = nn.Parameter(torch.randn(cfg.vocab_size, cfg.embed_dim))
        elif cfg.embedding != "t5":
            raise ValueError(f"unknown embedding {cfg.embedding!r}: use gaussian, learned or t5")

    def forward(self, tokens, cond=None, valid=None, drop=None):
        """cond: (B, L) bool condition positions (README: Conditions); valid: (B, L) bool, False on
        padding; drop: (B,) bool, examples whose condition is dropped. Only t5 reads them."""
        if self.kind == "t5":
            return t5_embedding(self.encoder_name, tokens, cond, valid, drop) / self.latent_std
        x = self.table[tokens]
        if self.kind == "learned":
            # Unit-RMS rows: the loss could otherwise shrink all embeddings to zero (collapse).
            x = F.normalize(x, dim=-1) * math.sqrt(x.size(-1))
        return x / self.latent_std

@functools.cache
def frozen_encoder(name):
    """The frozen pretrained T5 encoder of --embedding=t5 (optional `transformers`), loaded once.
    Not a submodule: never trained, in the optimizer, the EMA or a checkpoint (just its name)."""
    try:
        from transformers import T5EncoderModel
        return T5EncoderModel.from_pretrained(name).eval().requires_grad_(False)
    except ImportError:
        sys.exit("error: --embedding=t5 needs the optional `transformers` (pip install it)")
    except (OSError, ValueError) as e:
        sys.exit(f"error: no T5 encoder {name!r} here ({type(e).__name__}): fetch it once online, "
                 "or pass --encoder=FOLDER")

@torch.compiler.disable         # the encoder runs as it is: torch.compile traces the rest only
@torch.no_grad()
def t5_embedding(name, tokens, cond=None, valid=None, drop=None):
    """The paper's default x: the frozen encoder's last hidden state. As the authors', conditions
    attend only to each other (a prompt's x is the same in training and sampling), the other
    positions to all but padding and a condition that CFG dropped."""
    mask = None                                 # (B, 1, query, key): True where attention goes
    if cond is not None or valid is not None:
        cond = torch.zeros_like(tokens, dtype=torch.bool) if cond is None else cond
        keys = torch.ones_like(cond) if valid is None else valid   # what the others may see
        keys = keys if drop is None else keys & ~(cond & drop[:, None])
        mask = ((cond[:, :, None] & cond[:, None]) | (~cond[:, :, None] & keys[:, None]))[:, None]
    encoder = frozen_encoder(name).to(tokens.device)
    return encoder(input_ids=tokens, attention_mask=mask).last_hidden_state.float()

def config_for_data(cfg, meta):
    """cfg for the data's token ids (its meta.json; none: GPT-2's): the vocabulary padded to a
    multiple of 64 (fast matmuls); for --embedding=t5, the encoder's width, and ids it reads."""
    tokenizer, n_vocab = meta.get("tokenizer", "gpt2"), meta.get("vocab_size", 50257)
    if tokenizer != cfg.tokenizer:                # (the same: --init_from's vocabulary is kept)
        cfg = replace(cfg, tokenizer=tokenizer, vocab_size=-(-n_vocab // 64) * 64)
    if cfg.embedding == "t5":
        t5 = frozen_encoder(cfg.encoder).config
        if n_vocab > t5.vocab_size:
            sys.exit(f"error: {cfg.encoder} reads {t5.vocab_size:,} token ids, the data has "
                     f"{n_vocab:,}: run prepare_data.py --tokenizer={cfg.encoder}")
        cfg = replace(cfg, embed_dim=t5.d_model)   # x is as wide as the encoder's hidden states
    return cfg

# ----------------------------------------------------------------------------------------------
# The network (README: The network): one transformer for both denoising and decoding.

def sinusoidal(values, dim=256, max_period=10000.0):
    """Sinusoidal features (B,) -> (B, dim) of the raw values, as the authors' code: nearby values
    (w = 3.0 and 3.05) get nearby features, which scaling by 1000 first would not give."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

def rope_tables(n_prefix, n_text, head_dim, base=10000.0, device=None):
    """cos/sin for rotary positions: the identity (no position) for the prefix, 0..L-1 for text."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(n_text, device=device).float()[:, None] * inv_freq[None]
    angles = torch.cat([torch.zeros(n_prefix, head_dim // 2, device=device), angles])
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + head_dim/2) of each head of x (B, H, T, head_dim); the authors'
    pairs (2i, 2i+1) are the same rotation after from_authors reorders q/k (README: The network)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=True)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)  # qk-norm keeps attention logits bounded
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=True)   # every block linear: a bias
        self.dropout = cfg.dropout                                  # in training only

    def forward(self, h, cos, sin):
        B, T, C = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        # Bidirectional and unpadded: no mask at all, so the flash kernel stays eligible.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout * self.training)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        inner = int(2 / 3 * 4 * cfg.n_embd)
        self.gate_up = nn.Linear(cfg.n_embd, 2 * inner, bias=True)
        self.down = nn.Linear(inner, cfg.n_embd, bias=True)
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

    def __init__(self, cfg, decode_ids=None):
        super().__init__()
        self.cfg = cfg
        C, d = cfg.n_embd, cfg.embed_dim
        self.embed = TokenEmbedding(cfg)
        # Input: concat(z, x_sc) -> d, then the bottleneck d -> bottleneck_dim -> hidden.
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
        self.norm_out = nn.RMSNorm(C, eps=1e-6)           # the x_hat head's own final norm
        self.x_head = nn.Linear(C, d)                     # denoise head: hidden -> x_hat
        self.decode_hidden = nn.Linear(C, d)              # decode head: hidden -> d -> vocab
        # Its rows: decode_ids, the decode_vocab ids the data holds (train.py's; 0: all): ~11K/50K
        n_ids = cfg.decode_vocab or cfg.vocab_size
        self.decode_out = nn.Linear(d, n_ids)
        ids = torch.arange(n_ids) if decode_ids is None else torch.as_tensor(decode_ids)
        self.register_buffer("decode_ids", ids, persistent=bool(cfg.decode_vocab))
        self.n_prefix = cfg.n_mode_tokens + cfg.n_time_tokens + cfg.n_scale_tokens
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        mlps = [*self.time_mlp, *self.scale_mlp]
        mlp_weights = [m.weight for m in mlps if isinstance(m, nn.Linear)]
        for p in [self.mode_tokens, self.time_tokens, self.scale_tokens, *mlp_weights]:
            nn.init.normal_(p, std=0.02)
        # Zero-initialised x_hat head: the untrained model predicts x_hat = 0, a calm start.
        nn.init.zeros_(self.x_head.weight)
        nn.init.zeros_(self.x_head.bias)

    def forward(self, z, t, w, x_sc, decode):
        """z, x_sc: (B, L, d); t, w: (B,); decode: (B,) 1.0 for decode mode, 0.0 for denoise.
        Returns the last block's output at the text positions, before any final norm."""
        B, L, _ = z.shape
        h = self.bottleneck_up(self.bottleneck_down(self.in_proj(torch.cat([z, x_sc], dim=-1))))
        mode = self.mode_tokens[None] * decode.to(h.dtype)[:, None, None]
        time = self.time_tokens[None] + self.time_mlp(sinusoidal(t))[:, None]
        scale = self.scale_tokens[None] + self.scale_mlp(sinusoidal(w))[:, None]
        h = torch.cat([mode.to(h.dtype), time.to(h.dtype), scale.to(h.dtype), h], dim=1)
        cos, sin = rope_tables(self.n_prefix, L, h.size(-1) // self.cfg.n_head, device=h.device)
        for block in self.blocks:
            h = block(h, cos, sin)
        return h[:, self.n_prefix:]

    def predict_x(self, hidden, z, t):
        """Denoise head: RMSNorm -> Linear -> x_hat. For the v-prediction ablation the output is
        read as a velocity."""
        out = self.x_head(self.norm_out(hidden))
        if self.cfg.prediction == "v":
            return z + time_denominator(t, self.cfg.t_eps) * out
        return out

    def decode_logits(self, hidden):
        """Decode head, as the authors' code: GELU-tanh(Linear(hidden -> d)) -> Linear(d -> vocab),
        on the last block's output itself (the final RMSNorm is the x_hat head's alone)."""
        return self.decode_out(F.gelu(self.decode_hidden(hidden), approximate="tanh"))

    def denoise(self, z, t, w, x_sc):
        """x_hat = f(z_t, t, w, x_sc) in denoise mode: the call the sampler makes at every step."""
        hidden = self(z, t, w, x_sc, torch.zeros_like(t))
        return self.predict_x(hidden, z, t)

    def decode(self, z, w):
        """Final pass (README: Sampling): decode mode at t = 1, self-conditioning input zero (at
        condition positions too, as in the decode rows of training) -> logits (B, L, vocab)."""
        t = torch.ones(z.size(0), device=z.device)
        logits = self.decode_logits(self(z, t, w, torch.zeros_like(z), torch.ones_like(t)))
        vocab = logits.new_full((*logits.shape[:-1], self.cfg.vocab_size), -math.inf)
        return vocab.index_copy_(-1, self.decode_ids, logits)   # ids the head never scores: -inf

# ----------------------------------------------------------------------------------------------
# The flow (README: The flow): noise at t = 0, data at t = 1, and the velocity between them.

def time_denominator(t, t_eps):
    """max(1 - t, t_eps), shaped (B, 1, 1) to broadcast over positions and channels."""
    return (1 - t).clamp(min=t_eps)[:, None, None]

def velocity(x, z, t, t_eps):
    """Rectified-flow velocity implied by a clean estimate: v = (x - z) / max(1 - t, t_eps)."""
    return (x - z) / time_denominator(t, t_eps)

def noisy_state(x, t, eps, noise_scale):
    """z_t = t x + (1 - t) sigma eps: t = 0 is pure noise, t = 1 is data."""
    t = t[:, None, None]
    return t * x + (1 - t) * noise_scale * eps

def corrupt_for_decode(x, lam, eps, decoder_noise_scale):
    """Decode-step corruption per token (README: Training objective): lam x + (1-lam) s_dec eps."""
    return lam[..., None] * x + (1 - lam[..., None]) * decoder_noise_scale * eps

# ----------------------------------------------------------------------------------------------
# The randomness of one training step (README: Training objective): roles, t, w, noise, conditions.

def sample_guidance_scale(n, cfg, generator=None, device=None):
    """w with (w + 1) log-uniform on [1 + guidance_min, 1 + guidance_max]."""
    lo, hi = math.log(1 + cfg.guidance_min), math.log(1 + cfg.guidance_max)
    return torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator, device=device)) - 1

def draw_condition(cfg, batch, length, generator=None):
    """Condition positions (B, L) bool (README: Conditions): none, a clean prefix (prompting) or 1-3
    clean spans (infilling): positions with an odd number of cut points at or before them."""
    kind = torch.rand(batch, generator=generator)
    prefix = kind < cfg.cond_prefix_prob
    conditioned = kind < cfg.cond_prefix_prob + cfg.cond_span_prob
    cuts = torch.randint(0, length + 1, (batch, 6), generator=generator)
    n_cuts = 2 * torch.randint(1, 4, (batch, 1), generator=generator)   # two per clean span
    cuts[prefix, 0], n_cuts[prefix] = 0, 2                              # a prefix: one span from 0
    cuts[(torch.arange(6) >= n_cuts) | ~conditioned[:, None]] = length  # cuts at `length`: no-ops
    return (torch.arange(length)[None, :, None] >= cuts[:, None]).sum(-1) % 2 == 1

def condition_masks(tokens, meta):
    """(tokens, cond, valid) of paired examples (README: Conditions). The source runs to the first
    end-of-text; in the authors' layout its length leads, and padding starts at the next one."""
    eot = tokens == meta["eot_token"]
    if meta.get("source_length") is None:
        return tokens, eot.cumsum(1) <= eot, None
    lengths, tokens, eot = tokens[:, :1], tokens[:, 1:], eot[:, 1:]
    cond = torch.arange(tokens.size(1), device=tokens.device) < lengths
    return tokens, cond, (eot & ~cond).cumsum(1) == 0

@dataclass
class Draws:
    """All randomness of one step. Rows in blocks (i.i.d. windows: binomial block sizes equal a coin
    per row): [0, n_self_cond) self-conditioned, plain denoise rows, the last n_decode decode."""
    n_self_cond: int
    n_decode: int
    t: torch.Tensor      # (B,) times, 1 for decode rows
    w: torch.Tensor      # (B,) guidance scales
    eps: torch.Tensor    # (B, L, d) noise
    lam: torch.Tensor    # (B, L) clean fraction of the decode corruption
    cond: torch.Tensor = None   # (B, L) bool: clean condition positions; None: unconditional
    drop: torch.Tensor = None   # (B,) bool: the examples whose condition is dropped (for CFG)
    valid: torch.Tensor = None  # (B, L) bool: False on padding, which the T5 encoder ignores

def draw_training_noise(cfg, batch, length, generator=None, device_generator=None, device=None,
                        cond=None, valid=None):
    """The roles, times and scales of one step, drawn on the host (the block sizes must be known
    there), and the noise on the device. cond, valid: paired data's; cond None: drawn (mixture)."""
    n_decode = int((torch.rand(batch, generator=generator) < cfg.decoder_prob).sum())
    coins = torch.rand(batch - n_decode, generator=generator)
    n_self_cond = int((coins < cfg.self_cond_prob).sum())
    t = torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(batch, generator=generator))
    t[batch - n_decode:] = 1.0
    w = sample_guidance_scale(batch, cfg, generator)
    lam_n = torch.randn(batch, length, generator=device_generator, device=device)
    lam = torch.sigmoid(cfg.decoder_lambda_mean + cfg.decoder_lambda_std * lam_n)
    eps = torch.randn(batch, length, cfg.embed_dim, generator=device_generator, device=device)
    if cond is None and cfg.cond_prefix_prob + cfg.cond_span_prob > 0:
        cond = to_device(draw_condition(cfg, batch, length, generator), device)
    drop = None if cond is None else to_device(
        torch.rand(batch, generator=generator) < cfg.cond_drop_prob, device)
    t, w = to_device(t, device), to_device(w, device)
    return Draws(n_self_cond, n_decode, t, w, eps, lam, cond, drop, valid)

def to_device(tensor, device):
    """Host -> device copy that does not wait for the GPU (one from pageable memory would)."""
    if device is not None and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

def micro_batch_generators(seed, it, index, device):
    """Generators (host, device) for micro-batch `index` of step `it`: data and noise depend on
    (seed, it, index) alone, so a resumed run, or any split over processes, draws the same."""
    s = (seed * 1_000_003 + it) * 4099 + index
    return torch.Generator().manual_seed(s), torch.Generator(device=device).manual_seed(s + 1)

# ----------------------------------------------------------------------------------------------
# Training objective (README: Training objective). Per example it is four lines:
#
#     z      = t x + (1 - t) sigma eps      (decode examples: t = 1 and z = x, corrupted per token)
#     x_sc   = stopgrad(f(z, t, w, 0))      (self-conditioned examples; 0 for the others)
#     hidden = f(z, t, w, x_sc)
#     loss   = |v(x_hat(hidden)) - v_target|^2  or, decode examples, CE(logits(hidden), tokens)
#
# elf_loss below is exactly these four lines, one helper each. Around them, set apart:
# - efficiency: rows packed in blocks by role (Draws): the no-grad pass runs on self-conditioned
#   rows only, the decode head on decode rows only, and guidance's v_sc comes off the main pass;
# - conditions (README: Conditions): clean positions held in the inputs and left out of the loss.

def guided_target(v, v_sc, v_no_sc, w):
    """Training-time self-conditioning guidance (README: Self-conditioning and guidance): the target
    v + (1 - 1/w)(v_sc - v_no_sc), v_sc/v_no_sc the predictions with/without x_sc. No gradient."""
    return v + (1 - 1 / w)[:, None, None] * (v_sc - v_no_sc)

def model_inputs(model, x, draws):
    """Line 1: z for every row, the noisy state z_t on the denoise rows and the per-token corruption
    of the clean embeddings on the decode rows; and the mode of each row (1.0: decode)."""
    cfg, d = model.cfg, draws
    n_den = x.size(0) - d.n_decode
    z_den = noisy_state(x[:n_den], d.t[:n_den], d.eps[:n_den], cfg.noise_scale)
    z_dec = corrupt_for_decode(x[n_den:], d.lam[n_den:], d.eps[n_den:], cfg.decoder_noise_scale)
    decode = (torch.arange(x.size(0), device=x.device) >= n_den).float()
    return torch.cat([z_den, z_dec]), decode

def hold_condition(z, cond, x_cond):
    """Condition positions hold their clean embedding x_cond, whatever the flow did there (in
    training and at every sampling step). cond None: no conditions."""
    return z if cond is None else torch.where(cond[..., None], x_cond, z)

def apply_conditions(x, z, draws):
    """Conditions only (README: Conditions): condition positions show their clean embedding in z
    and x_sc at every t (zeros where CFG drops it) and are out of the loss. Returns (z, x_cond,
    in_loss), x_cond every row's x_sc before self-conditioning (clean at shown conditions, or 0)."""
    cond = draws.cond
    if cond is None:
        return z, torch.zeros_like(x), x.new_ones(x.shape[:2])
    shown = cond if draws.drop is None else cond & ~draws.drop[:, None]
    x_cond = torch.where(shown[..., None], x, 0.0)
    return hold_condition(z, cond, x_cond), x_cond, (~cond).float()

def self_condition(model, z, x_cond, decode, draws):
    """Line 2: x_sc = stopgrad(f(z, t, w, 0)) on the self-conditioned rows (that pass runs on them
    only), zero on decode rows (conditions too, as the authors'), else x_cond. Returns (x_sc,
    x_no_sc), x_no_sc that pass's prediction (None without it)."""
    n_sc, d = draws.n_self_cond, draws
    n_den = z.size(0) - d.n_decode
    x_cond = torch.cat([x_cond[:n_den], torch.zeros_like(x_cond[n_den:])])  # decode rows: zero
    if n_sc == 0:
        return x_cond, None
    with torch.no_grad():
        z_sc, t_sc = z[:n_sc], d.t[:n_sc]
        x_no_sc = model.predict_x(model(z_sc, t_sc, d.w[:n_sc], x_cond[:n_sc], decode[:n_sc]),
                                  z_sc, t_sc)
    cond = None if d.cond is None else d.cond[:n_sc]
    x_sc_rows = hold_condition(x_no_sc.to(z.dtype), cond, x_cond[:n_sc])
    return torch.cat([x_sc_rows, x_cond[n_sc:]]), x_no_sc

def denoise_loss(model, hidden, x, z, x_no_sc, in_loss, draws):
    """Line 4, denoise rows [0, B - n_decode): the sum over their loss tokens of the velocity MSE
    (mean over channels) against v = (x - z) / (1 - t), guided on the self-conditioned rows."""
    cfg, d = model.cfg, draws
    n_den, n_sc = x.size(0) - d.n_decode, d.n_self_cond
    z_den, t_den = z[:n_den], d.t[:n_den]
    x_hat = model.predict_x(hidden[:n_den], z_den, t_den).float()
    v_hat = velocity(x_hat, z_den, t_den, cfg.t_eps)
    target = velocity(x[:n_den], z_den, t_den, cfg.t_eps)
    if n_sc > 0 and cfg.guidance:
        v_no_sc = velocity(x_no_sc.float(), z[:n_sc], d.t[:n_sc], cfg.t_eps)
        # Efficiency: v_sc, the prediction with x_sc = x_no_sc, is the main pass's own output on
        # these rows (same inputs, dropout 0): the detached v_hat, not a third pass.
        v_sc = v_hat[:n_sc].detach()
        target = torch.cat([guided_target(target[:n_sc], v_sc, v_no_sc, d.w[:n_sc]), target[n_sc:]])
    return ((v_hat - target).pow(2).mean(-1) * in_loss[:n_den]).sum()

def decode_loss(model, hidden, tokens, in_loss, n_decode):
    """Line 4, decode rows (the last n_decode): the sum over their loss tokens of the cross-entropy,
    in fp32. Efficiency: the decode head (the vocabulary-sized matmul) runs on these rows only."""
    n_den = tokens.size(0) - n_decode
    logits = model.decode_logits(hidden[n_den:]).flatten(0, 1).float()
    targets = torch.searchsorted(model.decode_ids, tokens[n_den:].flatten())  # rows in the head
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * in_loss[n_den:].flatten()).sum()

def elf_loss(model, tokens, draws):
    """The ELF objective for one mixed batch: (loss, mse, ce), loss = (sum of decode CE + sum of
    denoise velocity MSE) / tokens in the loss (all but conditions), mse and ce each per its own
    tokens. Cost: a no-grad forward on the self-conditioned rows, then one forward+backward."""
    d, n_den = draws, tokens.size(0) - draws.n_decode
    x = model.embed(tokens, d.cond, d.valid, d.drop)
    z, decode = model_inputs(model, x, d)                           # line 1
    z, x_cond, in_loss = apply_conditions(x, z, d)                  # conditions only
    x_sc, x_no_sc = self_condition(model, z, x_cond, decode, d)     # line 2
    hidden = model(z, d.t, d.w, x_sc, decode)                       # line 3: the one with gradients
    mse_sum = ce_sum = z.new_zeros(())                              # line 4: the loss sums
    if n_den > 0:
        mse_sum = denoise_loss(model, hidden, x, z, x_no_sc, in_loss, d)
    if d.n_decode > 0:
        ce_sum = decode_loss(model, hidden, tokens, in_loss, d.n_decode)
    mse = mse_sum / in_loss[:n_den].sum().clamp(min=1)
    ce = ce_sum / in_loss[n_den:].sum().clamp(min=1)
    return (mse_sum + ce_sum) / in_loss.sum().clamp(min=1), mse, ce

# ----------------------------------------------------------------------------------------------
# Conditional sampling's math (README: Conditions); the loop and its steps live in sample.py.

def conditioned(denoise_fn, cond, x_cond, cfg_scale=1.0):
    """denoise_fn(z, t, x_sc) -> x_hat with the condition held clean in both inputs (README:
    Conditions). Classifier-free guidance (cfg_scale c != 1) adds a pass with the condition dropped
    (zeros, as in training): x_u + c (x_c - x_u), whose velocity is v_u + c (v_c - v_u) (same z)."""
    def denoise(z, t, x_sc):
        x_c = denoise_fn(hold_condition(z, cond, x_cond), t, hold_condition(x_sc, cond, x_cond))
        if cond is None or cfg_scale == 1:
            return x_c
        x_u = denoise_fn(hold_condition(z, cond, 0.0), t, hold_condition(x_sc, cond, 0.0))
        return x_u + cfg_scale * (x_c - x_u)
    return denoise

# ----------------------------------------------------------------------------------------------
# Cost model, for the MFU that train.py logs.

def flops_per_token(mc):
    """FLOPs per trained token of what a step does: the trunk's forward+backward (3x forward), a
    no-grad forward on the self-conditioned rows, the decode head's on the decode rows only."""
    C, L, d = mc.n_embd, mc.block_size, mc.embed_dim
    T = L + mc.n_mode_tokens + mc.n_time_tokens + mc.n_scale_tokens
    inner = int(2 / 3 * 4 * C)
    matmuls = 2 * (C * 3 * C + C * C + 3 * C * inner) * T / L
    attention = 4 * T * C * T / L
    inputs = 2 * (2 * d * d + d * mc.bottleneck_dim + mc.bottleneck_dim * C + C * d)
    trunk = mc.n_layer * (matmuls + attention) + inputs
    head = 2 * (C * d + d * (mc.decode_vocab or mc.vocab_size))
    share_sc = (1 - mc.decoder_prob) * mc.self_cond_prob
    return 3 * trunk + share_sc * trunk + mc.decoder_prob * 3 * head

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense, per GPU

def peak_flops(device):
    """bf16 dense peak FLOP/s of the GPU, looked up by name; None where unknown (no MFU then)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)

# ----------------------------------------------------------------------------------------------
# Optimizer (README: Training objective): Muon for the transformer's 2-D weight matrices, AdamW
# for everything else.

def configure_optimizers(model, optimizer="muon", lr=2e-3, weight_decay=0.0):
    """Optimizers to step together: Muon orthogonalises the updates of the blocks' 2-D matrices;
    the rest (embeddings, heads, norms, biases, learned tokens) goes to a fused AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        return [torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                  fused=params[0].is_cuda)]
    if optimizer != "muon":
        raise ValueError(f"unknown optimizer {optimizer!r}: use 'muon' or 'adamw'")
    hidden = {id(p) for n, p in model.blocks.named_parameters() if p.dim() == 2}
    muon = [p for p in params if id(p) in hidden]
    adam = [p for p in params if id(p) not in hidden]
    return [torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="original"),
            torch.optim.AdamW(adam, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                              fused=adam[0].is_cuda)]

def lr_at(it, tc):
    """The learning rate of step `it` (train.py's TrainConfig tc): a linear warm-up, then constant
    (the paper's) or a cosine decay to min_lr."""
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / tc.warmup_iters
    if tc.lr_schedule == "cosine":
        progress = min(1.0, (it - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
        return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))
    return tc.lr

# ----------------------------------------------------------------------------------------------
# The authors' released checkpoints (README: The paper's released models): their format, read
# into this file's ELF. What a checkpoint does not hold comes from their configs, by task name.

AUTHORS_TASKS = {   # task (in the repo or folder name): fields; sampler (the paper's), layout
    "owt": (dict(block_size=1024), dict(sampler="sde", sample_steps=32, sample_gamma=1.5)),
    "xsum": (dict(block_size=1088, decoder_noise_scale=1.0), dict(source_length=1024, sampler="ode",
             sample_steps=64, sample_scale=1.0, sample_cfg_scale=2.0)),
    "de-en": (dict(block_size=128, decoder_noise_scale=1.0), dict(source_length=64, sampler="ode",
              sample_steps=64, sample_scale=1.0, sample_cfg_scale=2.0)),
}
AUTHORS_NAMES = [   # (part of their tensor name, ours); their blocks' norms and attention match
    ("self_cond_proj.", "in_proj."), ("text_proj.proj1.", "bottleneck_down."),
    ("text_proj.proj2.", "bottleneck_up."), ("t_embedder.mlp_", "time_mlp."),
    ("self_cond_cfg_embedder.mlp_", "scale_mlp."), ("t_emb_tokens", "time_tokens"),
    ("self_cond_cfg_tokens", "scale_tokens"), (".mlp.w12.", ".mlp.gate_up."),
    (".mlp.w3.", ".mlp.down."), ("final_layer.norm_final.", "norm_out."),
    ("final_layer.linear.", "x_head."), ("proj_kernel", "decode_hidden.weight"),
    ("proj_bias", "decode_hidden.bias"), ("unembed_kernel", "decode_out.weight"),
    ("unembed_bias", "decode_out.bias"),
]

def authors_config(params, name=""):
    """(ELFConfig fields, sampler settings) of their state dict: sizes from the tensors' shapes,
    the rest from their published configs for the task found in `name` (else OpenWebText)."""
    width, head = params["t_emb_tokens"].shape[-1], params["blocks.0.attn.q_norm.weight"].numel()
    fields = dict(n_layer=1 + max(int(k.split(".")[1]) for k in params if k.startswith("blocks.")),
                  n_embd=width, n_head=width // head, embed_dim=params["proj_kernel"].shape[1],
                  bottleneck_dim=params["text_proj.proj1.weight"].shape[0],
                  vocab_size=params["unembed_bias"].numel(),
                  n_mode_tokens=params["mode_tokens"].shape[1],
                  n_time_tokens=params["t_emb_tokens"].shape[1],
                  n_scale_tokens=params["self_cond_cfg_tokens"].shape[1],
                  embedding="t5", latent_std=0.2, encoder="t5-small", tokenizer="t5-small")
    task = next((k for k in AUTHORS_TASKS if k in name.lower()), "owt")
    model_fields, sampler = AUTHORS_TASKS[task]
    if task == "owt" and fields["n_layer"] > 12:             # ELF-M and ELF-L: 64 steps, gamma 1
        sampler = dict(sampler, sample_steps=64, sample_gamma=1.0)
    return {**fields, **model_fields}, dict(sampler, task=task)

def from_authors(params, n_head):
    """Their state dict in this file's names and layouts: decode kernels transposed, tokens
    (1, n, C) -> (n, C), each head's q/k channels reordered from rotary pairs (2i, 2i+1) to ours."""
    state = {}
    for name, p in params.items():
        ours = next((name.replace(a, b) for a, b in AUTHORS_NAMES if a in name), name)
        p = p.t() if name.endswith("_kernel") else p[0] if name.endswith("tokens") else p
        if ".attn.q_norm." in name or ".attn.k_norm." in name or ".attn.qkv." in name:
            head = p.shape[0] // (3 * n_head) if ".qkv." in name else p.shape[0]
            order = torch.cat([torch.arange(0, head, 2), torch.arange(1, head, 2)])
            if ".qkv." in name:                              # rows: (q, k, v) x heads x head_dim
                rows = p.reshape(3, n_head, head, -1).clone()
                rows[:2] = rows[:2, :, order]
                p = rows.reshape(p.shape)
            else:
                p = p[order]
        state[ours] = p.contiguous()
    return state
