"""
Sample from a trained ELF model: integrate the flow from noise (t = 0) to embeddings (t = 1) with the
SDE (or ODE) sampler, then one decode-mode pass and an argmax per position (§5). Fixed text (a prompt,
the text around blanks, a source) is held clean while the rest is generated (§6).

    python sample.py                                  # 4 samples from out/ckpt.pt (EMA weights)
    python sample.py --prompt "ROMEO:" --cfg=2        # continue a prompt (or --prompt_file=FILE)
    python sample.py --infill "KING: [BLANK:12] my lord."   # fill the blanks between fixed text
    python sample.py --pairs val.jsonl --steps=64 --sampler=ode --scale=1 --cfg=2   # a target per source
    python sample.py --eval                           # + entropy and generative perplexity (GPT-2 Large)
    python sample.py --trajectory                     # pictures of the flow: trajectory*.png
    python sample.py --bench --model=elf-b            # random init, prints sequences/s as JSON
"""
import argparse
import json
import os
import re
import sys
import time

import tiktoken
import torch

from prepare_data import decode_texts, read_jsonl
from elf import (ELF, EOT, ELFConfig, MODEL_SIZES, N_VOCAB, argmax_tokens, conditioned, cut_at_eot,
                 generative_perplexity, hold_condition, sde_step, time_grid, unigram_entropy)

@torch.no_grad()
def generate(model, num_samples, length, steps=32, sampler="sde", gamma=1.5, scale=3.0, schedule="logit_normal",
             generator=None, denoise_fn=None, decode_fn=None, on_step=None, cond=None, cond_tokens=None, cfg_scale=1.0):
    """Token ids (num_samples, length). denoise_fn/decode_fn default to the model's own methods;
    sample.py passes compiled versions of them on the GPU. on_step(t_next, z, x_hat) sees every step.
    cond (num_samples, length) bool marks positions held at cond_tokens (§6); cfg_scale is its guidance."""
    cfg, device = model.cfg, next(model.parameters()).device
    denoise_fn, decode_fn = denoise_fn or model.denoise, decode_fn or model.decode
    w = torch.full((num_samples,), float(scale), device=device)
    grid = time_grid(steps, schedule, cfg, generator).tolist()  # floats on the host: no syncs in the loop
    randn = lambda: torch.randn(num_samples, length, cfg.embed_dim, generator=generator, device=device)  # noqa: E731
    z = cfg.noise_scale * randn()                      # start from pure noise at t = 0
    x_prev = torch.zeros_like(z)                       # self-conditioning input starts at zero
    x_cond = torch.zeros_like(z) if cond is None else torch.where(cond[..., None], model.embed(cond_tokens), 0.0)
    step_fn = conditioned(lambda z_, t_, xs: denoise_fn(z_, t_, w, xs), cond, x_cond, cfg_scale)
    for i in range(steps):
        # SDE steps with churn gamma, except the last step, always an ODE step onto t = 1.
        g = gamma if sampler == "sde" and i < steps - 1 else 0.0
        noise = randn() if g > 0 else None
        z, x_prev = sde_step(step_fn, z, x_prev, grid[i], grid[i + 1], g, noise, cfg)
        z, x_prev = hold_condition(z, cond, x_cond), x_prev.to(z.dtype)   # conditions: restored after each step
        if on_step:
            on_step(grid[i + 1], z, x_prev)
    tokens = argmax_tokens(decode_fn(z, w, x_cond), N_VOCAB)  # the same network in decode mode, then argmax
    return tokens if cond is None else torch.where(cond, cond_tokens, tokens)

