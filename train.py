"""
Train ELF on tokenized shards (made by prepare_data.py).

    python train.py                                   # CPU quick start on data/tinyshakespeare
    python train.py --preset=elf-b-owt                # the paper's ELF-B recipe (one GPU)
    python train.py --max_iters=2000 --lr=1e-3        # any field of TrainConfig or ELFConfig
    python train.py --resume                          # continue from out_dir/ckpt.pt
    python train.py --bench --model=elf-b             # random tokens, prints tokens/s and MFU as JSON
"""
import copy
import dataclasses
import difflib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch

from elf import ELF, ELFConfig, MODEL_SIZES, configure_optimizers, draw_training_noise, elf_loss


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "tinyshakespeare"  # data/<dataset>/{train,val}.bin
    data_dir: str = "data"
    out_dir: str = "out"
    model: str = "elf-cpu"            # a named size of elf.MODEL_SIZES; ELFConfig fields override it
    # batch: batch_size sequences per optimizer step, in grad_accum micro-batches
    batch_size: int = 32
    grad_accum: int = 1
    # optimisation (§4): Muon + AdamW, linear warm-up then constant (or cosine) learning rate
    optimizer: str = "muon"
    lr: float = 2e-3
    lr_schedule: str = "constant"     # 'constant' (the paper's) or 'cosine' (decays to min_lr)
    min_lr: float = 2e-4
    warmup_iters: int = 50
    max_iters: int = 600
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995          # the paper uses 0.9999 on runs of ~95K steps
    # logging, evaluation, checkpoints
    log_interval: int = 25
    eval_interval: int = 200
    eval_iters: int = 10
    sample_steps: int = 32            # sampling steps for the samples shown at each evaluation
    num_eval_samples: int = 2
    seed: int = 1337
    resume: bool = False
    # system
    device: str = "auto"              # 'auto' picks cuda, then mps, then cpu
    dtype: str = "auto"               # 'auto' is bf16 autocast on CUDA, fp32 elsewhere
    compile: str = "auto"             # 'auto' compiles on CUDA only
    # benchmark mode: random tokens, warm-up then timed steps, one JSON line, no checkpoints
    bench: bool = False
    bench_warmup: int = 5
    bench_steps: int = 20


PRESETS = {
    "cpu": {},  # the defaults above: the CPU quick start
    # ELF-B on OpenWebText (§4): batch 512 x 1024 as 8 micro-batches of 64, Muon lr 2e-3, constant
    # after a 0.5-epoch warm-up, 5 epochs (~95K steps), EMA 0.9999.
    "elf-b-owt": dict(dataset="openwebtext", model="elf-b", block_size=1024, batch_size=512, grad_accum=8,
                      lr=2e-3, warmup_iters=9500, max_iters=95000, ema_decay=0.9999, eval_interval=2000,
                      eval_iters=20, log_interval=10),
}


class ConfigError(Exception):
    pass


