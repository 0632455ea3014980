"""Train ELF on token shards made by prepare_data.py (README: Training objective).

    python train.py                               # CPU quick start on data/tinyshakespeare
    python train.py --preset=elf-b-owt            # the paper's ELF-B recipe (one GPU)
    python train.py --max_iters=2000 --resume     # any TrainConfig or ELFConfig field; continue
    python train.py --bench --model=elf-b         # random tokens: tokens/s and MFU as JSON"""
import copy
import functools
import glob
import inspect
import json
import math
import os
import re
import signal
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

import elf
import sample
from elf import ELF, MODEL_SIZES, ELFConfig
from prepare_data import HEADER_BYTES, MAGIC, VERSION


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "tinyshakespeare"  # data/<dataset>/*_train_*.bin, *_val_*.bin
    data_dir: str = "data"
    out_dir: str = "out"              # ckpt.pt, and log.jsonl: a JSON line per metric
    model: str = "elf-cpu"            # a size of elf.MODEL_SIZES; ELFConfig fields override it
    init_from: str = ""               # fine-tune the authors' weights: a file, folder or Hub id
    # batch: batch_size sequences per optimizer step, in grad_accum micro-batches
    batch_size: int = 32
    grad_accum: int = 1
    # optimisation (README: Training objective): Muon + AdamW, warm-up, constant or cosine rate
    optimizer: str = "muon"
    lr: float = 2e-3
    lr_schedule: str = "constant"     # 'constant' (the paper's) or 'cosine' (decays to min_lr)
    min_lr: float = 2e-4
    warmup_iters: int = 50
    max_iters: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995          # the paper uses 0.9999 on runs of ~95K steps
    # logging, evaluation, checkpoints
    log_interval: int = 50
    eval_interval: int = 250
    eval_iters: int = 10
    num_eval_samples: int = 2
    seed: int = 1337
    resume: bool = False
    device: str = "auto"              # 'auto' picks cuda, then mps, then cpu
    dtype: str = "auto"               # 'auto' is bf16 autocast on CUDA, fp32 elsewhere
    compile: str = "auto"             # 'auto' compiles on CUDA only
    bench: bool = False               # time steps on random tokens: one JSON line, no checkpoint
    bench_warmup: int = 5
    bench_steps: int = 20
    # sampling: how this model's samples are drawn (sample.py's defaults for its checkpoints)
    sample_steps: int = 32            # integration steps from noise (t = 0) to data (t = 1)
    sampler: str = "sde"              # 'sde' (the paper's, churn sample_gamma) or 'ode' (Euler)
    sample_gamma: float = 1.5         # SDE churn
    sample_scale: float = 3.0         # self-conditioning guidance scale w
    sample_schedule: str = "logit_normal"  # time grid: 'logit_normal' or 'uniform'

PRESETS = {
    # The quick start: half its examples conditioned (prompts, blanks); no self-conditioning, noisy
    # times, a decaying rate: measured better at this size (README: Why the quick start is ...).
    "cpu": dict(cond_prefix_prob=0.25, cond_span_prob=0.25, self_cond_prob=0.0, t_mean=-1.9,
                lr_schedule="cosine", min_lr=1e-4, sampler="ode", sample_schedule="uniform"),
    # ELF-B on OpenWebText (README: Data at scale): batch 512 x 1024 as 8 micro-batches of 64,
    # Muon lr 2e-3, constant after a 0.5-epoch warm-up, 5 epochs (~95K steps), EMA 0.9999.
    "elf-b-owt": dict(dataset="openwebtext", model="elf-b", block_size=1024, batch_size=512,
                      grad_accum=8, lr=2e-3, warmup_iters=9500, max_iters=95000,
                      ema_decay=0.9999, eval_interval=2000, eval_iters=20, log_interval=10),
}
# --embedding=t5 (README: Embeddings): the paper's values, over a size's (elf-cpu's are for d = 64)
T5_SETTINGS = dict(latent_std=0.2, noise_scale=2.0, decoder_noise_scale=5.0)
DEFAULTS = {**asdict(TrainConfig()), **asdict(ELFConfig())}

class ConfigError(Exception):
    """A mistake in the input: main prints it as one line, `error: ...`, without a traceback."""

