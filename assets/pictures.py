"""Draw the README's pictures: the two diagrams (a training step, sampling), and, from a trained
model, the loss curve (its log.jsonl) and what the flow does on its way from noise to text.

    python assets/pictures.py                          # out/training_step.png, out/sampling.png
    python assets/pictures.py --ckpt out/ckpt.pt       # + loss.png, trajectory*.png
    python assets/pictures.py --ckpt embedded-language-flows/ELF-B-owt-torch --length=64
    python assets/pictures.py --out_dir=assets         # the README's own pictures, replaced
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # files only: no display, no global state
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's modules
import sample  # noqa: E402
from prepare_data import get_tokenizer  # noqa: E402

COLORS = dict(data="#dbe9f6", noise="#fde7c8", nograd="#eeeeee", net="#d9f0d3", loss="#f6d5d5",
              decode="#e7dcf3")

# ----------------------------------------------------------------------------------------------
# From a trained model

def loss_curve(log_path, png_path):
    """The training log's loss, mse, ce and val over the iterations (README: A first run)."""
    rows = [json.loads(line) for line in open(log_path)]
    ax = Figure(figsize=(7, 4)).subplots()
    for key in ("loss", "mse", "ce", "val"):
        points = [(r["iter"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if key == "val" else None)
    ax.set(xlabel="iteration", yscale="log", title="ELF training")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.figure.savefig(png_path, dpi=90, bbox_inches="tight")

@torch.no_grad()
def trajectory(model, settings, seed, out_dir, length=None, n_samples=2, n_rows=8, n_paths=6):
    """What the flow does: x_hat decoded at a few steps, and z_t's paths in a 2-D PCA. Returns the
    printed lines, "sample k, t = ... | text"."""
    gen = torch.Generator().manual_seed(sample.SEED_OFFSET + seed)
    states = []                                      # (t, z, x_hat) after each step
    tokens = sample.generate(model, n_samples, length or model.cfg.block_size, settings, gen,
                             on_step=lambda *s: states.append(s))
    w = torch.full((n_samples,), settings.scale)
    n_vocab = get_tokenizer(model.cfg.tokenizer).n_vocab
    picks = sorted({round(i * (len(states) - 1) / (n_rows - 1)) for i in range(n_rows)})
    texts = [sample.decode_texts(model, sample.argmax_tokens(model.decode(states[i][2], w),
                                                          n_vocab).tolist()) for i in picks]
    lines = [(k, states[i][0], texts[j][k]) for k in range(n_samples) for j, i in enumerate(picks)]
    ax = Figure(figsize=(12, 0.45 * len(lines) + 0.6)).subplots()
    for y, (k, t, text) in enumerate(lines):
        ax.text(0, -y, f"{k}: t = {t:.2f}   {text[:105]!r}", family="monospace", size=8)
    ax.set_axis_off()
    ax.set(ylim=(0.3 - len(lines), 0.7), title="x_hat decoded along the flow: noise (top) to text")
    ax.figure.savefig(os.path.join(out_dir, "trajectory.png"), dpi=90, bbox_inches="tight")
    paths = torch.stack([z[0, :n_paths].float() for _, z, _ in states])  # (steps, positions, d)
    xy = paths @ torch.linalg.eigh(torch.cov(paths.flatten(0, 1).T))[1][:, [-1, -2]]  # top-2 PCs
    ax = Figure(figsize=(6, 5)).subplots()
    for p, label in enumerate(sample.decode_texts(model, tokens[0, :n_paths, None].tolist())):
        ax.plot(xy[:, p, 0], xy[:, p, 1], marker=".", alpha=0.7)
        ax.annotate(repr(label), xy[-1, p].tolist(), fontsize=9)
    ax.set(title=f"z_t of {xy.size(1)} positions, t -> 1 (2-D PCA)", xticks=[], yticks=[])
    ax.figure.savefig(os.path.join(out_dir, "trajectory_pca.png"), dpi=90, bbox_inches="tight")
    return [f"sample {k}, t = {t:.3f} | {text!r}" for k, t, text in lines]

# ----------------------------------------------------------------------------------------------
# The diagrams (README: Training objective, Sampling), with the paper's settings

def box(ax, x, y, w, h, title, body, color, dashed=False, body_size=9.5):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="#444444", lw=1.3, ls="--" if dashed else "-"))
    ax.text(x + w / 2, y + h - 0.2, title, ha="center", va="top", fontsize=11, weight="bold")
    ax.text(x + w / 2, y + h - 0.58, body, ha="center", va="top", fontsize=body_size,
            linespacing=1.45)

