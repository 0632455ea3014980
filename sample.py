"""Sample from a trained ELF: a flow, a decode pass, an argmax; fixed text held (README: Sampling).
    python sample.py                                  # 4 samples from out/ckpt.pt (EMA weights)
    python sample.py --prompt "ROMEO:" --cfg_scale=2  # continue a prompt (or --prompt_file=FILE)
    python sample.py --infill "KING: [BLANK:12] my lord." --eval   # fill blanks; judge samples"""
import argparse
import glob
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

import elf
from elf import ELF, MODEL_SIZES, ELFConfig
from prepare_data import get_tokenizer, jsonl_rows

SEED_OFFSET = 2**31     # noise generators start past embedding seeds (< 2**31): README: Sampling

@dataclass(frozen=True)
class SamplerConfig:
    """How the flow is integrated (README: Sampling); the defaults are the paper's."""
    steps: int = 32                 # integration steps from noise (t = 0) to data (t = 1)
    sampler: str = "sde"            # 'sde' (churn gamma, but a plain last step) or 'ode' (Euler)
    gamma: float = 1.5              # SDE churn: how far each step first moves back by re-noising
    scale: float = 3.0              # self-conditioning guidance scale w, an input of the network
    schedule: str = "logit_normal"  # the time grid: 'logit_normal' (training's times) or 'uniform'
    cfg_scale: float = 1.0          # classifier-free guidance on the fixed text; 1: off

# Generating: the time grid, the SDE/ODE step, the loop, the final argmax; in batches

def time_grid(steps, schedule="logit_normal", cfg=None, generator=None):
    """t_0 = 0 < ... < t_N = 1: 'uniform', or 'logit_normal' (N - 1 sorted training times)."""
    if schedule == "uniform":
        return torch.linspace(0, 1, steps + 1)
    noise = torch.randn(steps - 1, generator=generator, device=getattr(generator, "device", None))
    inner = torch.sigmoid(cfg.t_mean + cfg.t_std * noise.cpu()).sort().values
    return torch.cat([torch.zeros(1), inner, torch.ones(1)])

def sde_step(denoise_fn, z, x_prev, t, t_next, gamma, noise, cfg):
    """From t to t_next with churn gamma (0: a plain Euler step): back to t_b = alpha t, re-noised,
    then Euler to t_next. denoise_fn(z, t_batch, x_sc) -> x_hat. Returns (z_next, x_hat)."""
    alpha = min(max(1.0 - gamma * (t_next - t), 0.0), 1.0)
    t_b = alpha * t
    z_b = alpha * z + (1 - alpha) * cfg.noise_scale * noise if alpha < 1 else z
    t_batch = torch.full((z.size(0),), t_b, device=z.device)
    x_hat = denoise_fn(z_b, t_batch, x_prev)
    v_hat = elf.velocity(x_hat, z_b, t_batch, cfg.t_eps)
    return z_b + (t_next - t_b) * v_hat, x_hat

def argmax_tokens(logits, n_vocab=None):
    """Final decode: the most likely token per position, ignoring the vocabulary's padding rows."""
    return logits[..., :n_vocab].argmax(-1)

@torch.no_grad()
def generate(model, num_samples, length, settings=SamplerConfig(), generator=None, cond=None,
             cond_tokens=None, denoise_fn=None, decode_fn=None, on_step=None):
    """Token ids (num_samples, length); cond: the positions held at cond_tokens (both that shape).
    denoise_fn/decode_fn: compiled passes, or the model's; on_step(t_next, z, x_hat): each step."""
    cfg, device = model.cfg, next(model.parameters()).device
    denoise_fn, decode_fn = denoise_fn or model.denoise, decode_fn or model.decode
    w = torch.full((num_samples,), float(settings.scale), device=device)
    grid = time_grid(settings.steps, settings.schedule, cfg, generator).tolist()  # no syncs
    shape = (num_samples, length, cfg.embed_dim)
    z = cfg.noise_scale * torch.randn(shape, generator=generator, device=device)  # t = 0: noise
    x_prev = torch.zeros_like(z)                     # the self-conditioning input starts at zero
    x_cond = cond if cond is None else torch.where(   # the clean embeddings of the fixed text
        cond[..., None], model.embed(cond_tokens, cond), 0.0)
    denoise_w = lambda z_, t_, x_sc: denoise_fn(z_, t_, w, x_sc)  # noqa: E731
    step_fn = elf.conditioned(denoise_w, cond, x_cond, settings.cfg_scale)
    for i in range(settings.steps):       # SDE steps with churn, the last an ODE step onto t = 1
        gamma = settings.gamma if settings.sampler == "sde" and i < settings.steps - 1 else 0.0
        noise = torch.randn(shape, generator=generator, device=device) if gamma > 0 else None
        z, x_hat = sde_step(step_fn, z, x_prev, grid[i], grid[i + 1], gamma, noise, cfg)
        z = elf.hold_condition(z, cond, x_cond)      # conditions: restored after each step
        if cfg.self_cond_prob > 0:                   # trained without self-conditioning: x_sc = 0
            x_prev = x_hat.to(z.dtype)
        if on_step:
            on_step(grid[i + 1], z, x_hat)
    tokens = argmax_tokens(decode_fn(z, w), get_tokenizer(cfg.tokenizer).n_vocab)
    return tokens if cond is None else torch.where(cond, cond_tokens, tokens)