# What each field of TrainConfig and ELFConfig must be: by its type, unless RULES name it.
BY_TYPE = {int: (lambda v: v > 0, "an integer > 0"), str: (bool, "non-empty"),
           float: (lambda v: 0 <= v < math.inf, "finite and >= 0"),
           bool: (lambda v: v in (True, False), "true or false")}
CHOICES = dict(model=tuple(MODEL_SIZES), optimizer=("muon", "adamw"), prediction=("x", "v"),
               lr_schedule=("constant", "cosine"), dtype=("auto", "float32", "bfloat16"),
               compile=("auto", "true", "false"), embedding=("gaussian", "learned", "t5"),
               sampler=("sde", "ode"), sample_schedule=("logit_normal", "uniform"))
RULES = [
    ("warmup_iters bench_warmup", lambda v: v >= 0, "an integer >= 0"),
    ("seed embedding_seed", lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)"),
    ("vocab_size", lambda v: v >= 50257, "at least GPT-2's 50257 tokens"),
    ("lr grad_clip latent_std noise_scale t_eps", lambda v: 0 < v < math.inf, "finite and > 0"),
    ("t_mean decoder_lambda_mean", math.isfinite, "finite"),
    ("decoder_prob self_cond_prob cond_prefix_prob cond_span_prob cond_drop_prob ema_decay dropout",
     lambda v: 0 <= v <= 1, "a probability, in [0, 1]"),
    ("init_from", lambda v: True, "a checkpoint of the authors' or a Hub repo id"),
    ("device", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v), "auto, cpu, mps, cuda[:N]"),
    *((name, allowed.__contains__, "one of " + ", ".join(allowed))
      for name, allowed in CHOICES.items()),
]
RULE_OF = {name: BY_TYPE[type(value)] for name, value in DEFAULTS.items()}
RULE_OF |= {name: (test, what) for names, test, what in RULES for name in names.split()}
TRUTH = {"": True, "1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}

def check(tc, mc):
    for name, value in {**asdict(tc), **asdict(mc)}.items():
        test, what = RULE_OF[name]
        if not test(value) and not (name == "vocab_size" and mc.tokenizer != "gpt2"):
            raise ConfigError(f"--{name} must be {what}, got {value!r}")
    heads = ", ".join(str(h) for h in range(1, 65) if mc.n_embd % (2 * h) == 0) or "none"
    for bad, message in [
        (tc.batch_size % tc.grad_accum,
         f"batch_size {tc.batch_size} is not a multiple of grad_accum {tc.grad_accum}: change one"),
        (mc.n_embd % (2 * mc.n_head),                # rotary positions turn channel pairs
         f"n_embd {mc.n_embd} is not {mc.n_head} heads of even size: --n_head can be {heads}"),
        (mc.cond_prefix_prob + mc.cond_span_prob > 1,
         "cond_prefix_prob + cond_span_prob must be at most 1: lower one of them"),
        (mc.guidance_min > mc.guidance_max, "guidance_min must be <= guidance_max"),
        (tc.lr_schedule == "cosine" and tc.min_lr > tc.lr, "min_lr must be <= lr to decay to it"),
    ]:
        if bad:
            raise ConfigError(message)

def parse_args(argv):
    """--key=value (or --flag) overrides of TrainConfig and ELFConfig, after --preset, --model."""
    if bad := [arg for arg in argv if not arg.startswith("--")]:
        raise ConfigError(f"unexpected argument {bad[0]!r}: use --key=value")
    overrides = dict(arg[2:].partition("=")[::2] for arg in argv)   # {key: value}
    preset = overrides.pop("preset", None if "init_from" in overrides else "cpu")
    if preset not in (None, *PRESETS):
        raise ConfigError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    given = {}
    for key, text in overrides.items():
        if key not in DEFAULTS:
            raise ConfigError(f"unknown config key --{key} (python train.py --help lists them)")
        kind = type(DEFAULTS[key])                              # a string as the default's type
        try:
            given[key] = TRUTH[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            expected = "true or false" if kind is bool else kind.__name__
            raise ConfigError(f"--{key} expects {expected}, got {text!r}") from None
    settings = dict(PRESETS.get(preset, {}))
    if given.get("init_from"):    # the pretrained model's config and sampler, not a preset's
        net, sampler = pretrained(given["init_from"])
        fields = asdict(net.cfg)
        if clash := [k for k in ARCHITECTURE if k in given and given[k] != fields[k]]:
            raise ConfigError(f"--{clash[0]}={given[clash[0]]} does not fit --init_from's weights "
                              f"({clash[0]}={fields[clash[0]]}): drop it")
        settings |= fields | sampler
    settings |= given
    tc = TrainConfig(**{k: settings[k] for k in asdict(TrainConfig()) if k in settings})
    t5 = T5_SETTINGS if settings.get("embedding") == "t5" else {}
    model = {**MODEL_SIZES.get(tc.model, {}), **t5, **settings}  # an unknown --model: check says
    mc = ELFConfig(**{k: model[k] for k in asdict(ELFConfig()) if k in model})
    check(tc, mc)
    return tc, mc

ARCHITECTURE = ("n_layer n_head n_embd embed_dim bottleneck_dim vocab_size n_mode_tokens "
                "n_time_tokens n_scale_tokens embedding").split()  # what --init_from's weights fix

@functools.cache
def pretrained(source):
    """(model, sampler settings) of the authors' checkpoint, read once: the EMA weights."""
    return sample.load_checkpoint(source)

def usage():
    """--help: each field, its default and the comment beside it in the source; then the presets."""
    text = [__doc__.strip(), "", "Fields, as --key=default (ELFConfig's are the paper's ELF-B):"]
    for line in (inspect.getsource(TrainConfig) + inspect.getsource(ELFConfig)).splitlines():
        code, _, comment = line.partition("#")                 # no default holds a '#'
        name = code.split(":")[0].strip()
        if name in DEFAULTS:
            text.append(f"  --{name}={DEFAULTS[name]}".ljust(29) + " " + comment.strip())
        elif comment and not code.strip():                      # a section's heading
            text.append("#" + comment)
    text.append("# sizes and presets (--preset=cpu unless given), set before the --key=value given")
    for name, values in {**MODEL_SIZES, **PRESETS}.items():
        words = [f"--{'model' if name in MODEL_SIZES else 'preset'}={name}:"]
        words += [f"{k}={v}" for k, v in values.items()]
        text.append(textwrap.fill(" ".join(words), 100, subsequent_indent="    "))
    return "\n".join(line.rstrip() for line in text)

# Data: block_size windows of memmapped llm.c shards; paired data (--pairs): whole examples.

def open_shards(tc, mc, split):
    """([(path, tokens)], meta): the *_{split}_*.bin shards, checked before training starts."""
    folder = os.path.join(tc.data_dir, tc.dataset)
    meta_path = os.path.join(folder, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}  # none: GPT-2 tokens
    paired = meta.get("pairs", False)
    if paired and (n := meta["block_size"]) != mc.block_size:
        raise ConfigError(f"{folder} has pairs of {n} tokens: pass --block_size={n}")
    shards = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), f"*_{split}_*.bin"))):
        head = np.fromfile(path, dtype="<i4", count=256)    # magic, version, token count, zeros
        if len(head) < 256 or head[0] != MAGIC or head[1] != VERSION:
            raise ConfigError(f"{path}: not a token shard (no llm.c header); run prepare_data.py")
        if os.path.getsize(path) != HEADER_BYTES + 2 * int(head[2]):
            raise ConfigError(f"{path}: truncated (shorter than its header); rerun prepare_data.py")
        shards.append((path, int(head[2])))
    if not shards:
        raise ConfigError(f"no {split} shards (*_{split}_*.bin) in {folder}: run `python prepare_"
                          "data.py` (again if it has train.bin) or pass --dataset/--data_dir")
    if max(n for _, n in shards) < mc.block_size + (not paired or "source_length" in meta):
        raise ConfigError(f"{folder}: no {split} shard longer than block_size; lower --block_size")
    return shards, meta