def show(model, num_samples, steps, seed):
    """Print a few samples of the model's full length (train.py shows some at each evaluation)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for text in decode_texts(generate(model, num_samples, model.cfg.block_size, steps, generator=gen).tolist()):
        print("  | " + text.replace("\n", "\n  | "))

def read_rows(path, key):
    """The rows of a JSON-lines file of objects with a string `key`, or a one-line error."""
    return read_jsonl(path, key) or sys.exit(f'error: no samples in {path}: want JSON lines of {{"{key}": ...}}')

# ----------------------------------------------------------------------------------------------
# Conditions (§6): prompts, blanks, sources become templates, a token id where fixed and None where generated.

def templates(args, pairs, length):
    """--pairs: a source and its end-of-text each; --infill: "text [BLANK:n] text ..."; --prompt(_file)."""
    enc = tiktoken.get_encoding("gpt2")
    if pairs:
        rows = [enc.encode_ordinary(pair["source"]) + [EOT] for pair in pairs]
    else:                                   # --prompt: text without blanks; --infill: text, n, text, n, ..., text
        text = args.infill or (args.prompt_file.read() if args.prompt_file else args.prompt)
        parts = re.split(r" ?\[BLANK:(\d+)\]", text) if args.infill else [text]  # a blank takes the space before it
        rows = [[t for i, p in enumerate(parts) for t in ([None] * int(p) if i % 2 else enc.encode_ordinary(p))]]
    for row in rows:
        if len(row) > length or (len(row) == length and None not in row):
            sys.exit(f"error: the fixed text takes {len(row)} of {length} tokens (--length or block_size): shorten it")
    return rows if pairs else rows * args.num_samples

def condition_tensors(rows, length, device):
    """(cond, cond_tokens), each (len(rows), length): which positions are fixed, and their token ids."""
    ids = torch.tensor([[-1 if t is None else t for t in r] + [-1] * (length - len(r)) for r in rows], device=device)
    return ids >= 0, ids.clamp(min=0)                                 # -1 marks the generated positions

def score_pairs(pairs, rows, tokens):
    """Print the exact match and token accuracy of the generated targets, where the pairs hold a reference
    "target": its tokens and end-of-text, position by position after the source's end-of-text."""
    enc = tiktoken.get_encoding("gpt2")
    scored = [(out[len(row):], enc.encode_ordinary(pair["target"]) + [EOT])
              for pair, row, out in zip(pairs, rows, tokens) if isinstance(pair.get("target"), str)]
    right = [sum(a == b for a, b in zip(generated, reference)) for generated, reference in scored]
    exact = sum(r == len(reference) for r, (_, reference) in zip(right, scored)) / max(len(scored), 1)
    accuracy = sum(right) / max(sum(len(reference) for _, reference in scored), 1)
    if scored:
        print(f"exact match {exact:.1%}, token accuracy {accuracy:.1%} over {len(scored)} pairs")

# ----------------------------------------------------------------------------------------------
# Judging samples (ELF.md §7): entropy and generative perplexity (elf.py), always reported together.

def judge_samples(token_rows, args, seconds_per_sample, device):
    """Print and append to the results file one JSON line: gen_ppl, entropy and the sampling settings."""
    samples = [cut_at_eot(row) for row in token_rows]
    entropy = sum(unigram_entropy([t for t in s if t != EOT]) for s in samples) / len(samples)
    gen_ppl = generative_perplexity(samples, args.judge, device)
    summary = {"gen_ppl": gen_ppl and round(gen_ppl, 3), "entropy": round(entropy, 4), "n": len(samples),
               "judge": args.judge, "steps": args.steps, "sampler": args.sampler, "gamma": args.gamma,
               "scale": args.scale, "s_per_sample": seconds_per_sample, "source": args.samples or args.ckpt}
    print(json.dumps(summary))
    with open(args.results, "a") as f:
        f.write(json.dumps(summary) + "\n")

# ----------------------------------------------------------------------------------------------
# Pictures (matplotlib's Figure: files only, no display or global state; imported only when drawing).

