"""
Sample from a trained ELF model: integrate the flow from noise (t = 0) to embeddings (t = 1) with the
SDE (or ODE) sampler, then one decode-mode pass and an argmax per position (§5).

    python sample.py                                  # 4 samples from out/ckpt.pt (EMA weights)
    python sample.py --num_samples=8 --steps=64 --gamma=1.0 --scale=3.0 --sampler=sde
    python sample.py --eval                           # + entropy and generative perplexity (GPT-2 Large)
    python sample.py --eval --samples=out/samples.jsonl   # score texts made earlier
    python sample.py --trajectory                     # pictures of the flow: trajectory*.png
    python sample.py --bench --model=elf-b            # random init, prints sequences/s as JSON
"""
import argparse
import json
import math
import os
import sys
import time

import torch

from elf import (ELF, EOT, ELFConfig, MODEL_SIZES, N_VOCAB, argmax_tokens, cut_at_eot, pooled_nll, sde_step,
                 time_grid, unigram_entropy)

@torch.no_grad()
def generate(model, num_samples, length, steps=32, sampler="sde", gamma=1.5, scale=3.0,
             schedule="logit_normal", generator=None, denoise_fn=None, decode_fn=None, on_step=None):
    """Token ids (num_samples, length). denoise_fn/decode_fn default to the model's own methods;
    sample.py passes compiled versions of them on the GPU. on_step(t_next, z, x_hat) sees every step."""
    cfg, device = model.cfg, next(model.parameters()).device
    denoise_fn, decode_fn = denoise_fn or model.denoise, decode_fn or model.decode
    w = torch.full((num_samples,), float(scale), device=device)
    grid = time_grid(steps, schedule, cfg, generator).tolist()  # floats on the host: no syncs in the loop
    randn = lambda: torch.randn(num_samples, length, cfg.embed_dim, generator=generator, device=device)  # noqa: E731
    z = cfg.noise_scale * randn()                      # start from pure noise at t = 0
    x_prev = torch.zeros_like(z)                       # self-conditioning input starts at zero
    for i in range(steps):
        # SDE steps with churn gamma, except the last step, always an ODE step onto t = 1.
        g = gamma if sampler == "sde" and i < steps - 1 else 0.0
        noise = randn() if g > 0 else None
        z, x_prev = sde_step(lambda z_, t_, xs: denoise_fn(z_, t_, w, xs), z, x_prev, grid[i], grid[i + 1],
                             g, noise, cfg)
        x_prev = x_prev.to(z.dtype)
        if on_step:
            on_step(grid[i + 1], z, x_prev)
    return argmax_tokens(decode_fn(z, w), N_VOCAB)  # the same network in decode mode, then argmax

def decode_texts(tokens):
    """Token ids -> strings, each cut at its first end-of-text token."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    return [enc.decode([t for t in cut_at_eot(row) if t != EOT]) for row in tokens.tolist()]

# ----------------------------------------------------------------------------------------------
# Judging samples (ELF.md §7): entropy and generative perplexity (elf.py), always reported together.

def load_judge(name, device):
    """A causal LM from `transformers`, or None with a one-line reason (it is an optional dependency)."""
    try:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(name).to(device).eval()
    except ImportError:
        print("no generative perplexity: the judge needs `pip install transformers`; entropy only")
    except Exception as e:
        print(f"no generative perplexity: cannot load judge {name!r} ({type(e).__name__}); entropy only")
    return None

def judge_samples(token_rows, args, seconds_per_sample, device):
    """Print and append to the results file one JSON line: gen_ppl, entropy and the sampling settings."""
    samples = [cut_at_eot(row) for row in token_rows]
    entropy = sum(unigram_entropy([t for t in s if t != EOT]) for s in samples) / len(samples)
    judge = load_judge(args.judge, device)
    gen_ppl = None
    if judge is not None:
        total, count = pooled_nll(judge, samples)
        gen_ppl = round(math.exp(total / max(count, 1)), 3)
    summary = {"gen_ppl": gen_ppl, "entropy": round(entropy, 4), "n": len(samples), "judge": args.judge,
               "steps": args.steps, "sampler": args.sampler, "gamma": args.gamma, "scale": args.scale,
               "s_per_sample": seconds_per_sample, "source": args.samples or args.ckpt}
    print(json.dumps(summary))
    with open(args.results, "a") as f:
        f.write(json.dumps(summary) + "\n")

def show(model, num_samples, steps, seed):
    """Print a few samples of the model's full length, for train.py's evaluations."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for text in decode_texts(generate(model, num_samples, model.cfg.block_size, steps, generator=gen)):
        print("  | " + text.replace("\n", "\n  | "))

# ----------------------------------------------------------------------------------------------
# Pictures (matplotlib, imported only when drawing).

def pyplot():
    import matplotlib
    matplotlib.use("Agg")                              # files only, no display needed
    import matplotlib.pyplot as plt
    return plt