def generate_all(model, rows, n, length, settings, batch_size, generator, passes):
    """n samples (lists of token ids), batch_size at a time; rows: their templates, or None."""
    tokens = []
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        cond = condition_tensors(rows[start:start + k], length, generator.device) if rows else ()
        tokens += generate(model, k, length, settings, generator, *cond, **passes).tolist()
        if n > batch_size:                          # a long run says how far it is
            print(f"{len(tokens):,} of {n:,} samples", file=sys.stderr, flush=True)
    return tokens

def settings_from(train_config, **given):
    """Sampler settings: those given (not None), else the checkpoint's (train.py's sample_*)."""
    names = {k: k if k == "sampler" else "sample_" + k for k in asdict(SamplerConfig())}
    trained = {k: train_config[name] for k, name in names.items() if name in train_config}
    return replace(SamplerConfig(**trained), **{k: v for k, v in given.items() if v is not None})

def compiled_passes(model, compile_flag, device):
    """generate's passes compiled if asked ('auto': on CUDA), cloned: CUDA graphs reuse outputs."""
    if compile_flag == "false" or (compile_flag == "auto" and device.type != "cuda"):
        return {}
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    denoise, decode = (torch.compile(f, mode=mode) for f in (model.denoise, model.decode))
    return dict(denoise_fn=lambda *a: denoise(*a).clone(), decode_fn=lambda *a: decode(*a).clone())

# Judging samples (README: Judging samples): entropy and generative perplexity; pairs' targets

def decode_texts(model, rows):
    """Samples' ids -> strings by the model's tokenizer, each cut at its first end-of-text."""
    tok = get_tokenizer(model.cfg.tokenizer)
    return [tok.decode(row[:row.index(tok.eot)] if tok.eot in row else row) for row in rows]

def unigram_entropy(tokens):
    """Entropy in nats of one sample's token frequencies; repetitive text scores low."""
    p = torch.tensor(tokens).unique(return_counts=True)[1].double() / max(len(tokens), 1)
    return float(-(p * p.log()).sum())

@torch.no_grad()
def pooled_nll(judge, samples, bos=50256):   # BOS: GPT-2's end-of-text
    """(token NLL summed over the samples, tokens scored); each after a BOS, cut to the context."""
    device, n_ctx = next(judge.parameters()).device, judge.config.n_positions
    total, count = 0.0, 0
    for tokens in samples:
        ids = torch.tensor([([bos] + list(tokens))[:n_ctx]], device=device)
        logp = judge(ids).logits[0, :-1].float().log_softmax(-1)
        total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.size(1) - 1
    return total, count

def generative_perplexity(samples, judge_name="gpt2-large", device="cpu"):
    """exp(pooled NLL) under a causal LM of `transformers` (optional), or None and a reason."""
    try:
        from transformers import AutoModelForCausalLM
        judge = AutoModelForCausalLM.from_pretrained(judge_name).to(device).eval()
    except Exception as e:  # noqa: BLE001 (no transformers, no such judge: a note, entropy only)
        return print("no generative perplexity: " + ("it needs `pip install transformers`" if
                     isinstance(e, ImportError) else f"no judge {judge_name!r} ({e!r:.80})"))
    total, count = pooled_nll(judge, samples)
    return math.exp(total / max(count, 1))

