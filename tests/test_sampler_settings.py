"""Sampler settings travel with the checkpoint (train.py's sample_*), flags override them; a model
trained without self-conditioning never sees a self-conditioning input while sampling."""
import json
import os

import pytest
import torch

import sample
from elf import ELF, ELFConfig
from helpers import write_shard
from sample import SamplerConfig, settings_from
from test_train_sample import TEXT_IDS, run_train

TRAINED = dict(sample_steps=7, sampler="ode", sample_gamma=0.5, sample_scale=1.0,
               sample_schedule="uniform", lr=1e-3)


def test_given_settings_win_and_the_checkpoint_fills_the_rest():
    assert settings_from({}) == SamplerConfig()                 # no fields: the paper's defaults
    assert settings_from({}, steps=None, sampler=None) == SamplerConfig()
    assert settings_from(TRAINED) == SamplerConfig(7, "ode", 0.5, 1.0, "uniform")
    given = settings_from(TRAINED, steps=3, sampler="sde", gamma=None, cfg_scale=2.0)
    assert given == SamplerConfig(3, "sde", 0.5, 1.0, "uniform", cfg_scale=2.0)
    assert settings_from(dict(sample_steps=5)) == SamplerConfig(steps=5)   # an older checkpoint


def test_sample_py_uses_the_checkpoint_settings_unless_flags_override(tmp_path, monkeypatch):
    (tmp_path / "data" / "one").mkdir(parents=True)
    for shard in ("one_train_000001.bin", "one_val_000000.bin"):   # no end-of-text: the samples
        write_shard(tmp_path / "data" / "one" / shard, TEXT_IDS * 2)  # of the head never end early
    data_dir, out = str(tmp_path / "data"), tmp_path / "out"
    run_train(data_dir, out, "--max_iters=1", "--eval_interval=1", "--sampler=ode",
              "--sample_schedule=uniform", "--sample_gamma=0.7")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                    # no judge weights: entropy only
    base = ["--ckpt", str(out / "ckpt.pt"), "--num_samples=1", "--eval", "--judge=not-a-model",
            f"--out={tmp_path / 's.jsonl'}"]

    def summary(*flags):
        sample.main([*base, *flags])
        return json.loads((out / "results.jsonl").read_text().splitlines()[-1])

    trained = summary()
    assert (trained["steps"], trained["sampler"], trained["schedule"]) == (4, "ode", "uniform")
    assert (trained["gamma"], trained["scale"]) == (0.7, 3.0)
    given = summary("--steps=2", "--sampler=sde", "--scale=1")
    assert (given["steps"], given["sampler"], given["schedule"]) == (2, "sde", "uniform")
    assert (given["gamma"], given["scale"]) == (0.7, 1.0)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)      # a checkpoint from before the fields
    ckpt["train_config"] = {}
    torch.save(ckpt, out / "ckpt.pt")
    assert {k: summary()[k] for k in ("steps", "sampler", "schedule", "gamma", "scale")} == {
        k: v for k, v in vars(SamplerConfig()).items() if k != "cfg_scale"}
    assert os.path.exists(tmp_path / "s.jsonl")


@pytest.mark.parametrize("self_cond_prob", [0.0, 0.5])
@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_self_conditioning_input_is_zero_without_self_conditioning(self_cond_prob, sampler):
    torch.manual_seed(0)
    model = ELF(ELFConfig(vocab_size=64, block_size=6, n_layer=1, n_head=2, n_embd=32,
                          embed_dim=16, bottleneck_dim=16, self_cond_prob=self_cond_prob)).eval()
    with torch.no_grad():                                        # zero-initialised outputs: x_hat 0
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    seen, x_hats = [], []

    def denoise(z, t, w, x_sc):                                  # what the network is given
        seen.append(x_sc.clone())
        return model.denoise(z, t, w, x_sc)

    settings = SamplerConfig(steps=5, sampler=sampler)
    sample.generate(model, 3, 6, settings, torch.Generator().manual_seed(0), denoise_fn=denoise,
                    on_step=lambda t, z, x_hat: x_hats.append(x_hat.clone()))
    assert len(seen) == len(x_hats) == 5 and not torch.any(seen[0])
    assert all(torch.any(x_hat) for x_hat in x_hats)            # the picture still sees x_hat
    for x_sc, x_hat_before in zip(seen[1:], x_hats):
        if self_cond_prob == 0:
            assert not torch.any(x_sc)                           # never the previous x_hat
        else:
            assert torch.equal(x_sc, x_hat_before)               # the previous step's x_hat
