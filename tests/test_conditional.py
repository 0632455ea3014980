"""Conditional ELF (README: Conditions): condition masks, their loss and inputs, classifier-free
guidance, the sampler holding the condition, paired data, and --prompt / --infill / --pairs end to
end."""

import json
import random

import numpy as np
import pytest
import torch

import prepare_data
import sample
import train
from elf import (
    ELF,
    Draws,
    ELFConfig,
    conditioned,
    draw_condition,
    draw_training_noise,
    elf_loss,
    velocity,
)
from test_elf import HAND, TINY, LinearToyModel, hand_terms

TINY_ARGS = [
    "--n_layer=2",
    "--n_embd=64",
    "--n_head=2",
    "--embed_dim=32",
    "--bottleneck_dim=32",
    "--batch_size=16",
    "--warmup_iters=20",
    "--eval_iters=1",
    "--sample_steps=4",
    "--num_eval_samples=1",
    "--log_interval=50",
    "--self_cond_prob=0.5",  # the paper's recipe, not the cpu preset's
    "--lr_schedule=constant",
    "--t_mean=-1.5",
]
WORDS = ["red", "blue", "green", "cat", "dog", "sun"]


def reverse_pairs(n, seed=0, longest=4):
    """The synthetic sequence-to-sequence task: a list of words, and the same list reversed."""
    rng = random.Random(seed)
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, longest))]
        yield {"source": " ".join(words), "target": " ".join(reversed(words))}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)

EOT = 50256  # GPT-2's end-of-text


# ----------------------------------------------------------------------------------------------
# Training: masks, loss, inputs, dropout


def test_condition_mixture():
    g = torch.Generator().manual_seed(0)
    prefixes = draw_condition(ELFConfig(cond_prefix_prob=1.0), 500, 16, g)
    assert torch.all(prefixes[:, 1:] <= prefixes[:, :-1])  # clean from position 0, then generated
    spans = draw_condition(ELFConfig(cond_span_prob=1.0), 500, 16, g).int()
    starts = (spans[:, 1:] > spans[:, :-1]).sum(1) + spans[:, 0]
    assert starts.max() <= 3 and (starts >= 2).any()  # one to three clean spans anywhere
    mixed = draw_condition(ELFConfig(cond_prefix_prob=0.25, cond_span_prob=0.25), 4000, 16, g)
    assert mixed.any(1).float().mean().item() == pytest.approx(0.5, abs=0.04)
    assert (
        draw_training_noise(ELFConfig(**TINY), 4, 8, g, g).cond is None
    )  # the paper's default: unconditional
    drawn = draw_training_noise(
        ELFConfig(**TINY, cond_span_prob=1.0, cond_drop_prob=0.1), 4000, 8, g, g
    )
    assert drawn.drop.float().mean().item() == pytest.approx(0.1, abs=0.02)


def test_condition_positions_are_out_of_the_loss():
    """The hand computation of test_elf with condition positions: the linear toy mixes no positions,
    so the loss is exactly the hand terms of the other positions, over their number."""
    cfg = ELFConfig(vocab_size=3, embed_dim=2, noise_scale=2.0, t_eps=0.05, decoder_noise_scale=5.0)
    cond = torch.tensor([[True, False], [False, True], [True, False]])
    draws = Draws(
        1, 1, HAND["t"], HAND["w"], HAND["eps"], HAND["lam"], cond, torch.zeros(3, dtype=torch.bool)
    )
    loss, mse, ce = elf_loss(LinearToyModel(cfg, HAND["table"]), HAND["tokens"], draws)
    kept = {k: v for k, v in hand_terms(**HAND).items() if not cond[k]}
    mses, ces = (
        [v for kind, v in kept.values() if kind == "mse"],
        [v for kind, v in kept.values() if kind == "ce"],
    )
    assert loss.item() == pytest.approx((sum(mses) + sum(ces)) / 3, rel=1e-5)
    assert mse.item() == pytest.approx(sum(mses) / 2, rel=1e-5) and ce.item() == pytest.approx(
        ces[0], rel=1e-5
    )