def arrow(ax, a, b, text="", offset=(0.08, 0.0), ha="left", rad=0.0):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, lw=1.3,
                                 color="#333333", connectionstyle=f"arc3,rad={rad}"))
    if text:
        x, y = (a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1]
        ax.text(x, y, text, fontsize=9, ha=ha, va="center", style="italic", color="#333333")

def training_step(png_path):
    ax = Figure(figsize=(12.5, 11)).subplots()
    ax.set(xlim=(0, 12.5), ylim=(0, 11))
    ax.set_axis_off()
    ax.text(6.25, 10.75, "One training step of ELF: one mixed batch, one optimizer step",
            ha="center", fontsize=14, weight="bold")
    box(ax, 0.6, 9.0, 4.6, 1.2, "tokens s", "B windows of L token ids", COLORS["data"])
    box(ax, 7.3, 9.0, 4.6, 1.2, r"embeddings $x = E(s)$",
        "a frozen Gaussian table (a vector of d\nnumbers per token), or a frozen T5 encoder",
        COLORS["data"])
    arrow(ax, (5.2, 9.6), (7.3, 9.6))
    box(ax, 0.3, 6.45, 5.7, 1.85, "denoise rows (80 %)",
        r"time $t = \mathrm{sigmoid}(n),\ n \sim N(-1.5,\ 0.8)$ (mostly noisy)" "\n"
        r"$z_t = t\,x + (1-t)\,\sigma\,\epsilon$,   mode tokens off" "\n"
        r"guidance scale $w \in [0.5,\ 5]$ (log-uniform $w+1$)", COLORS["noise"])
    box(ax, 6.5, 6.45, 5.7, 1.85, "decode rows (20 %)",
        r"$t = 1$, mode tokens on, $x_{sc} = 0$" "\n"
        r"each token corrupted: $z = \lambda x + (1-\lambda)\,s_{dec}\,\epsilon$" "\n"
        r"$\lambda = \mathrm{sigmoid}(N(0.8,\ 0.8))$ per token", COLORS["decode"])
    arrow(ax, (8.4, 9.0), (3.6, 8.33), "each row gets a role", offset=(0.25, -0.2), ha="center")
    arrow(ax, (9.6, 9.0), (9.35, 8.33))
    box(ax, 0.3, 4.35, 5.7, 1.45, "self-conditioning pass (no gradient)",
        r"half of the denoise rows: $x_{sc} = \hat{x}$ of $f(z_t, t, w, x_{sc}{=}0)$" "\n"
        r"all other rows: $x_{sc} = 0$", COLORS["nograd"], dashed=True)
    arrow(ax, (3.15, 6.45), (3.15, 5.83))
    box(ax, 2.2, 2.45, 8.1, 1.3, "main pass: the one with gradients",
        r"hidden $= f(z,\ t,\ w,\ x_{sc},\ \mathrm{mode})$: one transformer, every row",
        COLORS["net"])
    arrow(ax, (3.15, 4.35), (4.2, 3.78), r"$x_{sc}$", offset=(0.1, 0.1))
    arrow(ax, (6.0, 6.9), (6.6, 3.78), r"$z_t,\ t,\ w$", offset=(0.1, 0.3))
    arrow(ax, (9.35, 6.45), (8.9, 3.78), r"$z,\ t{=}1$, mode on", offset=(0.12, 0.2))
    box(ax, 0.3, 0.85, 5.7, 1.3, r"denoise head $\to \hat{x}$ (denoise rows)",
        r"velocity MSE: $\hat{v} = (\hat{x} - z)/\max(1-t,\ t_\epsilon)$ against" "\n"
        r"$v = (x - z)/\max(1-t,\ t_\epsilon)$ (+ guidance on self-cond. rows)",
        COLORS["loss"])
    box(ax, 6.5, 0.85, 5.7, 1.3, r"decode head $\to$ logits (decode rows)",
        "cross-entropy of the logits over the vocabulary\nagainst the tokens s", COLORS["loss"])
    arrow(ax, (4.2, 2.45), (3.15, 2.18))
    arrow(ax, (8.3, 2.45), (9.35, 2.18))
    ax.text(6.25, 0.3, "loss = (sum of decode CE + sum of denoise MSE) / number of tokens",
            ha="center", fontsize=11, weight="bold",
            bbox=dict(boxstyle="round,pad=0.35", fc="white", ec="#aa4444"))
    ax.figure.savefig(png_path, dpi=110, bbox_inches="tight")