@torch.no_grad()
def trajectory(model, length, args, gen, out_dir, n_samples=2, n_rows=8, n_paths=6):
    """What the flow does: x_hat decoded to text (decode mode at t = 1 on x_hat) at a few steps of a few
    samples, and the paths of some positions' z_t in a 2-D PCA of embedding space, labelled with their tokens."""
    states, w = [], torch.full((n_samples,), args.scale, device=gen.device)
    tokens = generate(model, n_samples, length, args.steps, args.sampler, args.gamma, args.scale, args.schedule, gen,
                      on_step=lambda t, z, x_hat: states.append((t, z[0].float().cpu(), x_hat)))
    picks = sorted({round(i * (len(states) - 1) / (n_rows - 1)) for i in range(n_rows)})
    texts = [decode_texts(argmax_tokens(model.decode(states[i][2], w), N_VOCAB).tolist()) for i in picks]  # [pick][k]
    rows = [(k, states[i][0], texts[j][k]) for k in range(n_samples) for j, i in enumerate(picks)]
    from matplotlib.figure import Figure
    ax = Figure(figsize=(12, 0.45 * len(rows) + 0.6)).subplots()
    for y, (k, t, text) in enumerate(rows):
        print(f"sample {k}, t = {t:.3f} | {text!r}")
        ax.text(0, len(rows) - y, f"{k}: t = {t:.2f}   {text[:105]!r}", family="monospace", fontsize=8, va="center")
    ax.set_axis_off(), ax.set(ylim=(0.3, len(rows) + 0.7), title="x_hat decoded along the flow: noise (top) to text")
    ax.figure.savefig(os.path.join(out_dir, "trajectory.png"), dpi=90, bbox_inches="tight")
    paths = torch.stack([z[:n_paths] for _, z, _ in states])          # (steps, positions, d)
    paths = paths - paths.flatten(0, 1).mean(0)
    xy = paths @ torch.linalg.svd(paths.flatten(0, 1), full_matrices=False)[2][:2].T  # top-2 principal axes
    ax = Figure(figsize=(6, 5)).subplots()
    for p, label in enumerate(decode_texts(tokens[0, :n_paths, None].tolist())):
        ax.plot(xy[:, p, 0], xy[:, p, 1], marker=".", alpha=0.7)
        ax.annotate(repr(label), xy[-1, p].tolist(), fontsize=9)
    ax.set(title=f"z_t of {xy.size(1)} positions, t -> 1 (2-D PCA)", xticks=[], yticks=[])
    ax.figure.savefig(os.path.join(out_dir, "trajectory_pca.png"), dpi=90, bbox_inches="tight")
    print(f"wrote {out_dir}/trajectory.png and trajectory_pca.png")