class Recorder(LinearToyModel):
    """The linear toy, remembering the z and x_sc of every pass."""

    def forward(self, z, t, w, x_sc, decode):
        self.seen.append((z.clone(), x_sc.clone()))
        return super().forward(z, t, w, x_sc, decode)


@pytest.mark.parametrize("dropped", [False, True])
def test_condition_inputs_are_clean_embeddings_or_dropped_to_zero(dropped):
    cfg = ELFConfig(vocab_size=3, embed_dim=2)
    model = Recorder(cfg, HAND["table"])
    model.seen = []
    cond = torch.tensor([[True, False], [False, True], [True, True]])
    draws = Draws(
        1, 1, HAND["t"], HAND["w"], HAND["eps"], HAND["lam"], cond, torch.full((3,), dropped)
    )
    elf_loss(model, HAND["tokens"], draws)
    assert len(model.seen) == 2  # the self-conditioning pass, the main pass
    for z, x_sc in model.seen:
        rows = cond[: len(z)]
        clean = torch.zeros_like(z) if dropped else HAND["table"][HAND["tokens"][: len(z)]]
        assert torch.equal(z[rows], clean[rows])
        clean[2:] = 0  # the decode row's x_sc is zero, its condition too (as the authors' code)
        assert torch.equal(x_sc[rows], clean[rows])


def test_a_dropped_condition_is_really_absent():
    """With the condition dropped, what the condition says changes nothing; kept, it does."""
    model = ELF(ELFConfig(**TINY))
    torch.nn.init.normal_(model.x_head.weight, std=0.2)
    tokens = torch.randint(0, 128, (6, 8), generator=torch.Generator().manual_seed(0))
    other = tokens.clone()
    other[:, :3] = (tokens[:, :3] + 1) % 128  # different condition tokens
    cond = torch.zeros(6, 8, dtype=torch.bool)
    cond[:, :3] = True
    for dropped, same in ((True, True), (False, False)):
        draws = draw_training_noise(
            model.cfg,
            6,
            8,
            torch.Generator().manual_seed(1),
            torch.Generator().manual_seed(2),
            cond=cond,
        )
        draws.n_self_cond, draws.n_decode, draws.drop = 2, 2, torch.full((6,), dropped)
        draws.t[-2:] = 1.0
        a, b = elf_loss(model, tokens, draws)[0], elf_loss(model, other, draws)[0]
        assert torch.equal(a, b) == same


# ----------------------------------------------------------------------------------------------
# Sampling: the condition held at every step, classifier-free guidance


def test_cfg_combines_two_passes():
    torch.manual_seed(0)  # unseeded, float32 round-off failed allclose about 1 run in 5
    seen = []

    def denoise(z, t, x_sc):
        seen.append((z.clone(), x_sc.clone()))
        return 0.5 * z + x_sc + len(seen)  # any function, different per pass

    z, x_sc, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.tensor([0.3, 0.6])
    cond = torch.tensor([[True, True, False, False, False]] * 2)
    x_cond = torch.where(cond[..., None], torch.randn(2, 5, 4), 0.0)
    x = conditioned(denoise, cond, x_cond, cfg_scale=2.5)(z, t, x_sc)
    (z_c, sc_c), (z_u, sc_u) = seen
    assert torch.equal(z_c[cond], x_cond[cond]) and torch.equal(sc_c[cond], x_cond[cond])
    assert torch.all(z_u[cond] == 0) and torch.all(
        sc_u[cond] == 0
    )  # the unconditional pass: condition dropped
    free = ~cond
    assert torch.equal(z_c[free], z[free]) and torch.equal(z_u[free], z[free])
    x_c, x_u = 0.5 * z_c + sc_c + 1, 0.5 * z_u + sc_u + 2
    v_c, v_u = velocity(x_c, z, t, 0.05), velocity(x_u, z, t, 0.05)
    assert torch.allclose(velocity(x, z, t, 0.05)[free], (v_u + 2.5 * (v_c - v_u))[free])
    seen.clear()
    conditioned(denoise, cond, x_cond, cfg_scale=1.0)(z, t, x_sc)
    assert len(seen) == 1  # C = 1: one pass


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_sampler_holds_the_condition_at_every_step(cfg_scale):
    model = ELF(ELFConfig(**TINY))
    torch.nn.init.normal_(model.x_head.weight, std=0.2)
    cond = torch.zeros(3, 8, dtype=torch.bool)
    cond[:, :3], cond[1, 6] = True, True
    cond_tokens = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(0))
    x_cond = model.embed(cond_tokens)
    steps = []

    def check(t, z, x_hat):
        steps.append(t)
        assert torch.equal(z[cond], x_cond[cond])

    settings = sample.SamplerConfig(steps=6, cfg_scale=cfg_scale)
    tokens = sample.generate(
        model,
        3,
        8,
        settings,
        generator=torch.Generator().manual_seed(1),
        on_step=check,
        cond=cond,
        cond_tokens=cond_tokens,
    )
    assert len(steps) == 6 and steps[-1] == 1.0
    assert torch.equal(tokens[cond], cond_tokens[cond])