def judge_samples(texts, args, settings, seconds_per_sample, device, scores=None):
    """One JSON line, printed and appended to the results: gen_ppl and entropy, or pairs' scores."""
    samples = [get_tokenizer("gpt2").encode(text) for text in texts]
    if scores is None and not any(samples):         # nothing to judge (not a perfect score)
        sys.exit(f"error: all {len(samples)} samples are empty: nothing to judge")
    entropy = sum(unigram_entropy(s) for s in samples if s) / max(1, sum(map(bool, samples)))
    gen_ppl = generative_perplexity(samples, args.judge, device) if scores is None else None
    summary = dict(gen_ppl=gen_ppl and round(gen_ppl, 3), entropy=round(entropy, 4),
                   distinct=len(set().union(*samples)), **scores or {}, n=len(samples),
                   empty=samples.count([]), judge=args.judge, s_per_sample=seconds_per_sample,
                   **(asdict(settings) if settings else {}), source=args.samples or args.ckpt)
    print(json.dumps(summary))
    with open(args.results, "a") as f:
        f.write(json.dumps(summary) + "\n")

def score_pairs(texts, pairs):
    """Exact match, corpus BLEU and ROUGE-1/2/L F1 (%) of the targets, as the authors score them."""
    refs = [pair["target"] for pair in pairs]
    scores = {"exact_match": 100 * sum(map(str.__eq__, texts, refs)) / len(refs)}
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
        bleu = sacrebleu.corpus_bleu(texts, [refs], lowercase=True, use_effective_order=True)
        rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        each = [rouge.score(ref, text) for text, ref in zip(texts, refs)]
        scores |= {"bleu": bleu.score} | {k: 100 * sum(s[k].fmeasure for s in each) / len(each)
                                          for k in ("rouge1", "rouge2", "rougeL")}
    except ImportError:
        print("no BLEU or ROUGE: pip install sacrebleu rouge-score")
    print(", ".join(f"{k} {v:.1f}" for k, v in scores.items()) + f" over {len(refs)} pairs")
    return scores

# The command line: load, templates, generate in batches, write, judge; or --bench

HUB_ID = re.compile(r"[\w-]+/[\w.-]+(?<!\.pt)")   # owner/name, as on the Hugging Face Hub

def checkpoint_file(source):
    """The file --ckpt (or --init_from) names: a file; a folder of checkpoint_<step>; a Hub id."""
    path = source
    if not os.path.exists(source):
        if not HUB_ID.fullmatch(source):
            sys.exit(f"error: no checkpoint at {source}: train one (python train.py) or pass one")
        try:
            from huggingface_hub import snapshot_download
            path = snapshot_download(source)
        except ImportError:
            sys.exit(f"error: {source} is not here; to download it, pip install huggingface_hub")
        except Exception as e:  # noqa: BLE001 (no such repo, offline, no access: all one line)
            sys.exit(f"error: cannot download {source} ({type(e).__name__}): check it, or pass one")
    if os.path.isdir(path):                          # the authors' latest checkpoint_<step>
        step = lambda f: int(re.search(r"(\d*)$", f).group(1) or -1)  # noqa: E731
        found = sorted(glob.glob(os.path.join(glob.escape(path), "checkpoint_*")), key=step)
        if not found:
            sys.exit(f"error: no checkpoint_<step> file in {source}: pass the file")
        path = found[-1]
    return path

