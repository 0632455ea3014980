"""Train ELF on token shards made by prepare_data.py (README: Training objective).

    python train.py                               # CPU quick start on data/tinyshakespeare
    python train.py --preset=elf-b-owt --resume   # the paper's ELF-B recipe (one GPU), resumed
    python train.py --bench --model=elf-b         # random tokens: tokens/s and MFU as JSON"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch loads, or before the first step
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: sys.exit("interrupted before the first step; nothing saved"))

import copy
import functools
import glob
import inspect
import json
import math
import os
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
    # data, output, batch
    dataset: str = "tinyshakespeare"  # data/<dataset>/*_train_*.bin, *_val_*.bin
    data_dir: str = "data"
    out_dir: str = "out"              # ckpt.pt, and log.jsonl: a JSON line per metric
    model: str = "elf-cpu"            # elf-cpu, elf-b, elf-m, elf-l (elf.MODEL_SIZES), then fields
    init_from: str = ""               # fine-tune the authors' weights: a file, folder or Hub id
    batch_size: int = 32              # sequences per optimizer step, in grad_accum micro-batches
    grad_accum: int = 1
    # optimisation (README: Training objective): Muon + AdamW, warm-up, constant or cosine rate
    optimizer: str = "muon"
    lr: float = 2e-3
    muon_lr: float = 0.0              # Muon's peak rate (blocks' matrices), same schedule; 0: lr
    lr_schedule: str = "constant"     # 'constant' (the paper's) or 'cosine' (decays to min_lr)
    min_lr: float = 1e-4
    warmup_iters: int = 50
    max_iters: int = 2400
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
    dtype: str = "auto"               # 'auto': bf16 autocast on CUDA and CPUs with bf16 units
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
    # The quick start: choices measured better at this size (README: A. The quick start's recipe)
    "cpu": dict(cond_prefix_prob=0.25, cond_span_prob=0.25, self_cond_prob=0.0, t_mean=-1.9,
                muon_lr=1e-2, lr_schedule="cosine", sampler="ode", sample_schedule="uniform",
                sample_steps=128),
    # The paper's ELF-B on OpenWebText: ~5 epochs of 512 x 1024 tokens (README: On a GPU)
    "elf-b-owt": dict(dataset="openwebtext", model="elf-b", block_size=1024, batch_size=512,
                      grad_accum=8, lr=2e-3, warmup_iters=9500, max_iters=95000,
                      ema_decay=0.9999, eval_interval=2000, eval_iters=20, log_interval=10),
}
T5_SETTINGS = dict(latent_std=0.2, noise_scale=2.0, decoder_noise_scale=5.0)  # the paper's, for t5
DEFAULTS = {**asdict(TrainConfig()), **asdict(ELFConfig())}

class RunError(Exception):
    """Why the run cannot start or go on, printed by main as one line `error: ...`, no traceback."""

# What each field of TrainConfig and ELFConfig must be: by its type, unless RULES name it.
BY_TYPE = {int: (lambda v: v > 0, "an integer > 0"), str: (bool, "non-empty"),
           float: (lambda v: 0 <= v < math.inf, "finite and >= 0"),
           bool: (lambda v: v in (True, False), "true or false")}
CHOICES = dict(model=tuple(MODEL_SIZES), optimizer=("muon", "adamw"), prediction=("x", "v"),
               lr_schedule=("constant", "cosine"), dtype=("auto", "float32", "bfloat16"),
               compile=("auto", "true", "false"), embedding=("gaussian", "learned", "t5"),
               sampler=("sde", "ode"), sample_schedule=("logit_normal", "uniform"))
RULES = [
    ("warmup_iters bench_warmup decode_vocab", lambda v: v >= 0, "an integer >= 0"),
    ("seed embedding_seed", lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)"),
    ("vocab_size", lambda v: v >= 50257, "at least GPT-2's 50257 tokens"),
    ("lr grad_clip latent_std noise_scale t_eps", lambda v: 0 < v < math.inf, "finite and > 0"),
    ("t_mean decoder_lambda_mean", math.isfinite, "finite"),
    ("decoder_prob self_cond_prob cond_prefix_prob cond_span_prob cond_drop_prob ema_decay dropout",
     lambda v: 0 <= v <= 1, "a probability, in [0, 1]"),
    ("init_from", lambda v: True, "a checkpoint of the authors' or a Hub repo id"),
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
            raise RunError(f"--{name} must be {what}, got {value!r}")
    heads = ", ".join(str(h) for h in range(1, 65) if mc.n_embd % (2 * h) == 0) or "none: it is odd"
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
            raise RunError(message)

def parse_args(argv):
    """--key=value (or --flag) overrides of TrainConfig and ELFConfig, after --preset, --model."""
    if bad := [arg for arg in argv if not arg.startswith("--")]:
        raise RunError(f"unexpected argument {bad[0]!r}: use --key=value")
    overrides = dict(arg[2:].partition("=")[::2] for arg in argv)   # {key: value}
    keys = [arg[2:].partition("=")[0] for arg in argv]
    if twice := sorted({key for key in keys if keys.count(key) > 1}):
        raise RunError(f"--{twice[0]} is given twice: keep one")
    preset = overrides.pop("preset", None if "init_from" in overrides else "cpu")
    if preset not in (None, *PRESETS):
        raise RunError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    given = {}
    for key, text in overrides.items():
        if key not in DEFAULTS:
            raise RunError(f"unknown config key --{key} (python train.py --help lists them)")
        kind = type(DEFAULTS[key])                              # a string as the default's type
        try:
            given[key] = TRUTH[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            expected = "true or false" if kind is bool else kind.__name__
            raise RunError(f"--{key} expects {expected}, got {text!r}") from None
    settings = dict(PRESETS.get(preset, {}))
    if given.get("init_from"):    # the pretrained model's config and sampler, not a preset's
        net, sampler = pretrained(given["init_from"])
        fields = asdict(net.cfg)
        if clash := [k for k in ARCHITECTURE if k in given and given[k] != fields[k]]:
            raise RunError(f"--{clash[0]}={given[clash[0]]} does not fit --init_from's weights "
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
pretrained = functools.cache(sample.load_checkpoint)  # --init_from: (model, sampler), read once
QUICK_START = {k: v for c in parse_args([]) for k, v in asdict(c).items()}  # python train.py's

def usage():
    """--help: each field's value in python train.py and the paper's recipe, and its comment."""
    paper = {k: v for c in parse_args(["--preset=elf-b-owt"]) for k, v in asdict(c).items()}
    text = [__doc__.strip(), "\nFields (--key=value): the value in python train.py, in the paper's "
            f"ELF-B recipe, and what it is.\n  {'--key':<22}{'train.py':<17}{'elf-b-owt':<13}"]
    for line in (inspect.getsource(TrainConfig) + inspect.getsource(ELFConfig)).splitlines():
        code, _, comment = line.partition("#")                 # no default holds a '#'
        name = code.split(":")[0].strip()
        if name in DEFAULTS:
            row = f"  --{name:<20}{QUICK_START[name]!s:<17}{paper[name]!s:<13}"
            text.append(textwrap.fill(comment.strip(), 100, initial_indent=row,
                                      subsequent_indent=" " * len(row)) or row)
        elif comment and not code.strip():                      # a section's heading
            text.append("#" + comment)
    return "\n".join(line.rstrip() for line in text)

def open_shards(tc, mc):
    """(train, val, meta, ids): shards [(path, tokens)], meta.json and the token ids they hold."""
    folder = os.path.join(tc.data_dir, tc.dataset)
    meta_path = os.path.join(folder, "meta.json")
    try:                                            # no meta.json: GPT-2 tokens, not paired
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        meta = {k: v for k, v in meta.items() if v is not None}  # AttributeError: not an object
        ints = {"vocab_size", "eot_token", "block_size", "source_length"} & meta.keys()
        if meta.get("pairs") and not {"block_size", "eot_token"} <= ints or any(
                type(meta[k]) is not int for k in ints):
            raise ValueError("a field missing or not an integer")
    except (OSError, ValueError, AttributeError) as e:
        raise RunError(f"{meta_path}: not prepare_data.py's ({e}); rerun it") from None
    paired, vocab = meta.get("pairs", False), meta.get("vocab_size", 50257)  # the tokenizer's
    if paired and (n := meta["block_size"]) != mc.block_size:
        raise RunError(f"{folder} has pairs of {n} tokens: pass --block_size={n}")
    splits, seen = {"train": [], "val": []}, np.zeros(1 << 16, bool)    # seen: the ids they hold
    for split, shards in splits.items():
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), f"*_{split}_*.bin"))):
            head = np.fromfile(path, dtype="<i4", count=256) if os.path.isfile(path) else []
            if len(head) < 256 or head[0] != MAGIC or head[1] != VERSION:
                raise RunError(f"{path}: not a token shard (no llm.c header); run prepare_data.py")
            if os.path.getsize(path) != HEADER_BYTES + 2 * int(head[2]):
                raise RunError(f"{path}: its size does not match its header; rerun prepare_data")
            shards.append((path, n := int(head[2])))
            tokens = np.memmap(path, np.uint16, "r", HEADER_BYTES)
            for i in range(0, n, 1 << 24):      # the ids it holds, 16M at a time: flat memory
                seen[tokens[i:i + (1 << 24)]] = True
            if seen[vocab:].any():              # damaged data, or another tokenizer's
                raise RunError(f"{path}: token id {np.flatnonzero(seen)[-1]} >= the tokenizer's "
                               f"{vocab}; rerun prepare_data.py")
        if not shards:
            raise RunError(f"no {split} shards (*_{split}_*.bin) in {folder}: run `python prepare_"
                           "data.py` (again if it has train.bin) or pass --dataset/--data_dir")
        if max(n for _, n in shards) < mc.block_size + (not paired or "source_length" in meta):
            raise RunError(f"{folder}: no {split} shard longer than block_size; lower --block_size")
    return splits["train"], splits["val"], meta, torch.from_numpy(np.flatnonzero(seen))

def get_batch(shards, batch, block_size, generator, paired=False):
    """Windows drawn uniformly among all shards' windows: shards in proportion to their sizes."""
    counts = np.array([n // block_size if paired else max(n - block_size, 0) for _, n in shards])
    ends = np.cumsum(counts)
    picks = torch.randint(int(ends[-1]), (batch,), generator=generator).numpy()
    which = np.searchsorted(ends, picks, side="right")
    starts = (picks - ends[which] + counts[which]) * (block_size if paired else 1)
    # A fresh memmap per batch keeps memory flat over long runs (memmaps cache the pages they read).
    data = {i: np.memmap(shards[i][0], np.uint16, "r", HEADER_BYTES) for i in set(which)}
    tokens = np.stack([data[i][s:s + block_size] for i, s in zip(which, starts)])
    return torch.from_numpy(tokens.astype(np.int64))

def init_distributed(tc):
    """(rank, world_size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; NCCL on GPUs."""
    if "RANK" not in os.environ:
        return 0, 1, sample.pick_device(tc.device)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), device

class Trainer:
    """The model, its EMA, the optimizers; `step` runs this process's share of a step's batches."""

    def __init__(self, tc, mc, device, rank=0, world=1, meta=None, decode_ids=None):
        if tc.grad_accum % world:
            raise RunError(f"grad_accum {tc.grad_accum} must be a multiple of {world} processes")
        if not tc.init_from:        # the decode head: the data's ids (open_shards); bench: all
            mc = replace(mc, decode_vocab=0 if decode_ids is None else len(decode_ids))
        self.tc, self.mc, self.device, self.rank, self.world = tc, mc, device, rank, world
        self.accum, self.micro = tc.grad_accum // world, tc.batch_size // tc.grad_accum  # each
        torch.manual_seed(tc.seed)                              # the same weights on every rank
        self.model = ELF(mc, None if tc.init_from else decode_ids).to(device)
        if tc.init_from:                 # fine-tuning (README: The paper's released models)
            self.model.load_state_dict(pretrained(tc.init_from)[0].state_dict())
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizers = elf.configure_optimizers(self.model, tc.optimizer, tc.lr)
        fast = {"cuda": True, "cpu": torch.cpu._is_avx512_bf16_supported()}.get(device.type, False)
        bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and fast)   # 'auto': where it is fast
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        compile_ = tc.compile == "true" or (tc.compile == "auto" and device.type == "cuda")
        self.forward_model = torch.compile(self.model) if compile_ else self.model
        self.params, self.ema_params = list(self.model.parameters()), list(self.ema.parameters())
        for p in self.params:           # zeroed, never None: steps without decode rows give 0
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        self.iter, self.meta, self.rows = 0, meta or {}, []    # meta.json; the log's rows
        self.ckpt_path, self.log_file = os.path.join(tc.out_dir, "ckpt.pt"), None

    def log(self, text, row=None):
        """Rank 0 prints the line and writes its numbers as a JSON row of out_dir/log.jsonl."""
        if self.rank == 0:
            print(text)
            if row:
                self.rows.append(row)                           # saved with each checkpoint
                print(json.dumps(row), file=self.log_file)

    def step(self, shards):
        """One step on shards (None: random tokens): (loss, mse, ce), grad norm; no GPU sync."""
        tc = self.tc
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
        for opt in self.optimizers:     # Muon's rate: the schedule of lr, scaled to muon_lr
            peak = (tc.muon_lr or tc.lr) if isinstance(opt, torch.optim.Muon) else tc.lr
            for group in opt.param_groups:
                group["lr"] = elf.lr_at(self.iter, tc) * peak / tc.lr
            opt.step()
            opt.zero_grad(set_to_none=False)
        decay = min(tc.ema_decay, (1 + self.iter) / (10 + self.iter))  # warm-up: forget the init
        torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        self.iter += 1
        return totals, grad_norm

    def micro_batch_loss(self, model, shards, seed, it, index):
        """(loss, mse, ce) of one micro-batch, its data and noise drawn from (seed, it, index)."""
        host_gen, gen = elf.micro_batch_generators(seed, it, index, self.device)
        paired, n = self.meta.get("pairs", False), self.meta.get("vocab_size", 50257)
        size = (self.micro, self.mc.block_size + (self.meta.get("source_length") is not None))
        tokens = elf.to_device(get_batch(shards, *size, host_gen, paired) if shards else
                               torch.randint(0, n, size, generator=host_gen), self.device)  # bench
        tokens, *masks = elf.condition_masks(tokens, self.meta) if paired else (tokens, None, None)
        draws = elf.draw_training_noise(self.mc, *tokens.shape, host_gen, gen, self.device, *masks)
        with self.autocast:
            return elf.elf_loss(model, tokens, draws)

    @torch.no_grad()
    def evaluate(self, shards):
        """The val objective (EMA weights, fixed randomness: comparable in time); a few samples."""
        tc, ema = self.tc, self.ema
        val = torch.stack([self.micro_batch_loss(ema, shards, 0, 0, i)[0]
                           for i in range(tc.eval_iters)]).mean().item()  # one host sync
        self.log(f"iter {self.iter}: val {val:.4f}", dict(iter=self.iter, val=val))
        gen = torch.Generator(device=self.device).manual_seed(sample.SEED_OFFSET + tc.seed)
        with self.autocast:
            settings = sample.settings_from(asdict(tc))
            tokens = sample.generate(ema, tc.num_eval_samples, ema.cfg.block_size, settings, gen)
        for text in sample.decode_texts(ema, tokens.tolist()):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            self.log(textwrap.fill(" / ".join(lines) or "(blank)", 96,
                                   initial_indent="  | ", subsequent_indent="  | ", max_lines=3))

    def save(self):
        """Into a file of this run's own, then renamed: a crash or full disk keeps the last one."""
        state = dict(model=self.model.state_dict(), ema=self.ema.state_dict(), iter=self.iter,
                     optimizers=[opt.state_dict() for opt in self.optimizers], data=self.meta,
                     train_config=asdict(self.tc), model_config=asdict(self.mc), log=self.rows)
        tmp = f"{self.ckpt_path}.{os.getpid()}.tmp"
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.ckpt_path)
        except (OSError, RuntimeError) as e:               # torch says RuntimeError for a full disk
            if os.path.exists(tmp):
                os.remove(tmp)
            raise RunError(f"cannot write {self.ckpt_path} ({str(e).splitlines()[0]:.60}): free "
                           "space; the last good checkpoint is kept") from None

    def load(self):
        """Resume from train.py's checkpoint, made with this model config and optimizer."""
        path, diff = self.ckpt_path, []
        try:
            ckpt = dict(torch.load(path, map_location="cpu", weights_only=True))  # on the CPU
            saved = {**asdict(ELFConfig()), **ckpt["model_config"], **ckpt.get("train_config", {})}
            wanted = {**asdict(self.mc), "optimizer": self.tc.optimizer}
            if not (diff := [k for k in wanted if saved.get(k) != wanted[k]]):
                self.model.load_state_dict(ckpt["model"])
                self.ema.load_state_dict(ckpt["ema"])
                for opt, state in zip(self.optimizers, ckpt["optimizers"], strict=True):
                    opt.load_state_dict(state)
                self.iter, self.rows = int(ckpt["iter"]), list(ckpt.get("log", []))
        except Exception as e:  # noqa: BLE001 (truncated, corrupt, not train.py's: a bare tensor)
            raise RunError(f"cannot resume from {path} ({type(e).__name__}): it is truncated or "
                           "corrupt, or not train.py's") from None
        if diff:
            raise RunError("checkpoint config differs in " + ", ".join(
                f"{k} (checkpoint {saved.get(k)!r}, requested {wanted[k]!r})" for k in diff))