# ----------------------------------------------------------------------------------------------
# Paired data and the command lines


def test_prepare_pairs_builds_fixed_length_examples(tmp_path, capsys):
    pairs = [
        {"source": "red cat", "target": "cat red"},
        {"source": "blue " * 20, "target": "sun"},
        {"source": "dog", "target": "green " * 20},
        {"source": "sun", "target": "dog"},
    ]
    prepare_data.main(
        [
            "--pairs",
            write_jsonl(tmp_path / "p.jsonl", pairs),
            "--block_size=8",
            "--out_dir",
            str(tmp_path / "data"),
            "--val_fraction=0.25",
        ]
    )
    assert "1 sources, 1 targets cut" in capsys.readouterr().out
    folder = tmp_path / "data" / "p"
    train_rows, val_rows = (
        np.fromfile(folder / f"p_{split}.bin", np.uint16, offset=1024).reshape(-1, 8).tolist()
        for split in ("train_000001", "val_000000")
    )
    meta = json.loads((tmp_path / "data" / "p" / "meta.json").read_text())
    assert len(train_rows) == 3 and len(val_rows) == 1 and meta["pairs"] and meta["block_size"] == 8
    enc = prepare_data.get_tokenizer()
    red_cat, cat_red, sun = (
        enc.encode("red cat"),
        enc.encode("cat red"),
        enc.encode("sun"),
    )
    assert (
        train_rows[0] == red_cat + [EOT] + cat_red + [EOT] * 3
    )  # source, end-of-text, target, padding
    assert train_rows[1][5:] == [EOT] + sun + [EOT]  # the long source gives way to the target
    assert (
        train_rows[2][1] == EOT and EOT not in train_rows[2][2:]
    )  # the long target fills the rest
    (tmp_path / "bad.jsonl").write_text('{"source": "a"}\n')
    with pytest.raises(SystemExit):
        prepare_data.main(
            ["--pairs", str(tmp_path / "bad.jsonl"), "--out_dir", str(tmp_path / "data")]
        )