def sampling(png_path):
    ax = Figure(figsize=(13, 5.9)).add_axes([0, 0.3, 1, 0.7])     # the time grid goes below
    ax.set(xlim=(0, 13), ylim=(0.55, 4.6))
    ax.set_axis_off()
    ax.text(6.5, 4.4, "Sampling: N flow steps in denoise mode, then one pass in decode mode",
            ha="center", fontsize=14, weight="bold")
    box(ax, 0.1, 1.5, 2.2, 1.9, r"start: $t = 0$",
        "pure noise\n" r"$z = \sigma\,\epsilon$" "\n" r"$x_{prev} = 0$" "\n" r"$w$ fixed (3)",
        COLORS["noise"], body_size=10.5)
    box(ax, 2.9, 1.3, 5.3, 2.7, r"step $i$: from $t_i$ to $t_{i+1}$",
        r"churn (SDE): $\alpha = \mathrm{clip}(1 - \gamma\,(t_{i+1} - t_i),\ 0,\ 1)$" "\n"
        r"back to $t_b = \alpha\,t_i$:  $z_b = \alpha\,z + (1-\alpha)\,\sigma\,\epsilon'$" "\n"
        r"denoise pass:  $\hat{x} = f(z_b,\ t_b,\ w,\ x_{sc} = x_{prev})$" "\n"
        r"Euler:  $z = z_b + (t_{i+1} - t_b)\,(\hat{x} - z_b)\,/\,\max(1 - t_b,\ t_\epsilon)$" "\n"
        r"$x_{prev} = \hat{x}$" "\n"
        r"(ODE: $\gamma = 0$; the last step is always ODE," "\n"
        r"so it lands on $t = 1$ with $z = \hat{x}$)", COLORS["net"], body_size=10.5)
    arrow(ax, (7.3, 1.3), (3.8, 1.3), rad=-0.25)
    ax.text(5.55, 0.72, "repeat N times (32 by default)", ha="center", fontsize=10,
            style="italic")
    box(ax, 8.7, 1.5, 2.3, 1.9, "decode pass",
        r"$f(z,\ t{=}1,\ w,\ x_{sc}{=}0,$" "\n" "mode on)\n" r"$\to$ logits", COLORS["decode"])
    box(ax, 11.5, 1.5, 1.45, 1.9, "argmax", "a token\nper position\n" r"$\to$ text",
        COLORS["data"])
    for a, b in [((2.3, 2.45), (2.9, 2.45)), ((8.2, 2.45), (8.7, 2.45)),
                 ((11.0, 2.45), (11.5, 2.45))]:
        arrow(ax, a, b)
    grid_ax = ax.figure.add_axes([0.09, 0.07, 0.84, 0.14])
    draws = np.random.default_rng(0).standard_normal(31)
    inner = np.sort(1 / (1 + np.exp(-(-1.5 + 0.8 * draws))))    # the training times' law
    grid_ax.vlines(np.concatenate([[0.0], inner, [1.0]]), 0, 1, color="#2a7a2a", lw=1.4)
    grid_ax.vlines(np.linspace(0, 1, 33), -1.2, -0.2, color="#888888", lw=1.2)
    grid_ax.set(xlim=(-0.01, 1.01), ylim=(-1.4, 1.2))
    grid_ax.set_yticks([0.5, -0.7], ["logit-normal\n(the paper's)", "uniform"], fontsize=9.5)
    grid_ax.set_xlabel(r"$t$ (0 = noise, 1 = data): the times $t_0 \ldots t_{32}$ of a "
                       "32-step grid", fontsize=10.5)
    for side in ("top", "right", "left"):
        grid_ax.spines[side].set_visible(False)
    ax.figure.savefig(png_path, dpi=110, bbox_inches="tight")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a checkpoint (as sample.py's --ckpt): its log and its flow")
    p.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--length", type=int, help="tokens per sample (default: block_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default="out", help="assets: replace the README's pictures")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)          # a new folder is fine, as for train.py
    training_step(os.path.join(args.out_dir, "training_step.png"))
    sampling(os.path.join(args.out_dir, "sampling.png"))
    if args.ckpt:
        log_path = os.path.join(os.path.dirname(args.ckpt), "log.jsonl")
        if os.path.exists(log_path):
            loss_curve(log_path, os.path.join(args.out_dir, "loss.png"))
        model, train_config = sample.load_checkpoint(args.ckpt)   # also the authors' (README)
        settings = sample.settings_from(train_config, steps=args.steps)
        lines = trajectory(model.eval(), settings, args.seed, args.out_dir, args.length)
        print("\n".join(lines))
    print(f"wrote the pictures to {args.out_dir}")

if __name__ == "__main__":
    main()