def start(trainer):
    """Resume or start anew, say the config, open (and return) out_dir/log.jsonl."""
    tc, mc, log = trainer.tc, trainer.mc, trainer.log
    ckpt_path, log_path = trainer.ckpt_path, os.path.join(tc.out_dir, "log.jsonl")
    if os.path.isdir(ckpt_path) or tc.resume and not os.path.exists(ckpt_path):
        raise RunError(f"no checkpoint file at {ckpt_path}: pass another --out_dir, or train first")
    if tc.resume:
        trainer.load()
        log(f"resumed from {ckpt_path} at iteration {trainer.iter}, {len(trainer.rows)} log rows")
        if trainer.iter >= tc.max_iters:
            raise RunError(f"{ckpt_path} is at iteration {trainer.iter}, not before --max_iters="
                           f"{tc.max_iters}: raise --max_iters to train on")
    elif os.path.exists(ckpt_path):
        log(f"note: {ckpt_path} will be replaced by this new run's (--resume continues it instead)")
    changed = [f"{k}={v}" for k, v in {**asdict(tc), **asdict(mc)}.items() if v != QUICK_START[k]]
    log(textwrap.fill("config (what differs from python train.py's, --help's first column): "
                      + (" ".join(changed) or "none"), 100))
    log(f"model {tc.init_from or tc.model}: {sum(p.numel() for p in trainer.params) / 1e6:.2f}M "
        f"parameters on {trainer.device}; batch {tc.batch_size} = {trainer.micro} x {trainer.accum}"
        f" accumulation x {trainer.world} processes, of {mc.block_size} tokens")
    sample.get_tokenizer(mc.tokenizer)              # an unknown one fails now, not at evaluation
    try:                                            # log.jsonl: the checkpoint's rows (resumed)
        os.makedirs(tc.out_dir, exist_ok=True)
        trainer.log_file = open(log_path if trainer.rank == 0 else os.devnull, "w", buffering=1)
        trainer.log_file.writelines(json.dumps(row) + "\n" for row in trainer.rows)
    except OSError as e:
        raise RunError(f"cannot write to {tc.out_dir} ({e.strerror}): another --out_dir") from None
    return trainer.log_file