def load_checkpoint(source, weights="ema", encoder=None):
    """(model on the CPU, its train config) from this repo's checkpoint or the authors' (their EMA
    weights unless weights='model'); encoder: a T5 encoder and tokenizer to use instead."""
    path = checkpoint_file(source)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if "params" in ckpt:                                   # the authors' format
            params = (weights == "ema" and ckpt.get("ema_params1")) or ckpt["params"]
            fields, train_config = elf.authors_config(params, f"{source} {path}")
            state = elf.from_authors(params, fields["n_head"])
        else:
            fields, train_config = ckpt["model_config"], ckpt.get("train_config", {}).copy()
            train_config["source_length"] = ckpt.get("data", {}).get("source_length")
            state = ckpt[weights]
        if encoder and fields.get("embedding") == "t5":
            fields = {**fields, "encoder": encoder, "tokenizer": encoder}
        model = ELF(ELFConfig(**fields))
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 (unreadable, foreign, or another architecture's)
        sys.exit(f"error: {source} is not a compatible ELF checkpoint ({e!r:.120})")
    return model, train_config

def load(args, device):
    """(model, sample length, train config) of --ckpt (--bench without one: untrained)."""
    if args.bench and not os.path.exists(args.ckpt) and not HUB_ID.fullmatch(args.ckpt):
        model, train_config = ELF(ELFConfig(**MODEL_SIZES[args.model])), {}
    else:
        model, train_config = load_checkpoint(args.ckpt, args.weights, args.encoder)
    if (task := train_config.get("task", "owt")) != "owt" and not (args.pairs or args.bench):
        sys.exit(f"error: {args.ckpt} is the authors' conditional {task} model: pass --pairs")
    if (length := args.length or model.cfg.block_size) > model.cfg.block_size:
        sys.exit(f"error: --length {length} is outside 1..{model.cfg.block_size} (its block_size)")
    return model.to(device).eval(), length, train_config

def read_rows(path, key):
    """The rows, each with a string `key`, of a JSON-lines file (a prepared folder: pairs.jsonl)."""
    path = os.path.join(path, "pairs.jsonl") if os.path.isdir(path) else path
    rows = list(jsonl_rows(path, [key], {"bytes": 0}))
    return rows or sys.exit(f'error: no samples in {path}: want JSON lines {{"{key}": ...}}')

def templates(args, pairs, length, tok, cut=None):
    """A row per sample: token ids where the text is fixed, None (and all past the row) generated:
    --pairs' sources + end-of-text (the authors' layout: cut to `cut`), --prompt, --infill."""
    if pairs:
        sources = [tok.encode(pair["source"]) for pair in pairs]
        if cut and (longer := sum(len(source) > cut for source in sources)):
            print(f"note: {longer} of {len(sources)} sources cut to {cut} tokens, as in training")
        rows = [source[:cut] if cut else source + [tok.eot] for source in sources]
    else:
        try:
            text = args.infill or (args.prompt_file.read() if args.prompt_file else args.prompt)
        except UnicodeDecodeError:
            sys.exit(f"error: {args.prompt_file.name} is not UTF-8 text: save it as UTF-8")
        parts = re.split(r" ?\[BLANK:(\d+)\]", text) if args.infill else [text]
        if "[BLANK" in "".join(parts[::2]) or any(not 0 < int(n[:9]) <= length
                                                   for n in parts[1::2]):
            sys.exit(f"error: write each blank as [BLANK:n], n tokens in 1..{length} (--length)")
        rows = [[t for i, part in enumerate(parts)
                 for t in ([None] * int(part) if i % 2 else tok.encode(part))]]
    for row in rows:
        if len(row) > length or (len(row) == length and None not in row):
            sys.exit(f"error: the text takes {len(row)} of {length} tokens (--length): shorten it")
    return rows if pairs else rows * args.num_samples

def condition_tensors(rows, length, device):
    """(cond, cond_tokens), each (len(rows), length): which positions are fixed, their token ids."""
    padded = [[-1 if t is None else t for t in row] + [-1] * (length - len(row)) for row in rows]
    ids = torch.tensor(padded, device=device)         # -1 marks the generated positions
    return ids >= 0, ids.clamp(min=0)

def pick_device(name):
    """--device (train.py's too): 'auto' is cuda, then mps, then cpu; else one this machine has."""
    have = dict(cuda=torch.cuda.device_count(), mps=torch.backends.mps.is_available(), cpu=1)
    match = re.fullmatch(r"(cuda|mps|cpu)(?::(\d+))?", next(k for k in have if have[k])
                         if name == "auto" else name)
    if not match or have[match[1]] <= int(match[2] or 0):
        sys.exit(f"error: no device {name} here: use --device=auto or --device=cpu")
    return torch.device(match[0])

def number(kind, low, high):
    """An argparse type: a `kind` in [low, high) (NaN fails), else argparse's one-line error."""
    def parse(text):
        if not low <= (value := kind(text)) < high:     # kind(text) failing: 'invalid int value'
            raise argparse.ArgumentTypeError(f"must be >= {low} and < {high}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")   # one line, no usage
    p.add_argument("--ckpt", default="out/ckpt.pt", help="a file, a folder or a Hub repo id")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--encoder", help="T5 models: encoder and tokenizer (name or folder) to use")
    p.add_argument("--num_samples", type=number(int, 1, 10**6), default=4)
    p.add_argument("--batch_size", type=number(int, 1, 1025), default=64, help="at once")
    p.add_argument("--length", type=number(int, 1, 2**16), help="default: block_size")
    p.add_argument("--steps", type=number(int, 1, 10**4), help="default: the checkpoint's")
    p.add_argument("--sampler", choices=["sde", "ode"], help="paper: sde")
    p.add_argument("--gamma", type=number(float, 0, math.inf), help="SDE churn (paper: 1.5)")
    p.add_argument("--scale", type=number(float, 0, math.inf), help="guidance w (paper: 3)")
    p.add_argument("--schedule", choices=["logit_normal", "uniform"], help="paper: logit_normal")
    p.add_argument("--cfg_scale", type=number(float, 0, math.inf), help="CFG, default 1: off")
    p.add_argument("--seed", type=number(int, 0, SEED_OFFSET), default=0)
    p.add_argument("--out", help="JSON lines output (default: next to the checkpoint)")
    p.add_argument("--device", default="auto", help="'auto' picks cuda, then mps, then cpu")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    fixed = p.add_mutually_exclusive_group()
    fixed.add_argument("--prompt", help="text that every sample starts with and continues")
    fixed.add_argument("--prompt_file", type=argparse.FileType(encoding="utf-8"), help="in UTF-8")
    fixed.add_argument("--infill", help='fixed text with blanks to fill: "Before [BLANK:12] after"')
    fixed.add_argument("--pairs", help='JSON lines {"source": ..., "target": ...}: scored targets')
    p.add_argument("--bench", action="store_true", help="time an untrained (or --ckpt) model")
    p.add_argument("--model", default="elf-b", choices=list(MODEL_SIZES), help="--bench size")
    p.add_argument("--bench_batches", type=number(int, 1, 10**4), default=3)
    p.add_argument("--eval", action="store_true", help="report entropy and generative perplexity")
    p.add_argument("--samples", help="with --eval: judge the texts of this JSON-lines file")
    p.add_argument("--judge", default="gpt2-large", help="causal LM (transformers) for gen. PPL")
    p.add_argument("--results", help="JSON lines the --eval summary is appended to")
    flags = [arg.split("=")[0] for arg in (sys.argv[1:] if argv is None else argv)]
    if twice := sorted({flag for flag in flags if flag.startswith("--") and flags.count(flag) > 1}):
        p.error(f"{twice[0]} is given twice: keep one")
    return p.parse_args(argv)

def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    out_dir = os.path.dirname(args.samples or args.ckpt) or "."
    args.results = args.results or os.path.join(out_dir, "results.jsonl")
    out = args.out or os.path.join(out_dir, "samples.jsonl")
    for path in [args.results] * args.eval + [out] * (not args.samples and not args.bench):
        try:
            open(path, "a").close()
        except OSError as e:
            sys.exit(f"error: cannot write {path} ({e.strerror}): pass another --out or --results")
    if args.samples:                                 # judge texts made earlier: no model needed
        texts = [row["text"] for row in read_rows(args.samples, "text")]
        return judge_samples(texts, args, None, None, device)
    model, length, train_config = load(args, device)
    settings = settings_from(train_config, **{k: getattr(args, k) for k in asdict(SamplerConfig())})
    pairs = read_rows(args.pairs, "source") if args.pairs else None
    fixed = pairs or args.infill or args.prompt or args.prompt_file
    tok = get_tokenizer(model.cfg.tokenizer)
    rows = templates(args, pairs, length, tok, train_config.get("source_length")) if fixed else None
    n = len(rows) if pairs else args.num_samples
    gen = torch.Generator(device=device).manual_seed(SEED_OFFSET + args.seed)
    passes = compiled_passes(model, args.compile, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast, torch.no_grad():
        if args.bench:                  # untimed: a warm-up batch (compilation, CUDA graphs)
            generate_all(model, None, args.batch_size, length, settings, args.batch_size, gen,
                         passes)
            n = args.batch_size * args.bench_batches
        t0 = time.perf_counter()
        tokens = generate_all(model, rows, n, length, settings, args.batch_size, gen, passes)
        seconds = time.perf_counter() - t0              # tolist() above waited for the device
    if args.bench:                                      # one JSON line: the timed batches' speed
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        return print(json.dumps(dict(
            bench="sample", gpu=gpu, device=str(device), **asdict(settings), length=length,
            n_layer=model.cfg.n_layer, n_embd=model.cfg.n_embd, batch=args.batch_size,
            s_per_batch=round(seconds / args.bench_batches, 4),
            sequences_per_s=round(n / seconds, 2))))
    texts = decode_texts(model, [row[len(t):] for row, t in zip(tokens, rows)] if pairs else tokens)
    with open(out, "w") as f:                       # the samples, printed and as JSON lines
        for i, text in enumerate(texts):
            print(f"--- sample {i} ---\n{text}")
            f.write(json.dumps({**(pairs[i] if pairs else {}), "text": text}) + "\n")
    scores = score_pairs(texts, pairs) if pairs and all("target" in p for p in pairs) else None
    print(f"{n} samples in {seconds:.1f} s ({seconds / n:.3f} s per sample); written to {out}")
    if args.eval:
        judge_samples(texts, args, settings, round(seconds / n, 4), device, scores)

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("error: interrupted; nothing written")
