"""The authors' released checkpoints (README: The paper's released models). fixtures/authors/ was
made by running their own PyTorch code (fixtures/make_authors_fixture.py; the commit is in
fixtures/authors/COMMIT) on a small model with every tensor random: their checkpoint file, their
outputs on fixed inputs, a run of their sampler, one training step, and the names and shapes of
every tensor of their full-size ELF-B, ELF-M and ELF-L."""
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import elf
import prepare_data
import sample
import train
from elf import ELF, MODEL_SIZES, Draws, ELFConfig

transformers = pytest.importorskip("transformers")
FIXTURE = Path(__file__).parent / "fixtures" / "authors"
WORDS = "to be or not that is the question whether tis nobler in mind suffer".split()


def expected():
    return torch.load(FIXTURE / "expected.pt", weights_only=True)


def relative_error(ours, theirs):
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """The fixture's tiny random T5 encoder, and a word-level tokenizer with T5's special tokens
    (<pad> 0, </s> 1, <unk> 2), in one folder: what --encoder / --tokenizer accept."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    folder = tmp_path_factory.mktemp("tiny_t5")
    fixture = expected()
    encoder = transformers.T5EncoderModel(transformers.T5Config(**fixture["t5_config"]))
    encoder.load_state_dict(fixture["t5_state"], strict=False)     # tied shared/embed_tokens
    encoder.save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)
    elf.frozen_encoder.cache_clear()
    return str(folder)


def test_the_mapping_covers_every_tensor_of_their_full_sizes():
    sizes = json.loads((FIXTURE / "full_sizes.json").read_text())["sizes"]
    for name, ours_size in [("ELF-B", "elf-b"), ("ELF-M", "elf-m"), ("ELF-L", "elf-l")]:
        params = {n: torch.empty(shape, device="meta") for n, shape in sizes[name].items()}
        fields, sampler = elf.authors_config(params, f"embedded-language-flows/{name}-owt-torch")
        assert {k: fields[k] for k in MODEL_SIZES[ours_size]} == MODEL_SIZES[ours_size]
        assert (fields["embed_dim"], fields["vocab_size"], fields["bottleneck_dim"]) == (
            512, 32128, 128)
        assert sampler["sample_steps"] == (32 if name == "ELF-B" else 64)
        converted = elf.from_authors(params, fields["n_head"])
        with torch.device("meta"):
            model = ELF(ELFConfig(**fields))
        ours = model.state_dict()
        assert sorted(converted) == sorted(ours)                # none missing, none left over
        assert all(converted[k].shape == ours[k].shape for k in ours)
        count = sum(math.prod(shape) for shape in sizes[name].values())
        assert sum(p.numel() for p in model.parameters()) == count
    assert count == 652_117_696 and sum(  # ELF-L; and ELF-B's count with the biases: the paper's
        math.prod(s) for s in sizes["ELF-B"].values()) == 104_594_304


def test_the_denoiser_and_the_decode_pass_reproduce_theirs():
    fixture = expected()
    model, _ = sample.load_checkpoint(str(FIXTURE))               # the EMA weights by default
    z, t, w = fixture["z"], fixture["t"], fixture["w"]
    with torch.no_grad():
        x_hat = model.predict_x(model(z, t, w, fixture["x_sc"], torch.zeros(3)), z, t)
        logits = model.decode(z, w)
    assert relative_error(x_hat, fixture["x_hat"]) < 1e-5
    assert relative_error(logits, fixture["logits"]) < 1e-5
    other, _ = sample.load_checkpoint(str(FIXTURE), weights="model")
    with torch.no_grad():                                         # params and EMA differ
        assert relative_error(other.decode(z, w), fixture["logits"]) > 0.1


def test_a_run_of_the_sampler_gives_their_tokens(monkeypatch):
    fixture, run = expected(), expected()["sampler"]
    model, _ = sample.load_checkpoint(str(FIXTURE / "checkpoint_7"))
    # Their argmax runs over all 64 rows; ours skips rows past the tokenizer's (none here).
    monkeypatch.setattr(sample, "get_tokenizer", lambda name: prepare_data.Tokenizer(
        name, None, None, 1, 64))
    settings = sample.SamplerConfig(steps=run["steps"], sampler="sde", gamma=run["gamma"],
                                    scale=run["scale"], schedule="uniform")
    final = []
    tokens = sample.generate(model, 4, 8, settings, torch.Generator().manual_seed(run["seed"]),
                             on_step=lambda t, z, x_hat: final.append(z))
    # Six steps through a random network grow float32 round-off (1e-7 a pass) to about 1e-5.
    assert relative_error(final[-1], run["latent"]) < 1e-4
    assert torch.equal(tokens, run["tokens"])
    assert fixture["commit"] in (FIXTURE / "COMMIT").read_text()


def test_a_training_step_reproduces_their_loss_and_gradients(t5_dir):
    """Every draw given to both sides; all weights random, so the guidance target is exercised
    (at initialisation every x_hat is zero and any guidance formula agrees)."""
    fixture = expected()["train"]
    model, _ = sample.load_checkpoint(str(FIXTURE), weights="model", encoder=t5_dir)
    d, ids = fixture["draws"], fixture["ids"]
    decode = d["roles"].bool()
    assert decode.tolist() == [False] * 4 + [True] * 2 and (d["sc_coins"][:4] < 0.5).sum() == 2
    draws = Draws(n_self_cond=2, n_decode=2, t=torch.where(decode, 1.0, d["t"]), w=d["w"],
                  eps=torch.where(decode[:, None, None], d["decoder_noise"], d["noise"]),
                  lam=torch.sigmoid(0.8 + 0.8 * d["lam_normal"]).view(ids.shape))
    assert relative_error(model.embed(ids), fixture["x0"]) < 1e-6
    loss, mse, ce = elf.elf_loss(model, ids, draws)
    for ours, theirs in [(loss, "loss"), (mse, "mse"), (ce, "ce")]:
        assert ours.item() == pytest.approx(fixture[theirs].item(), rel=1e-5)
    loss.backward()
    grads = elf.from_authors(fixture["grads"], model.cfg.n_head)
    for name, p in model.named_parameters():
        assert relative_error(p.grad, grads[name]) < 1e-5, name


def test_sample_py_on_their_checkpoint_uses_the_papers_sampler(t5_dir, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    model, trained = sample.load_checkpoint(str(FIXTURE))
    assert sample.settings_from(trained) == sample.SamplerConfig()  # 32-step SDE, gamma 1.5, w 3
    sample.main(["--ckpt", str(FIXTURE), f"--encoder={t5_dir}", "--length=8", "--steps=4",
                 "--num_samples=2", f"--out={out}"])
    texts = [json.loads(line)["text"] for line in open(out)]
    assert len(texts) == 2 and all(w in WORDS for text in texts for w in text.split())
    sample.main(["--ckpt", str(FIXTURE), f"--encoder={t5_dir}", "--length=8", "--steps=4",
                 "--num_samples=1", f"--out={out}", "--prompt", "to be or"])
    assert json.loads(open(out).readline())["text"].startswith("to be or")
    capsys.readouterr()


def test_fine_tuning_starts_from_their_weights(t5_dir, tmp_path, capsys):
    text = tmp_path / "words.txt"
    text.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) * 20)
    prepare_data.main(["--input", str(text), "--out_dir", str(tmp_path / "data"),
                       f"--tokenizer={t5_dir}", "--workers=1"])
    args = [f"--init_from={FIXTURE}", f"--encoder={t5_dir}", "--dataset=words",
            f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--block_size=8",
            "--batch_size=4", "--eval_iters=1", "--sample_steps=2", "--num_eval_samples=1"]
    tc, mc = train.parse_args(args + ["--max_iters=1"])
    assert (mc.n_layer, mc.n_embd, mc.n_time_tokens, mc.embedding, tc.init_from) == (
        2, 32, 3, "t5", str(FIXTURE))
    assert (tc.sampler, tc.sample_gamma, tc.lr_schedule, mc.self_cond_prob) == (
        "sde", 1.5, "constant", 0.5)                       # the paper's, not the cpu preset's
    trainer = train.Trainer(tc, mc, torch.device("cpu"))
    ema = torch.load(FIXTURE / "checkpoint_7", weights_only=True)["ema_params1"]
    theirs = elf.from_authors(ema, 2)                       # the EMA weights, as sampled
    assert all(torch.equal(v, theirs[k]) for k, v in trainer.model.state_dict().items())
    train.main(args + ["--max_iters=2", "--eval_interval=2"])
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)   # this repo's format
    assert ckpt["iter"] == 2 and ckpt["model_config"]["n_time_tokens"] == 3
    sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--num_samples=1", "--steps=2"])
    capsys.readouterr()
    with pytest.raises(train.RunError, match="n_layer"):      # the architecture is theirs
        train.parse_args(args + ["--n_layer=3"])


def test_bad_checkpoints_are_one_line(tmp_path, monkeypatch, capsys):
    def fails(source, match, **kwargs):
        with pytest.raises(SystemExit, match=match) as e:
            sample.load_checkpoint(source, **kwargs)
        assert "\n" not in str(e.value)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    fails(str(tmp_path / "tensor.pt"), "not a compatible ELF checkpoint")
    torch.save({"params": {"x": torch.zeros(1)}}, tmp_path / "checkpoint_3")
    fails(str(tmp_path / "checkpoint_3"), "not a compatible ELF checkpoint")
    (tmp_path / "empty").mkdir()
    fails(str(tmp_path / "empty"), "no checkpoint_<step> file")
    fails("no-such-owner/ELF-Z-torch", "cannot download no-such-owner/ELF-Z-torch")  # offline
    fails("out/missing.pt", "no checkpoint at out/missing.pt")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)     # not installed
    fails("embedded-language-flows/ELF-B-owt-torch", "pip install huggingface_hub")
    xsum = tmp_path / "ELF-B-xsum-torch"
    shutil.copytree(FIXTURE, xsum)
    model, trained = sample.load_checkpoint(str(xsum))
    assert (trained["task"], model.cfg.block_size, model.cfg.decoder_noise_scale) == (
        "xsum", 1088, 1.0)
    assert sample.settings_from(trained) == sample.SamplerConfig(
        steps=64, sampler="ode", scale=1.0, cfg_scale=2.0)
    with pytest.raises(SystemExit, match="conditional xsum model: pass --pairs"):
        sample.main(["--ckpt", str(xsum), "--num_samples=1"])
    capsys.readouterr()
    assert os.path.exists(FIXTURE / "checkpoint_7")