def benchmark(trainer):
    """--bench: bench_warmup steps, then bench_steps timed; one JSON line of speed and memory."""
    tc, mc, device, gpu = trainer.tc, trainer.mc, trainer.device, trainer.device.type == "cuda"
    for i in range(tc.bench_warmup + tc.bench_steps):
        if i == tc.bench_warmup:                # the warm-up (compilation) done: the clock starts
            t0 = time.perf_counter()
        if i == tc.bench_warmup and gpu:
            torch.cuda.reset_peak_memory_stats(device)          # the timed steps' peak
        trainer.step(None)[0].tolist()          # each step waited for: a negligible host sync
    tok_s = tc.bench_steps * tc.batch_size * mc.block_size / (time.perf_counter() - t0)
    peak = elf.peak_flops(device)
    trainer.log(json.dumps(dict(                 # (rank 0)
        bench="train", model=tc.model, block_size=mc.block_size, batch=tc.batch_size,
        gpu=torch.cuda.get_device_name(device) if gpu else None, tokens_per_s=round(tok_s),
        peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if gpu else None,
        step_s=round(tc.batch_size * mc.block_size / tok_s, 4),
        mfu=peak and round(tok_s * elf.flops_per_token(mc) / (peak * trainer.world), 4))))

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        return print(usage())
    tc, mc = parse_args(argv)
    rank, world, device = init_distributed(tc)
    previous = {}                                   # the signal handlers before the loop's
    try:
        if tc.bench:                            # random tokens: no data, no log, no checkpoint
            return benchmark(Trainer(tc, elf.config_for_data(mc, {}), device, rank, world))
        train_shards, val_shards, meta, ids = open_shards(tc, mc)
        trainer = Trainer(tc, elf.config_for_data(mc, meta), device, rank, world, meta, ids)
        stop = []                    # Ctrl-C / SIGTERM: the step ends, a checkpoint is saved
        with start(trainer):         # resumed or new; the returned log.jsonl closes at the end
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, lambda *_: stop.append(True)) for s in signals}
            t0, it0 = time.perf_counter(), trainer.iter
            peak, fpt = elf.peak_flops(device), elf.flops_per_token(mc)   # for the MFU
            while trainer.iter < tc.max_iters:
                totals, grad_norm = trainer.step(train_shards)
                it = trainer.iter
                logging = it % tc.log_interval == 0 or it == tc.max_iters
                stopping = bool(stop) and world == 1
                if world > 1 and logging:               # the processes agree on when to stop
                    flag = torch.tensor([float(bool(stop))], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stopping = bool(flag.item())
                saving = it % tc.eval_interval == 0 or it == tc.max_iters or stopping
                if logging or saving:                   # a step's only host sync
                    (loss, mse, ce), grad = totals.tolist(), grad_norm.item()
                    if not math.isfinite(loss + grad):  # before a checkpoint is written over
                        raise RunError(f"non-finite loss or gradient after iteration {it0}, by {it}"
                                       ": stopped, the last good checkpoint is kept (lower --lr)")
                if logging:                             # tokens/s (and MFU) since the last log
                    tok_s = (it - it0) * tc.batch_size * mc.block_size / (time.perf_counter() - t0)
                    mfu = f" mfu {tok_s * fpt / (peak * world):.1%}" if peak else ""
                    lr = elf.lr_at(it - 1, tc)                  # the rate the step just used
                    trainer.log(f"iter {it}: loss {loss:.4f} (mse {mse:.4f}, ce {ce:.4f}) grad "
                                f"{grad:.2f} lr {lr:.2e} {tok_s:,.0f} tok/s{mfu}",
                                dict(iter=it, loss=loss, mse=mse, ce=ce, lr=lr, tok_s=tok_s))
                if saving and rank == 0 and not stopping:  # an evaluation (none on a stop)
                    trainer.evaluate(val_shards)
                if saving and rank == 0:
                    trainer.save()
                if logging or saving:                   # evaluations are not counted as steps
                    t0, it0 = time.perf_counter(), it
                if stopping:
                    return trainer.log(f"interrupted: iteration {it} saved to {trainer.ckpt_path}"
                                       "; the same command with --resume continues it")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if world > 1:
            dist.destroy_process_group()

if __name__ == "__main__":
    try:
        main()
    except RunError as e:
        sys.exit(f"error: {e}")
