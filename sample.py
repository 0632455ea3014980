"""
Sample from a trained ELF model: integrate the flow from noise (t = 0) to embeddings (t = 1) with the
SDE (or ODE) sampler, then one decode-mode pass and an argmax per position (§5).

    python sample.py                                  # 4 samples from out/ckpt.pt (EMA weights)
    python sample.py --num_samples=8 --steps=64 --gamma=1.0 --scale=3.0 --sampler=sde
    python sample.py --bench --model=elf-b            # random init, prints sequences/s as JSON
"""
import argparse
import json
import os
import sys
import time

import torch

from elf import ELF, ELFConfig, MODEL_SIZES, argmax_tokens, sde_step, time_grid

EOT, N_VOCAB = 50256, 50257  # GPT-2's end-of-text token and its real vocabulary size (before padding)


@torch.no_grad()
def generate(model, num_samples, length, steps=32, sampler="sde", gamma=1.5, scale=3.0,
             schedule="logit_normal", generator=None, denoise_fn=None, decode_fn=None):
    """Token ids (num_samples, length). denoise_fn/decode_fn default to the model's own methods;
    sample.py passes compiled versions of them on the GPU."""
    cfg = model.cfg
    device = next(model.parameters()).device
    denoise_fn = denoise_fn or model.denoise
    decode_fn = decode_fn or model.decode
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
    return argmax_tokens(decode_fn(z, w), N_VOCAB)  # the same network in decode mode, then argmax


def decode_texts(tokens):
    """Token ids -> strings, each cut at its first end-of-text token."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    texts = []
    for row in tokens.tolist():
        if EOT in row:
            row = row[:row.index(EOT)]
        texts.append(enc.decode(row))
    return texts


def show(model, num_samples, steps, seed):
    """Print a few samples of the model's full length, for train.py's evaluations."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for text in decode_texts(generate(model, num_samples, model.cfg.block_size, steps, generator=gen)):
        print("  | " + text.replace("\n", "\n  | "))


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
    args = p.parse_args(argv)
    if args.steps < 1 or args.num_samples < 1:
        sys.exit("error: --steps and --num_samples must be at least 1")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if args.bench and not os.path.exists(args.ckpt):
        model = ELF(ELFConfig(**MODEL_SIZES[args.model])).to(device).eval()
    else:
        model, _ = load_model(args.ckpt, args.weights, device)
    cfg = model.cfg
    length = args.length or cfg.block_size
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
    sync = torch.cuda.synchronize if use_gpu else (lambda: None)
    with autocast:
        if args.bench:
            run(batch)  # warm-up (compilation, CUDA graph capture)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.bench_batches):
                run(batch)
            sync()
            s = (time.perf_counter() - t0) / args.bench_batches
            print(json.dumps({"bench": "sample", "device": str(device), "gpu": torch.cuda.get_device_name(device) if use_gpu else None,
                              "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "batch": batch, "length": length,
                              "steps": args.steps, "sampler": args.sampler, "scale": args.scale,
                              "s_per_batch": round(s, 4), "sequences_per_s": round(batch / s, 2)}))
            return
        t0, tokens = time.perf_counter(), []
        for start in range(0, args.num_samples, batch):
            tokens.append(run(min(batch, args.num_samples - start)).cpu())
        seconds = time.perf_counter() - t0
    texts = decode_texts(torch.cat(tokens))
    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", "samples.jsonl")
    with open(out, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    print(f"{len(texts)} samples in {seconds:.1f} s ({seconds / len(texts):.3f} s per sample); written to {out}")


if __name__ == "__main__":
    main()
