"""The model and the math of elf.py: shapes, initialisation, the objective against hand computations
and against a straightforward reference, and the sampler's time grid and steps (sample.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from elf import (
    ELF,
    Draws,
    ELFConfig,
    configure_optimizers,
    decode_loss,
    draw_training_noise,
    elf_loss,
    sinusoidal,
    velocity,
)
from sample import sde_step, time_grid

TINY = dict(
    vocab_size=128, block_size=8, n_layer=2, n_head=2, n_embd=32, embed_dim=16, bottleneck_dim=8
)


def tiny_model(**overrides):
    torch.manual_seed(0)
    model = ELF(ELFConfig(**{**TINY, **overrides}))
    # Give the zero-initialised x_hat head some weights: the objective's parts are non-trivial.
    torch.nn.init.normal_(model.x_head.weight, std=0.2)
    return model


def test_shapes():
    model = tiny_model()
    B, L, d = 3, 8, 16
    z, x_sc = torch.randn(B, L, d), torch.randn(B, L, d)
    t, w = torch.rand(B), torch.rand(B) + 1
    hidden = model(z, t, w, x_sc, torch.tensor([0.0, 1.0, 0.0]))
    assert hidden.shape == (B, L, 32)
    assert model.predict_x(hidden, z, t).shape == (B, L, d)
    assert model.decode_logits(hidden).shape == (B, L, 128)
    assert model.embed(torch.randint(0, 128, (B, L))).shape == (B, L, d)


def test_a_decode_head_of_the_data_ids_is_the_whole_head_without_the_others():
    """decode_vocab: the head scores the data's ids only. Its CE is the whole head's with the
    other ids left out of the softmax; sampling's logits are the whole head's there, else -inf."""
    ids = torch.tensor([2, 5, 7, 40, 99])
    whole, part = tiny_model(), tiny_model(decode_vocab=5)
    with torch.no_grad():
        for p in whole.parameters():                    # every weight random, biases too
            p.normal_(std=0.3)
    state = whole.state_dict()
    part.load_state_dict({**state, "decode_out.weight": state["decode_out.weight"][ids],
                          "decode_out.bias": state["decode_out.bias"][ids], "decode_ids": ids})
    gen = torch.Generator().manual_seed(0)
    tokens = ids[torch.randint(0, 5, (4, 8), generator=gen)]
    hidden = torch.randn(4, 8, 32, generator=gen)
    logits = whole.decode_logits(hidden)[..., ids]      # by hand: the 5 columns, their softmax
    rows = (tokens[..., None] == ids).float().argmax(-1)
    hand = -logits.log_softmax(-1).gather(-1, rows[..., None]).sum()
    ones = torch.ones(4, 8)
    assert torch.allclose(decode_loss(part, hidden, tokens, ones, 4), hand, rtol=1e-5)
    z, w = torch.randn(3, 8, 16, generator=gen), torch.full((3,), 2.0)
    sampled, reference = part.decode(z, w), whole.decode(z, w)
    assert sampled.shape == (3, 8, 128)
    assert torch.allclose(sampled[..., ids], reference[..., ids], atol=1e-5)
    others = torch.ones(128, dtype=torch.bool).index_fill_(0, ids, False)
    assert torch.isneginf(sampled[..., others]).all()


def test_x_head_is_zero_initialised():
    model = ELF(ELFConfig(**TINY))
    z = torch.randn(2, 8, 16)
    assert torch.equal(
        model.denoise(z, torch.rand(2), torch.ones(2), torch.zeros_like(z)), torch.zeros_like(z)
    )


def test_gaussian_table_from_seed_and_not_stored():
    a, b, c = (ELF(ELFConfig(**TINY, embedding_seed=s)) for s in (7, 7, 8))
    assert torch.equal(a.embed.table, b.embed.table)
    assert not torch.equal(a.embed.table, c.embed.table)
    assert not a.embed.table.requires_grad
    assert not any("table" in k for k in a.state_dict())  # regenerated, never saved
    assert abs(a.embed.table.std().item() - 1.0) < 0.05


def test_learned_embedding_is_trainable_and_normalised():
    model = ELF(ELFConfig(**TINY, embedding="learned"))
    assert model.embed.table.requires_grad
    with torch.no_grad():
        model.embed.table.mul_(1e-3)  # try to collapse it
    x = model.embed(torch.arange(10)[None])
    assert torch.allclose(x.pow(2).mean(-1), torch.ones(1, 10), atol=1e-3)


def test_decode_mode_changes_output():
    model = tiny_model()
    z, t, w = torch.randn(2, 8, 16), torch.ones(2), torch.ones(2)
    denoise = model(z, t, w, torch.zeros_like(z), torch.zeros(2))
    decode = model(z, t, w, torch.zeros_like(z), torch.ones(2))
    assert not torch.allclose(denoise, decode)


def test_time_and_scale_features_are_smooth_in_the_raw_value():
    """t and w enter the sinusoidal features as they are: nearby values get nearby (but distinct)
    features, far ones different features; w = 3.0 and 3.05 must not look unrelated."""
    features = sinusoidal(torch.tensor([3.0, 3.05, 0.5, 0.5, 0.51]))
    similarity = F.cosine_similarity(features[:, None], features[None], dim=-1)
    assert 0.99 < similarity[0, 1] < 1 and similarity[0, 2] < 0.9
    assert similarity[3, 4] > 0.999 and not torch.equal(features[3], features[4])


class LinearToyModel(torch.nn.Module):
    """A stand-in network simple enough to compute by hand: hidden = z + x_sc, x_hat = a * hidden,
    logits = hidden @ E^T, where E is the embedding table."""

    def __init__(self, cfg, table, a=0.5):
        super().__init__()
        self.cfg, self.table, self.a = cfg, table, a
        self.embed = lambda tokens, *conditions: table[tokens]
        self.decode_ids = torch.arange(len(table))  # the head scores every id

    def forward(self, z, t, w, x_sc, decode):
        return z + x_sc

    def predict_x(self, hidden, z, t):
        return self.a * hidden

    def decode_logits(self, hidden):
        return hidden @ self.table.T


HAND = dict(
    table=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]),
    tokens=torch.tensor([[0, 2], [1, 1], [2, 0]]),  # row 0 self-cond, row 1 plain, row 2 decode
    eps=torch.tensor(
        [[[0.1, -0.2], [0.3, 0.0]], [[-0.5, 0.2], [0.0, 0.4]], [[1.0, -1.0], [0.2, 0.2]]]
    ),
    t=torch.tensor([0.3, 0.98, 1.0]),
    w=torch.tensor([2.0, 1.5, 3.0]),
    lam=torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.9, 0.25]]),
)


def hand_terms(table, tokens, eps, t, w, lam, a=0.5):
    """{(row, position): (kind, per-token loss)} of the HAND batch: every formula of the flow and
    the training objective (README: The flow, Training objective) written out element by element
    for the linear toy network (which mixes no positions)."""
    terms = {}
    for b in range(2):  # denoise rows
        for i in range(2):
            x, e, tb = table[tokens[b, i]].tolist(), eps[b, i].tolist(), t[b].item()
            denom = max(1 - tb, 0.05)
            z = [tb * x[c] + (1 - tb) * 2.0 * e[c] for c in range(2)]
            if b == 0:  # self-conditioned: x_sc = a z (first pass)
                x_u = [a * z[c] for c in range(2)]
                x_hat = [a * (z[c] + x_u[c]) for c in range(2)]
                v_u = [(x_u[c] - z[c]) / denom for c in range(2)]
                v_c = [(x_hat[c] - z[c]) / denom for c in range(2)]
                target = [
                    (x[c] - z[c]) / denom + (1 - 1 / w[b].item()) * (v_c[c] - v_u[c])
                    for c in range(2)
                ]
            else:
                x_hat = [a * z[c] for c in range(2)]
                target = [(x[c] - z[c]) / denom for c in range(2)]
            v_hat = [(x_hat[c] - z[c]) / denom for c in range(2)]
            terms[b, i] = ("mse", sum((v_hat[c] - target[c]) ** 2 for c in range(2)) / 2)
    for i in range(2):  # decode row: corrupted input, CE
        x, e, lm = table[tokens[2, i]].tolist(), eps[2, i].tolist(), lam[2, i].item()
        z = [lm * x[c] + (1 - lm) * 5.0 * e[c] for c in range(2)]
        logits = [sum(z[c] * table[k, c].item() for c in range(2)) for k in range(3)]
        log_z = math.log(sum(math.exp(v) for v in logits))
        terms[2, i] = ("ce", log_z - logits[tokens[2, i].item()])
    return terms


def test_loss_matches_hand_computation():
    """Every formula of the objective written out element by element, with a toy network."""
    cfg = ELFConfig(vocab_size=3, embed_dim=2, noise_scale=2.0, t_eps=0.05, decoder_noise_scale=5.0)
    h = HAND
    draws = Draws(n_self_cond=1, n_decode=1, t=h["t"], w=h["w"], eps=h["eps"], lam=h["lam"])
    loss, mse, ce = elf_loss(LinearToyModel(cfg, h["table"]), h["tokens"], draws)
    terms = hand_terms(**h)
    total_mse = [v for kind, v in terms.values() if kind == "mse"]
    total_ce = [v for kind, v in terms.values() if kind == "ce"]
    assert loss.item() == pytest.approx((sum(total_mse) + sum(total_ce)) / 6, rel=1e-5)
    assert mse.item() == pytest.approx(sum(total_mse) / 4, rel=1e-5)
    assert ce.item() == pytest.approx(sum(total_ce) / 2, rel=1e-5)


def reference_loss(model, tokens, d):
    """The objective computed the plain way: separate full-batch passes for v_uncond and v_cond, the
    decode head on every row, and per-row masks instead of row blocks."""
    cfg = model.cfg
    B, L = tokens.shape
    rows = torch.arange(B)
    is_decode, is_sc = rows >= B - d.n_decode, rows < d.n_self_cond
    x = model.embed(tokens)
    tt = d.t[:, None, None]
    lam = d.lam[..., None]
    z = torch.where(
        is_decode[:, None, None],
        lam * x + (1 - lam) * cfg.decoder_noise_scale * d.eps,
        tt * x + (1 - tt) * cfg.noise_scale * d.eps,
    )
    mode = is_decode.float()
    zeros = torch.zeros_like(z)
    with torch.no_grad():
        x_uncond = model.predict_x(model(z, d.t, d.w, zeros, mode), z, d.t)
        x_sc = torch.where(is_sc[:, None, None], x_uncond, zeros)
        x_cond = model.predict_x(model(z, d.t, d.w, x_sc, mode), z, d.t)
    hidden = model(z, d.t, d.w, x_sc, mode)
    v_hat = velocity(model.predict_x(hidden, z, d.t), z, d.t, cfg.t_eps)
    v = velocity(x, z, d.t, cfg.t_eps)
    v_uncond, v_cond = velocity(x_uncond, z, d.t, cfg.t_eps), velocity(x_cond, z, d.t, cfg.t_eps)
    guided = v + (1 - 1 / d.w)[:, None, None] * (v_cond - v_uncond)
    target = torch.where(is_sc[:, None, None], guided, v)
    mse = (v_hat - target).pow(2).mean(-1)  # (B, L)
    ce = F.cross_entropy(model.decode_logits(hidden).transpose(1, 2), tokens, reduction="none")
    per_token = torch.where(is_decode[:, None], ce, mse)
    return per_token.sum() / (B * L)


@pytest.mark.parametrize("prediction", ["x", "v"])
def test_efficient_objective_equals_reference(prediction):
    model = tiny_model(prediction=prediction)
    tokens = torch.randint(0, 128, (10, 8), generator=torch.Generator().manual_seed(1))
    draws = draw_training_noise(
        model.cfg, 10, 8, torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    )
    draws.n_self_cond, draws.n_decode = 4, 3  # make sure every role is present
    draws.t[-3:] = 1.0
    loss, _, _ = elf_loss(model, tokens, draws)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = reference_loss(model, tokens, draws)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


def test_draws_follow_the_configured_probabilities():
    cfg = ELFConfig(**TINY)
    g, gd = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    n_dec = n_sc = 0
    for _ in range(200):
        d = draw_training_noise(cfg, 50, 4, g, gd)
        n_dec, n_sc = n_dec + d.n_decode, n_sc + d.n_self_cond
        assert torch.all(d.t[50 - d.n_decode :] == 1) and torch.all(d.t[: 50 - d.n_decode] < 1)
        assert torch.all((d.w >= 0.5) & (d.w <= 5.0))
    assert n_dec / 10000 == pytest.approx(0.2, abs=0.01)
    assert n_sc / 10000 == pytest.approx(0.8 * 0.5, abs=0.015)


@pytest.mark.parametrize("schedule", ["logit_normal", "uniform"])
def test_time_grid_runs_from_noise_to_data(schedule):
    grid = time_grid(32, schedule, ELFConfig(), torch.Generator().manual_seed(0))
    assert grid.shape == (33,) and grid[0] == 0 and grid[-1] == 1
    assert torch.all(grid[1:] > grid[:-1])


def test_sde_with_zero_churn_is_the_euler_ode_step():
    cfg = ELFConfig(**TINY)
    x_hat = torch.randn(2, 8, 16)
    denoise = lambda z, t, x_sc: x_hat  # noqa: E731
    z = torch.randn(2, 8, 16)
    z_sde, _ = sde_step(denoise, z, None, 0.3, 0.5, 0.0, torch.randn_like(z), cfg)
    assert torch.allclose(z_sde, z + 0.2 * (x_hat - z) / 0.7, atol=1e-6)   # float32 round-off
    # The last step onto t = 1 lands exactly on x_hat.
    z_last, _ = sde_step(denoise, z, None, 0.9, 1.0, 0.0, None, cfg)
    assert torch.allclose(z_last, x_hat, atol=1e-6)


def test_sde_churn_renoises_before_the_step():
    cfg = ELFConfig(**TINY)
    seen = {}

    def denoise(z, t, x_sc):
        seen["z"], seen["t"] = z, t
        return torch.zeros_like(z)

    z, noise = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    sde_step(denoise, z, None, 0.5, 0.6, 1.5, noise, cfg)
    alpha = 1 - 1.5 * 0.1
    assert torch.allclose(seen["t"], torch.tensor([alpha * 0.5]))
    assert torch.allclose(seen["z"], alpha * z + (1 - alpha) * 2.0 * noise)


def test_optimizer_groups():
    model = ELF(ELFConfig(**TINY))
    muon, adam = configure_optimizers(model, "muon")
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in adam.param_groups for p in g["params"]}
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert id(model.blocks[0].attn.qkv.weight) in muon_ids
    for p in [
        model.decode_out.weight,
        model.x_head.weight,
        model.mode_tokens,
        model.blocks[0].attn.qkv.bias,
    ]:
        assert id(p) in adam_ids
    assert muon_ids.isdisjoint(adam_ids)
    assert len(muon_ids) + len(adam_ids) == sum(1 for p in model.parameters() if p.requires_grad)
    (only,) = configure_optimizers(model, "adamw")
    assert isinstance(only, torch.optim.AdamW)