def plot_losses(log_path, png_path):
    """loss.png from train.py's log.jsonl: training loss, its MSE and CE parts, and the val objective."""
    plt, rows = pyplot(), [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "mse", "ce", "val"):
        points = [(r["iter"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if key == "val" else None)
    ax.set(xlabel="iteration", yscale="log", title="ELF training")
    ax.legend(), ax.grid(alpha=0.3)
    fig.savefig(png_path + ".tmp.png", dpi=90, bbox_inches="tight")
    os.replace(png_path + ".tmp.png", png_path)        # the old picture stays until the new one is whole
    plt.close(fig)

@torch.no_grad()
def trajectory(model, length, args, gen, out_dir, n_samples=2, n_rows=8, n_paths=6):
    """What the flow does: x_hat decoded to text (decode mode at t = 1 on x_hat) at a few steps of a few
    samples, and the paths of some positions' z_t in a 2-D PCA of embedding space, labelled with their tokens."""
    states, w = [], torch.full((n_samples,), args.scale, device=gen.device)
    tokens = generate(model, n_samples, length, args.steps, args.sampler, args.gamma, args.scale, args.schedule, gen,
                      on_step=lambda t, z, x_hat: states.append((t, z[0].float().cpu(), x_hat)))
    picks = sorted({round(i * (len(states) - 1) / (n_rows - 1)) for i in range(n_rows)})
    texts = [decode_texts(argmax_tokens(model.decode(states[i][2], w), N_VOCAB)) for i in picks]  # [row][sample]
    rows = [(k, states[i][0], texts[j][k]) for k in range(n_samples) for j, i in enumerate(picks)]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(rows) + 0.6))
    for y, (k, t, text) in enumerate(rows):
        print(f"sample {k}, t = {t:.3f} | {text!r}")
        ax.text(0, len(rows) - y, f"{k}: t = {t:.2f}   {text[:105]!r}", family="monospace", fontsize=8, va="center")
    ax.set_axis_off(), ax.set(ylim=(0.3, len(rows) + 0.7), title="x_hat decoded along the flow: noise (top) to text")
    fig.savefig(os.path.join(out_dir, "trajectory.png"), dpi=90, bbox_inches="tight")
    paths = torch.stack([z[:n_paths] for _, z, _ in states])          # (steps, positions, d)
    paths = paths - paths.flatten(0, 1).mean(0)
    xy = paths @ torch.linalg.svd(paths.flatten(0, 1), full_matrices=False)[2][:2].T  # top-2 principal axes
    fig, ax = plt.subplots(figsize=(6, 5))
    for p, label in enumerate(decode_texts(tokens[0, :n_paths, None])):
        ax.plot(xy[:, p, 0], xy[:, p, 1], marker=".", alpha=0.7)
        ax.annotate(repr(label), xy[-1, p].tolist(), fontsize=9)
    ax.set(title=f"z_t of {xy.size(1)} positions, t -> 1 (2-D PCA)", xticks=[], yticks=[])
    fig.savefig(os.path.join(out_dir, "trajectory_pca.png"), dpi=90, bbox_inches="tight")
    plt.close("all")
    print(f"wrote {out_dir}/trajectory.png and trajectory_pca.png")

def load_model(ckpt_path, weights, device):
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
    return model.to(device).eval(), ckpt

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        if not os.path.exists(args.samples) or not open(args.samples).read().strip():
            sys.exit(f"error: no samples in {args.samples}: pass a JSON-lines file of {{\"text\": ...}} rows")
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        rows = [enc.encode_ordinary(json.loads(line)["text"]) for line in open(args.samples) if line.strip()]
        return judge_samples(rows, args, None, device)
    if args.bench and not os.path.exists(args.ckpt):
        model = ELF(ELFConfig(**MODEL_SIZES[args.model])).to(device).eval()
    else:
        model, _ = load_model(args.ckpt, args.weights, device)
    cfg, length = model.cfg, args.length or model.cfg.block_size
    if not 1 <= length <= cfg.block_size:
        sys.exit(f"error: --length {length} is outside 1..{cfg.block_size} (the model's block_size)")
    use_gpu = device.type == "cuda"
    denoise_fn = decode_fn = None
    if args.compile == "true" or (args.compile == "auto" and use_gpu):
        # Sampling shapes are static, so CUDA graphs (reduce-overhead) remove the launch overhead.
        # A CUDA graph reuses its output buffers, so each result is cloned before the next call.
        mode = "reduce-overhead" if use_gpu else "default"
        denoise_c, decode_c = torch.compile(model.denoise, mode=mode), torch.compile(model.decode, mode=mode)
        denoise_fn = lambda *a: denoise_c(*a).clone()  # noqa: E731
        decode_fn = lambda *a: decode_c(*a).clone()  # noqa: E731
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batch = args.batch_size if args.bench else min(args.batch_size, args.num_samples)
    run = lambda n: generate(model, n, length, args.steps, args.sampler, args.gamma, args.scale,  # noqa: E731
                             args.schedule, gen, denoise_fn, decode_fn)
    with autocast:
        if args.trajectory:
            return trajectory(model, length, args, gen, os.path.dirname(args.ckpt) or ".")
        if args.bench:                                 # one warm-up batch (compilation, CUDA graphs), then timed ones
            for i in range(args.bench_batches + 1):
                if i == 1:                             # the clock starts after the warm-up batch
                    t0 = time.perf_counter()
                run(batch).cpu()                       # .cpu() waits for the GPU
            s = (time.perf_counter() - t0) / args.bench_batches
            return print(json.dumps({"bench": "sample", "gpu": torch.cuda.get_device_name(device) if use_gpu else None,
                                     "device": str(device), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "batch": batch,
                                     "length": length, "steps": args.steps, "sampler": args.sampler, "scale": args.scale,
                                     "s_per_batch": round(s, 4), "sequences_per_s": round(batch / s, 2)}))
        t0, tokens = time.perf_counter(), []
        for start in range(0, args.num_samples, batch):
            tokens.append(run(min(batch, args.num_samples - start)).cpu())
        seconds = time.perf_counter() - t0
    texts = decode_texts(torch.cat(tokens))
    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", "samples.jsonl")
    with open(out, "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    print(f"{len(texts)} samples in {seconds:.1f} s ({seconds / len(texts):.3f} s per sample); written to {out}")
    if args.eval:
        judge_samples(torch.cat(tokens).tolist(), args, round(seconds / len(texts), 4), device)

if __name__ == "__main__":
    main()