def get_batch(shards, batch, block_size, generator, vocab_size, paired=False):
    """Windows drawn uniformly among all shards' windows: shards in proportion to their sizes."""
    counts = np.array([n // block_size if paired else max(n - block_size, 0) for _, n in shards])
    ends = np.cumsum(counts)
    picks = torch.randint(int(ends[-1]), (batch,), generator=generator).numpy()
    which = np.searchsorted(ends, picks, side="right")
    starts = (picks - ends[which] + counts[which]) * (block_size if paired else 1)
    # A fresh memmap per batch keeps memory flat over long runs (memmaps cache the pages they read).
    data = {i: np.memmap(shards[i][0], np.uint16, "r", HEADER_BYTES) for i in set(which)}
    tokens = np.stack([data[i][s:s + block_size] for i, s in zip(which, starts)])
    if tokens.max() >= vocab_size:                   # damaged data, or another tokenizer's
        raise ConfigError(f"{shards[which[tokens.max(1).argmax()]][0]}: token id {tokens.max()} "
                          f">= vocab_size {vocab_size}; re-run prepare_data.py")
    return torch.from_numpy(tokens.astype(np.int64))

def condition_masks(tokens, meta):
    """(tokens, cond, valid) of paired examples (README: Conditions). The source runs to the first
    end-of-text; in the authors' layout its length leads, and padding starts at the next one."""
    eot = tokens == meta["eot_token"]
    if "source_length" not in meta:
        return tokens, eot.cumsum(1) <= eot, None
    lengths, tokens, eot = tokens[:, :1], tokens[:, 1:], eot[:, 1:]
    cond = torch.arange(tokens.size(1), device=tokens.device) < lengths
    return tokens, cond, (eot & ~cond).cumsum(1) == 0

def keep_log_until(path, last_iter, say):
    """log.jsonl's rows to the checkpoint's iteration: a killed run logged past it, maybe torn."""
    lines = open(path, errors="replace").readlines() if os.path.exists(path) else []
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
            kept += [row] if row["iter"] <= last_iter else []
        except (ValueError, KeyError, TypeError):              # a torn or malformed line: dropped
            pass
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(path + ".tmp", path)                         # like checkpoints: whole or not at all
    if dropped := len(lines) - len(kept):
        say(f"{path}: kept {len(kept)} rows, dropped {dropped} torn or past iteration {last_iter}")

def init_distributed(tc):
    """(rank, world_size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; NCCL on GPUs."""
    if "RANK" not in os.environ:
        have = dict(cuda=torch.cuda.device_count(), mps=torch.backends.mps.is_available(), cpu=1)
        auto = next(d for d in have if have[d])
        device = torch.device(auto if tc.device == "auto" else tc.device)
        if have[device.type] <= (device.index or 0):
            raise ConfigError(f"no device {tc.device} here: use --device=auto or --device=cpu")
        return 0, 1, device
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), device

class Trainer:
    """The model, its EMA, the optimizers; `step` runs this process's share of a step's batches."""

    def __init__(self, tc, mc, device, rank=0, world=1, meta=None):
        if tc.grad_accum % world:
            raise ConfigError(f"grad_accum {tc.grad_accum} must be a multiple of {world} processes")
        self.tc, self.mc, self.device, self.rank, self.world = tc, mc, device, rank, world
        self.accum = tc.grad_accum // world                     # micro-batches per process
        self.micro = tc.batch_size // tc.grad_accum             # sequences per micro-batch
        torch.manual_seed(tc.seed)                              # the same weights on every rank
        self.model = ELF(mc)
        if tc.init_from:                          # fine-tuning (README: Sample from ... ELF-B)
            self.model.load_state_dict(pretrained(tc.init_from)[0].state_dict())
        self.model.to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizers = elf.configure_optimizers(self.model, tc.optimizer, tc.lr, tc.weight_decay)
        use_bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        compile_ = tc.compile == "true" or (tc.compile == "auto" and device.type == "cuda")
        self.forward_model = torch.compile(self.model) if compile_ else self.model
        self.params, self.ema_params = list(self.model.parameters()), list(self.ema.parameters())
        # Zeroed, never freed: a step without decode rows gives their head a zero gradient.
        for p in self.params:
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        self.iter, self.meta = 0, meta or {}                    # the data's meta.json

    def step(self, shards):
        """One step on shards (None: random tokens): (loss, mse, ce) and the gradient norm, as
        device tensors; nothing here waits for the GPU."""
        tc = self.tc
        for group in [group for opt in self.optimizers for group in opt.param_groups]:
            group["lr"] = elf.lr_at(self.iter, tc)
        totals = torch.zeros(3, device=self.device)
        for k in range(self.accum):
            index = self.rank * self.accum + k                  # of all the step's micro-batches
            parts = self.micro_batch_loss(self.forward_model, shards, tc.seed, self.iter, index)
            (parts[0] / tc.grad_accum).backward()               # the mean over all micro-batches
            totals += torch.stack(parts).detach() / tc.grad_accum
        if self.world > 1:                                      # once a step, after the last one
            for tensor in [totals] + [p.grad for p in self.params if p.grad is not None]:
                dist.all_reduce(tensor)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=False)
        # EMA with a warm-up (short runs would otherwise average in the random initialisation).
        decay = min(tc.ema_decay, (1 + self.iter) / (10 + self.iter))
        torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        self.iter += 1
        return totals, grad_norm

    def micro_batch_loss(self, model, shards, seed, it, index):
        """(loss, mse, ce) of one micro-batch, its data and noise drawn from (seed, it, index)."""
        host_gen, gen = elf.micro_batch_generators(seed, it, index, self.device)
        paired, n = self.meta.get("pairs", False), self.mc.vocab_size  # prepare_data.py --pairs
        size = (self.micro, self.mc.block_size + ("source_length" in self.meta))  # authors': +1
        tokens = (get_batch(shards, *size, host_gen, n, paired) if shards else
                  torch.randint(0, n, size, generator=host_gen))                # --bench
        tokens = elf.to_device(tokens, self.device)
        tokens, *masks = condition_masks(tokens, self.meta) if paired else (tokens, None, None)
        draws = elf.draw_training_noise(self.mc, *tokens.shape, host_gen, gen, self.device, *masks)
        with self.autocast:
            return elf.elf_loss(model, tokens, draws)

    @torch.no_grad()
    def evaluate(self, shards):
        """The objective on val with the EMA weights and fixed randomness (comparable over time)."""
        losses = [self.micro_batch_loss(self.ema, shards, 0, 0, i)[0]
                  for i in range(self.tc.eval_iters)]
        return torch.stack(losses).mean().item()               # one host sync for the evaluation

    def save(self, path):
        # No generator states: the randomness of every step follows from (seed, iteration).
        state = dict(model=self.model.state_dict(), ema=self.ema.state_dict(), iter=self.iter,
                     optimizers=[opt.state_dict() for opt in self.optimizers], data=self.meta,
                     train_config=asdict(self.tc), model_config=asdict(self.mc))
        torch.save(state, path + ".tmp")        # then renamed: a crash mid-write keeps the last one
        os.replace(path + ".tmp", path)

    def load(self, path):
        if not os.path.exists(path):
            raise ConfigError(f"no checkpoint at {path}: train first, or drop --resume")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no GPU memory spike
        except Exception as e:
            raise ConfigError(f"cannot read checkpoint {path} ({type(e).__name__}); "
                              "it is truncated or corrupt") from None
        saved, wanted = {**asdict(ELFConfig()), **ckpt["model_config"]}, asdict(self.mc)
        if diff := [k for k in wanted if saved.get(k) != wanted[k]]:
            raise ConfigError("checkpoint model config differs in " + ", ".join(
                f"{k} (checkpoint {saved.get(k)!r}, requested {wanted[k]!r})" for k in diff))
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        for opt, state in zip(self.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        self.iter = ckpt["iter"]

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        return print(usage())
    tc, mc = parse_args(argv)
    rank, world, device = init_distributed(tc)
    master = rank == 0 and not tc.bench  # rank 0 alone logs, evaluates and saves (--bench: none)
    log = print if master else (lambda *a, **k: None)
    if tc.bench:            # the loop below on random tokens, timing the steps after bench_warmup
        tc = replace(tc, max_iters=tc.bench_warmup + tc.bench_steps, resume=False)
        train_shards, val_shards, meta = None, None, {}
    else:
        train_shards, meta = open_shards(tc, mc, "train")
        val_shards, _ = open_shards(tc, mc, "val")
    mc = elf.config_for_data(mc, meta)
    trainer = Trainer(tc, mc, device, rank, world, meta)
    ckpt_path, log_path = os.path.join(tc.out_dir, "ckpt.pt"), os.path.join(tc.out_dir, "log.jsonl")
    if tc.resume:
        trainer.load(ckpt_path)
        log(f"resumed from {ckpt_path} at iteration {trainer.iter}")
        if trainer.iter >= tc.max_iters:
            raise ConfigError(f"{ckpt_path} is at iteration {trainer.iter}, not before --max_iters="
                              f"{tc.max_iters}: raise --max_iters to train on")
    elif os.path.exists(ckpt_path):
        log(f"note: {ckpt_path} will be replaced by this new run's (--resume continues it instead)")
    changed = [f"{k}={v}" for k, v in {**asdict(tc), **asdict(mc)}.items() if v != DEFAULTS[k]]
    log(textwrap.fill("config (what differs from --help's defaults): " + " ".join(changed), 100))
    log(f"model {tc.init_from or tc.model}: {sum(p.numel() for p in trainer.params) / 1e6:.2f}M "
        f"parameters on {device}; global batch {tc.batch_size} = {trainer.micro} x "
        f"{trainer.accum} accumulation x {world} processes, of {mc.block_size} tokens")
    try:
        if master:
            os.makedirs(tc.out_dir, exist_ok=True)
        if tc.resume and master:
            keep_log_until(log_path, trainer.iter, log)
        log_file = open(log_path if master else os.devnull, "a" if tc.resume else "w", buffering=1)
    except OSError:
        raise ConfigError(f"out_dir {tc.out_dir} is not writable: pass another --out_dir") from None
    stop = []                        # Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: stop.append(True)) for s in signals}
    peak, fpt, gpu = elf.peak_flops(device), elf.flops_per_token(mc), device.type == "cuda"
    t0, it0 = time.perf_counter(), trainer.iter
    try:
        while trainer.iter < tc.max_iters:
            totals, grad_norm = trainer.step(train_shards)
            it = trainer.iter
            logging = it % tc.log_interval == 0 or it == tc.max_iters
            if tc.bench:                                # the timer restarts after the warm-up
                logging = it in (tc.bench_warmup, tc.max_iters)
            stopping = bool(stop) and world == 1
            if world > 1 and logging:                   # the processes agree on when to stop
                flag = torch.tensor([float(bool(stop))], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            saving = (it % tc.eval_interval == 0 or it == tc.max_iters or stopping) and not tc.bench
            if logging or saving:                       # a step's only host sync
                (loss, mse, ce), grad = totals.tolist(), grad_norm.item()
                if not math.isfinite(loss + grad):      # before any checkpoint is written over
                    raise ConfigError(f"non-finite loss or gradient at iteration {it}: stopped, "
                                      "the last good checkpoint is kept (try a lower --lr)")
            if logging:
                tok_s = (it - it0) * tc.batch_size * mc.block_size / (time.perf_counter() - t0)
                mfu = f" mfu {tok_s * fpt / (peak * world):.1%}" if peak else ""
                lr = elf.lr_at(it - 1, tc)                  # the rate the step just taken used
                log(f"iter {it}: loss {loss:.4f} (mse {mse:.4f}, ce {ce:.4f}) "
                    f"grad {grad:.2f} lr {lr:.2e} {tok_s:,.0f} tok/s{mfu}")
                row = dict(iter=it, loss=loss, mse=mse, ce=ce, lr=lr, tok_s=tok_s)
                print(json.dumps(row), file=log_file)
                t0, it0 = time.perf_counter(), it
            if tc.bench and gpu and it == tc.bench_warmup:
                torch.cuda.reset_peak_memory_stats(device)  # the timed steps' peak
            if tc.bench and it == tc.max_iters:         # one JSON line: the timed steps' speed
                memory = round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if gpu else None
                mfu = round(tok_s * fpt / (peak * world), 4) if peak else None
                return print(json.dumps(dict(
                    bench="train", model=tc.model, block_size=mc.block_size, batch=tc.batch_size,
                    gpu=torch.cuda.get_device_name(device) if gpu else None, peak_mem_gb=memory,
                    step_s=round(tc.batch_size * mc.block_size / tok_s, 4),
                    tokens_per_s=round(tok_s), mfu=mfu)))
            if saving:
                if master and not stopping:
                    val = trainer.evaluate(val_shards)
                    log(f"iter {it}: val {val:.4f}")
                    print(json.dumps(dict(iter=it, val=val)), file=log_file)
                    with trainer.autocast:              # samples from the EMA weights
                        settings = sample.settings_from(asdict(tc))
                        sample.show(trainer.ema, tc.num_eval_samples, settings, tc.seed)
                if master:
                    trainer.save(ckpt_path)
                t0, it0 = time.perf_counter(), it
            if stopping:
                log(f"interrupted: checkpoint of iteration {it} written to {ckpt_path}; "
                    "continue with the same command plus --resume")
                break
    finally:
        log_file.close()
        for s, h in previous.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()

if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:                                   # Ctrl-C before the training loop
        sys.exit("interrupted before the first step; nothing was saved")