def parse_value(text, default, key):
    """Convert a command-line string to the type of the field's default, or say what was expected."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", ""):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--{key} expects true or false, got {text!r}")
    try:
        return type(default)(text)
    except ValueError:
        raise ConfigError(f"--{key} expects {type(default).__name__}, got {text!r}") from None


def parse_args(argv):
    """--key=value (or --flag) overrides for TrainConfig and ELFConfig, after --preset and --model."""
    pairs = []
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value")
        key, _, value = arg[2:].partition("=")
        pairs.append((key, value))
    overrides = dict(pairs)
    preset = overrides.pop("preset", "cpu")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    train_fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name: f.default for f in dataclasses.fields(ELFConfig)}
    settings = dict(PRESETS[preset])
    for key, value in overrides.items():
        if key not in train_fields and key not in model_fields:
            close = difflib.get_close_matches(key, [*train_fields, *model_fields, "preset"], n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key --{key}{hint}")
        settings[key] = parse_value(value, train_fields.get(key, model_fields.get(key)), key)
    tc = TrainConfig(**{k: v for k, v in settings.items() if k in train_fields})
    if tc.model not in MODEL_SIZES:
        raise ConfigError(f"unknown model {tc.model!r}: choose from {', '.join(MODEL_SIZES)}")
    model_settings = {**MODEL_SIZES[tc.model], **{k: v for k, v in settings.items() if k in model_fields}}
    mc = ELFConfig(**model_settings)
    if tc.batch_size % tc.grad_accum:
        raise ConfigError(f"batch_size {tc.batch_size} is not a multiple of grad_accum {tc.grad_accum}")
    return tc, mc


# ----------------------------------------------------------------------------------------------
# Data: random windows of block_size tokens from the memmapped uint16 shards.

def open_shard(tc, split):
    path = os.path.join(tc.data_dir, tc.dataset, f"{split}.bin")
    if not os.path.exists(path):
        raise ConfigError(f"missing data file {path}: run `python prepare_data.py` first "
                          f"(or pass --dataset/--data_dir)")
    return path


def get_batch(path, batch, block_size, generator):
    # A fresh memmap per batch keeps memory flat over long runs (numpy's memmap caches pages otherwise).
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if len(data) <= block_size:
        raise ConfigError(f"{path} has {len(data)} tokens, fewer than block_size+1; lower --block_size")
    starts = torch.randint(len(data) - block_size, (batch,), generator=generator).tolist()
    return torch.from_numpy(np.stack([data[s:s + block_size].astype(np.int64) for s in starts]))


# ----------------------------------------------------------------------------------------------
# Throughput: FLOPs per trained token and model FLOPs utilisation (MFU).

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense, per GPU


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


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file and renamed, so a crash never leaves a half-written one.

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}: train first, or drop --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # to CPU: no GPU memory spike
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path} ({type(e).__name__}); it is truncated or corrupt")


def check_compatible(saved, requested):
    diff = [k for k in requested if saved.get(k) != requested[k]]
    if diff:
        raise ConfigError("checkpoint model config differs in " + ", ".join(
            f"{k} (checkpoint {saved.get(k)!r}, requested {requested[k]!r})" for k in diff))


# ----------------------------------------------------------------------------------------------

def lr_at(it, tc):
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / tc.warmup_iters
    if tc.lr_schedule == "cosine":
        progress = (it - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters)
        return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    return tc.lr


def pick_device(tc):
    if tc.device != "auto":
        return torch.device(tc.device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


class Trainer:
    """Holds the model, its EMA, the optimizers and the random generators; `step` is one optimizer step."""

    def __init__(self, tc, mc, device):
        self.tc, self.mc, self.device = tc, mc, device
        torch.manual_seed(tc.seed)
        self.model = ELF(mc).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizers = configure_optimizers(self.model, tc.optimizer, tc.lr, tc.weight_decay)
        use_bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        compile_ = tc.compile == "true" or (tc.compile == "auto" and device.type == "cuda")
        self.forward_model = torch.compile(self.model) if compile_ else self.model
        # Separate streams of randomness: data windows, per-step draws (host), noise (device).
        self.data_gen = torch.Generator().manual_seed(tc.seed)
        self.draw_gen = torch.Generator().manual_seed(tc.seed + 1)
        self.noise_gen = torch.Generator(device=device).manual_seed(tc.seed + 2)
        self.iter = 0
        self.ema_params = list(self.ema.parameters())
        self.params = list(self.model.parameters())

    def step(self, batches):
        """One optimizer step over a list of micro-batches; returns device tensors (no host sync)."""
        tc = self.tc
        lr = lr_at(self.iter, tc)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        totals = torch.zeros(3, device=self.device)
        for tokens in batches:
            tokens = tokens.to(self.device, non_blocking=True)
            draws = draw_training_noise(self.mc, *tokens.shape, self.draw_gen, self.noise_gen, self.device)
            with self.autocast:
                loss, mse, ce = elf_loss(self.forward_model, tokens, draws)
            (loss / len(batches)).backward()
            totals += torch.stack([loss.detach(), mse.detach(), ce.detach()]) / len(batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        # EMA with a warm-up (short runs would otherwise average in the random initialisation).
        decay = min(tc.ema_decay, (1 + self.iter) / (10 + self.iter))
        torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        self.iter += 1
        return totals, grad_norm

    @torch.no_grad()
    def evaluate(self, path):
        """The training objective on val with the EMA weights and fixed randomness (comparable over time)."""
        data_gen = torch.Generator().manual_seed(0)
        draw_gen = torch.Generator().manual_seed(1)
        noise_gen = torch.Generator(device=self.device).manual_seed(2)
        micro = self.tc.batch_size // self.tc.grad_accum
        total = 0.0
        for _ in range(self.tc.eval_iters):
            tokens = get_batch(path, micro, self.mc.block_size, data_gen).to(self.device)
            draws = draw_training_noise(self.mc, *tokens.shape, draw_gen, noise_gen, self.device)
            with self.autocast:
                total += elf_loss(self.ema, tokens, draws)[0].item()
        return total / self.tc.eval_iters

    def state_dict(self):
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "train_config": asdict(self.tc), "model_config": asdict(self.mc), "iter": self.iter,
                "rng": {"data": self.data_gen.get_state(), "draw": self.draw_gen.get_state(),
                        "noise": self.noise_gen.get_state()}}

    def load_state_dict(self, ckpt):
        check_compatible(ckpt["model_config"], asdict(self.mc))
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        for opt, state in zip(self.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        self.iter = ckpt["iter"]
        self.data_gen.set_state(ckpt["rng"]["data"])
        self.draw_gen.set_state(ckpt["rng"]["draw"])
        self.noise_gen.set_state(ckpt["rng"]["noise"])


def show_samples(trainer, tc):
    """A couple of short samples from the EMA model, decoded to text (sample.py has the sampler loop)."""
    import sample
    gen = torch.Generator(device=trainer.device).manual_seed(tc.seed)
    with trainer.autocast:
        tokens = sample.generate(trainer.ema, tc.num_eval_samples, trainer.mc.block_size, steps=tc.sample_steps,
                                 generator=gen)
    for text in sample.decode_texts(tokens):
        print("  | " + text.replace("\n", "\n  | "))


def bench(trainer, tc, mc, device):
    """Random tokens at the configured shape: warm-up steps, then timed steps; one JSON line."""
    micro = tc.batch_size // tc.grad_accum
    make = lambda: [torch.randint(0, 50257, (micro, mc.block_size)) for _ in range(tc.grad_accum)]  # noqa: E731
    for _ in range(tc.bench_warmup):
        trainer.step(make())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches = [make() for _ in range(tc.bench_steps)]
    t0 = time.perf_counter()
    for b in batches:
        trainer.step(b)
    sync()
    step_s = (time.perf_counter() - t0) / tc.bench_steps
    tokens_per_s = tc.batch_size * mc.block_size / step_s
    peak = peak_flops(device)
    print(json.dumps({"bench": "train", "model": tc.model, "device": str(device),
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                      "batch": tc.batch_size, "block_size": mc.block_size, "step_s": round(step_s, 4),
                      "tokens_per_s": round(tokens_per_s),
                      "mfu": round(tokens_per_s * flops_per_token(mc) / peak, 4) if peak else None,
                      "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None}))


def main(argv=None):
    tc, mc = parse_args(sys.argv[1:] if argv is None else argv)
    device = pick_device(tc)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    trainer = Trainer(tc, mc, device)
    if tc.bench:
        return bench(trainer, tc, mc, device)
    train_path, val_path = open_shard(tc, "train"), open_shard(tc, "val")
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    try:
        os.makedirs(tc.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=tc.out_dir).close()
    except OSError:
        raise ConfigError(f"out_dir {tc.out_dir!r} is not writable: pass --out_dir=somewhere/else") from None
    if tc.resume:
        trainer.load_state_dict(load_checkpoint(ckpt_path))
        print(f"resumed from {ckpt_path} at iteration {trainer.iter}")
    micro = tc.batch_size // tc.grad_accum
    print(f"model {tc.model}: {trainer.model.num_params() / 1e6:.2f}M parameters; device {device}; "
          f"batch {tc.batch_size} = {micro} x {tc.grad_accum} accumulation x {mc.block_size} tokens")
    peak, fpt = peak_flops(device), flops_per_token(mc)
    t0, tokens_seen = time.perf_counter(), 0
    while trainer.iter < tc.max_iters:
        batches = [get_batch(train_path, micro, mc.block_size, trainer.data_gen) for _ in range(tc.grad_accum)]
        totals, grad_norm = trainer.step(batches)
        tokens_seen += tc.batch_size * mc.block_size
        it = trainer.iter
        if it % tc.log_interval == 0 or it == tc.max_iters:
            loss, mse, ce = totals.tolist()  # the only host sync of the step, at log intervals
            if not math.isfinite(loss):
                raise ConfigError(f"non-finite loss at iteration {it}; the last good checkpoint is kept")
            dt = time.perf_counter() - t0
            tok_s = tokens_seen / dt
            mfu = f" mfu {tok_s * fpt / peak:.1%}" if peak else ""
            print(f"iter {it}: loss {loss:.4f} (mse {mse:.4f}, ce {ce:.4f}) grad {grad_norm.item():.2f} "
                  f"lr {lr_at(it - 1, tc):.2e} {tok_s:,.0f} tok/s{mfu}")
            t0, tokens_seen = time.perf_counter(), 0
        if it % tc.eval_interval == 0 or it == tc.max_iters:
            print(f"iter {it}: val {trainer.evaluate(val_path):.4f}")
            show_samples(trainer, tc)
            save_checkpoint(ckpt_path, trainer.state_dict())
            t0, tokens_seen = time.perf_counter(), 0


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"error: {e}")