def test_pairs_need_their_own_block_size(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", reverse_pairs(20))
    prepare_data.main(["--pairs", path, "--block_size=12", "--out_dir", str(tmp_path / "data")])
    with pytest.raises(train.RunError, match="pass --block_size=12"):
        train.main(
            [
                "--dataset=p",
                f"--data_dir={tmp_path / 'data'}",
                f"--out_dir={tmp_path / 'o'}",
                *TINY_ARGS,
                "--block_size=16",
            ]
        )


@pytest.fixture(scope="module")
def reverse_model(tmp_path_factory):
    """A tiny model that memorised six reversals (prepare_data.py --pairs, then train.py)."""
    tmp = tmp_path_factory.mktemp("reverse")
    pairs = write_jsonl(tmp / "r.jsonl", reverse_pairs(8, longest=3))
    prepare_data.main(
        ["--pairs", pairs, "--block_size=10", "--out_dir", str(tmp / "data"), "--val_fraction=0.25"]
    )
    train.main(
        [
            "--dataset=r",
            f"--data_dir={tmp / 'data'}",
            f"--out_dir={tmp / 'out'}",
            *TINY_ARGS,
            "--block_size=10",
            "--max_iters=400",  # 300 left seed 0's EMA 5 / 6 right once decode x_sc became zero
            "--eval_interval=400",
        ]
    )
    train_pairs = write_jsonl(tmp / "train.jsonl", list(reverse_pairs(8, longest=3))[:6])
    return str(tmp / "out" / "ckpt.pt"), train_pairs


@pytest.mark.parametrize("cfg_scale", ["1", "2"])
def test_pairs_end_to_end(reverse_model, tmp_path, capsys, cfg_scale):
    ckpt, pairs = reverse_model
    out = str(tmp_path / "targets.jsonl")
    sample.main(
        [
            "--ckpt",
            ckpt,
            "--pairs",
            pairs,
            f"--cfg_scale={cfg_scale}",
            f"--out={out}",
            "--steps=16",
            "--sampler=ode",
            "--scale=1",
        ]
    )
    assert "exact_match 100.0" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(out)]
    assert [r["text"] for r in rows] == [r["target"] for r in rows]


def test_prompt_and_infill_keep_the_fixed_text(reverse_model, tmp_path):
    ckpt, _ = reverse_model
    out = str(tmp_path / "s.jsonl")
    (tmp_path / "prompt.txt").write_text("red cat")
    for prompt in (["--prompt", "red cat"], ["--prompt_file", str(tmp_path / "prompt.txt")]):
        sample.main(["--ckpt", ckpt, *prompt, "--num_samples=2", f"--out={out}"])
        assert all(json.loads(line)["text"].startswith("red cat") for line in open(out))
    enc = prepare_data.get_tokenizer()
    args = sample.argparse.Namespace(
        pairs=None, infill="red [BLANK:2] sun", prompt=None, prompt_file=None, num_samples=1
    )
    assert sample.templates(args, None, 10, enc) == [
        enc.encode("red") + [None, None] + enc.encode(" sun")
    ]
    sample.main(
        ["--ckpt", ckpt, "--infill", "red [BLANK:2] sun", f"--out={out}", "--num_samples=1"]
    )
    assert json.loads(open(out).readline())["text"].startswith("red")


@pytest.mark.parametrize(
    "flag, text",
    [
        ("--prompt", "red cat dog sun red cat dog sun red cat"),  # 10 of 10 tokens
        ("--prompt", "red cat dog sun red cat dog sun red cat dog"),
        ("--infill", "red [BLANK:9] cat"),
    ],
)
def test_fixed_text_without_room_is_a_clear_error(reverse_model, flag, text):
    ckpt, _ = reverse_model
    with pytest.raises(SystemExit, match="shorten it"):
        sample.main(["--ckpt", ckpt, flag, text])


def test_argument_errors_are_one_line(tmp_path, capsys):
    for args in (
        ["--prompt", "a", "--infill", "b"],
        ["--prompt_file", str(tmp_path / "missing.txt")],
        ["--cfg_scale=x"],
    ):
        with pytest.raises(SystemExit, match=r"^error: argument .* \(see --help\)$"):
            sample.main(args)
    assert capsys.readouterr().err == ""  # no usage dump


def test_pairs_file_errors_are_clear(reverse_model, tmp_path):
    ckpt, _ = reverse_model
    with pytest.raises(SystemExit, match="x.jsonl, line 1: no string field source"):
        sample.main(
            [
                "--ckpt",
                ckpt,
                "--pairs",
                write_jsonl(tmp_path / "x.jsonl", [{"target": "no source"}]),
            ]
        )
    with pytest.raises(SystemExit, match="shorten it"):
        sample.main(
            [
                "--ckpt",
                ckpt,
                "--pairs",
                write_jsonl(tmp_path / "y.jsonl", [{"source": "red " * 12}]),
            ]
        )