def load_model(ckpt_path, weights):
    """ELF model from a train.py checkpoint, or a clear error saying what is wrong."""
    if not os.path.exists(ckpt_path):
        sys.exit(f"error: no checkpoint at {ckpt_path}: train one with `python train.py` or pass --ckpt")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model = ELF(ELFConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt[weights])
    except Exception as e:
        sys.exit(f"error: {ckpt_path} is not a compatible ELF checkpoint ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:120]})")
    return model

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")    # one line, not the whole usage
    p.add_argument("--ckpt", default="out/ckpt.pt")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=64, help="samples generated at once")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: block_size)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--sampler", default="sde", choices=["sde", "ode"])
    p.add_argument("--gamma", type=float, default=1.5, help="SDE churn")
    p.add_argument("--scale", type=float, default=3.0, help="self-conditioning guidance scale w")
    p.add_argument("--schedule", default="logit_normal", choices=["logit_normal", "uniform"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON lines output (default: next to the checkpoint)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    fixed = p.add_mutually_exclusive_group()
    fixed.add_argument("--prompt", help="text that every sample starts with and continues")
    fixed.add_argument("--prompt_file", type=argparse.FileType("r"), help="the prompt, read from a file")
    fixed.add_argument("--infill", help='fixed text with blanks to fill: "Before [BLANK:12] after"')
    fixed.add_argument("--pairs", help='JSON lines of {"source": ...}: a target for each; scored against any "target"')
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale C on the fixed text")
    p.add_argument("--bench", action="store_true", help="time an untrained (or --ckpt) model on random noise")
    p.add_argument("--model", default="elf-b", choices=list(MODEL_SIZES), help="size for --bench without a checkpoint")
    p.add_argument("--bench_batches", type=int, default=3)
    p.add_argument("--eval", action="store_true", help="report entropy and generative perplexity")
    p.add_argument("--samples", default=None, help="with --eval: judge the texts of this JSON-lines file")
    p.add_argument("--judge", default="gpt2-large", help="causal LM (transformers) for generative perplexity")
    p.add_argument("--results", default=None, help="JSON lines the --eval summary is appended to")
    p.add_argument("--trajectory", action="store_true", help="draw trajectory.png and trajectory_pca.png")
    args = p.parse_args(argv)
    if args.steps < 1 or args.num_samples < 1:
        sys.exit("error: --steps and --num_samples must be at least 1")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    args.results = args.results or os.path.join(os.path.dirname(args.samples or args.ckpt) or ".", "results.jsonl")
    if args.samples:                                   # judge texts made earlier; no model needed
        texts = [row["text"] for row in read_rows(args.samples, "text")]
        return judge_samples([tiktoken.get_encoding("gpt2").encode_ordinary(t) for t in texts], args, None, device)
    size = MODEL_SIZES[args.model] if args.bench and not os.path.exists(args.ckpt) else None   # --bench: untrained
    model = (ELF(ELFConfig(**size)) if size else load_model(args.ckpt, args.weights)).to(device).eval()
    cfg, length = model.cfg, args.length or model.cfg.block_size
    if not 1 <= length <= cfg.block_size:
        sys.exit(f"error: --length {length} is outside 1..{cfg.block_size} (the model's block_size)")
    pairs = read_rows(args.pairs, "source") if args.pairs else None
    rows = templates(args, pairs, length) if pairs or args.infill or args.prompt or args.prompt_file else None
    use_gpu = device.type == "cuda"
    denoise_fn = decode_fn = None
    if args.compile == "true" or (args.compile == "auto" and use_gpu):
        # Static shapes: CUDA graphs (reduce-overhead) remove launch overhead; their reused outputs are cloned.
        mode = "reduce-overhead" if use_gpu else "default"
        denoise_c, decode_c = torch.compile(model.denoise, mode=mode), torch.compile(model.decode, mode=mode)
        denoise_fn = lambda *a: denoise_c(*a).clone()  # noqa: E731
        decode_fn = lambda *a: decode_c(*a).clone()  # noqa: E731
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n = len(rows) if pairs else args.num_samples
    batch = args.batch_size if args.bench else min(args.batch_size, n)
    run = lambda k, cond=None, cond_tokens=None: generate(  # noqa: E731
        model, k, length, args.steps, args.sampler, args.gamma, args.scale, args.schedule, gen, denoise_fn, decode_fn,
        cond=cond, cond_tokens=cond_tokens, cfg_scale=args.cfg)
    with autocast:
        if args.trajectory:
            return trajectory(model, length, args, gen, os.path.dirname(args.ckpt) or ".")
        if args.bench:                                 # one warm-up batch (compilation, CUDA graphs), then timed ones
            for i in range(args.bench_batches + 1):
                if i == 1:                             # the clock starts after the warm-up batch
                    t0 = time.perf_counter()
                run(batch).cpu()                       # .cpu() waits for the GPU
            s = (time.perf_counter() - t0) / args.bench_batches
            gpu = torch.cuda.get_device_name(device) if use_gpu else None
            return print(json.dumps(dict(bench="sample", gpu=gpu, device=str(device), n_layer=cfg.n_layer,
                                         n_embd=cfg.n_embd, batch=batch, length=length, steps=args.steps,
                                         sampler=args.sampler, scale=args.scale, s_per_batch=round(s, 4),
                                         sequences_per_s=round(batch / s, 2))))
        t0, tokens = time.perf_counter(), []
        for start in range(0, n, batch):
            cond = condition_tensors(rows[start:start + batch], length, device) if rows else ()
            tokens += run(min(batch, n - start), *cond).tolist()
        seconds = time.perf_counter() - t0
    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", "samples.jsonl")
    texts = decode_texts([row[len(t):] for row, t in zip(tokens, rows)] if pairs else tokens)  # pairs: the targets
    with open(out, "w") as f:
        for i, text in enumerate(texts):
            print(f"--- sample {i} ---\n{text}")
            f.write(json.dumps({**(pairs[i] if pairs else {}), "text": text}) + "\n")
    if pairs:
        score_pairs(pairs, rows, tokens)
    print(f"{n} samples in {seconds:.1f} s ({seconds / n:.3f} s per sample); written to {out}")
    if args.eval:
        judge_samples(tokens, args, round(seconds / n, 4), device)

if __name__ == "__main__":
    main()
