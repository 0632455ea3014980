"""--embedding=t5 (README: Embeddings): a frozen T5 encoder makes x, and its tokenizer runs through
prepare_data.py, train.py and sample.py. Offline: a tiny random T5 and a tiny word-level tokenizer,
saved as `transformers` folders, stand in for t5-small."""
import json
import os
import sys

import pytest
import torch

import elf
import prepare_data
import sample
import train
from elf import ELF, ELFConfig, configure_optimizers, draw_training_noise, elf_loss

transformers = pytest.importorskip("transformers")
WORDS = "to be or not that is the question whether tis nobler in mind suffer".split()
TINY = dict(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=32, embed_dim=16,
            bottleneck_dim=8, embedding="t5", latent_std=0.2)
TINY_ARGS = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--embed_dim=16", "--bottleneck_dim=8",
             "--block_size=8", "--batch_size=8", "--warmup_iters=5", "--eval_iters=1",
             "--sample_steps=4", "--num_eval_samples=1", "--embedding=t5"]


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    """(encoder folder, tokenizer folder): a 1-layer T5 encoder of width 16 over 64 ids, and a
    word-level tokenizer of WORDS with T5's special tokens (<pad> 0, </s> 1, <unk> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2)
    transformers.T5EncoderModel(config).save_pretrained(root / "encoder")
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(root / "tokenizer")
    return str(root / "encoder"), str(root / "tokenizer")


def tiny_model(encoder, **overrides):
    torch.manual_seed(0)
    return ELF(ELFConfig(**{**TINY, "encoder": encoder, **overrides}))


def test_x_is_the_frozen_encoders_output_over_latent_std(t5_dirs):
    model = tiny_model(t5_dirs[0])
    tokens = torch.randint(0, 64, (3, 8))
    x = model.embed(tokens)
    expected = elf.frozen_encoder(t5_dirs[0])(input_ids=tokens).last_hidden_state / 0.2
    assert x.shape == (3, 8, 16) and torch.allclose(x, expected)
    assert torch.allclose(tiny_model(t5_dirs[0], latent_std=0.4).embed(tokens), x / 2)


def test_condition_positions_are_encoded_alone(t5_dirs):
    """The fixed text's x cannot see the rest, so sampling (where the rest is unknown) gets the
    x that training saw; the other positions see the whole sequence, condition included."""
    model = tiny_model(t5_dirs[0])
    tokens = torch.randint(3, 64, (2, 8))
    cond = torch.zeros(2, 8, dtype=torch.bool)
    cond[0, :3] = True                                          # row 1: no condition
    x = model.embed(tokens, cond)
    assert torch.allclose(x[0, :3], model.embed(tokens[:1, :3])[0], atol=1e-5)
    assert torch.allclose(x[1], model.embed(tokens)[1])
    other = tokens.clone()
    other[0, 3:] = 5                                            # another target: same condition x
    assert torch.allclose(model.embed(other, cond)[0, :3], x[0, :3], atol=1e-6)
    other = tokens.clone()
    other[0, :3] = 5                                            # the target sees the condition
    assert not torch.allclose(model.embed(other, cond)[0, 3:], x[0, 3:], atol=1e-3)


def test_the_encoder_gets_no_gradient_no_optimizer_state_and_is_not_saved(t5_dirs):
    model = tiny_model(t5_dirs[0])
    encoder = elf.frozen_encoder(t5_dirs[0])
    g = torch.Generator().manual_seed(0)
    draws = draw_training_noise(model.cfg, 8, 8, g, g)
    elf_loss(model, torch.randint(0, 64, (8, 8)), draws)[0].backward()
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    optimized = {id(p) for opt in configure_optimizers(model) for group in opt.param_groups
                 for p in group["params"]}
    assert not optimized & {id(p) for p in encoder.parameters()}
    assert not any("encoder" in key or "shared" in key for key in model.state_dict())
    gaussian = tiny_model(t5_dirs[0], embedding="gaussian")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in gaussian.parameters())                 # the table is a buffer there


def test_the_loss_sees_x_over_latent_std_by_hand(t5_dirs):
    """With the zero-initialised head x_hat = 0, so v_hat - v = -x / (1 - t) on every denoise
    token: the loss is the mean over tokens of mean(x^2) / (1 - t)^2."""
    model = tiny_model(t5_dirs[0], decoder_prob=0.0, self_cond_prob=0.0)
    tokens = torch.randint(0, 64, (4, 8))
    g = torch.Generator().manual_seed(1)
    draws = draw_training_noise(model.cfg, 4, 8, g, g)
    loss, mse, ce = elf_loss(model, tokens, draws)
    enc = elf.frozen_encoder(t5_dirs[0])(input_ids=tokens).last_hidden_state.detach() / 0.2
    expected = (enc.pow(2).mean(-1) / (1 - draws.t[:, None]).clamp(min=0.05) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and ce.item() == 0


def test_train_and_sample_end_to_end_with_the_t5_tokenizer(t5_dirs, tmp_path, capsys):
    encoder, tokenizer = t5_dirs
    text = tmp_path / "words.txt"
    text.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) * 20)
    prepare_data.main(["--input", str(text), "--out_dir", str(tmp_path / "data"),
                       f"--tokenizer={tokenizer}", "--workers=1"])
    meta = json.loads((tmp_path / "data" / "words" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == (tokenizer, 17, 1)
    out = tmp_path / "out"
    train.main(["--dataset=words", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}",
                f"--encoder={encoder}", "--max_iters=6", "--eval_interval=6", *TINY_ARGS])
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    mc = ckpt["model_config"]
    assert (mc["tokenizer"], mc["vocab_size"], mc["latent_std"], mc["encoder"]) == (
        tokenizer, 64, 0.2, encoder)
    assert not any("shared" in key or "encoder" in key for key in ckpt["model"])
    capsys.readouterr()
    # Unconditional sampling decodes embeddings to tokens: no encoder needed.
    elf.frozen_encoder.cache_clear()
    os.rename(encoder, encoder + ".away")
    try:
        sample.main(["--ckpt", str(out / "ckpt.pt"), "--num_samples=2", "--length=8"])
        texts = [json.loads(line)["text"] for line in open(out / "samples.jsonl")]
        assert len(texts) == 2 and all(w in WORDS for t in texts for w in t.split())
        with pytest.raises(SystemExit, match="no T5 encoder"):   # a prompt must be encoded
            sample.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "to be", "--num_samples=1"])
    finally:
        os.rename(encoder + ".away", encoder)
        elf.frozen_encoder.cache_clear()
    sample.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "to be", "--num_samples=1"])
    assert json.loads(open(out / "samples.jsonl").readline())["text"].startswith("to be")


def test_gpt2_data_is_a_clear_error(t5_dirs, tmp_path):
    from helpers import write_shard
    from test_train_sample import TEXT_IDS
    folder = tmp_path / "data" / "one"
    folder.mkdir(parents=True)
    for shard in ("one_train_000001.bin", "one_val_000000.bin"):
        write_shard(folder / shard, TEXT_IDS * 3)
    args = ["--dataset=one", f"--data_dir={tmp_path / 'data'}", f"--encoder={t5_dirs[0]}",
            f"--out_dir={tmp_path / 'out'}", *TINY_ARGS]
    with pytest.raises(SystemExit, match="reads 64 token ids, the data has 50,257: run "
                                         "prepare_data.py --tokenizer="):
        train.main(args)


def test_missing_transformers_or_weights_is_one_line(t5_dirs, monkeypatch):
    elf.frozen_encoder.cache_clear()
    with pytest.raises(SystemExit, match="no T5 encoder '/no/such/t5'"):
        tiny_model("/no/such/t5").embed(torch.zeros(1, 8, dtype=torch.long))
    monkeypatch.setitem(sys.modules, "transformers", None)     # import transformers fails
    elf.frozen_encoder.cache_clear()
    prepare_data.get_tokenizer.cache_clear()
    with pytest.raises(SystemExit, match="needs the optional `transformers`"):
        tiny_model(t5_dirs[0]).embed(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(SystemExit):
        prepare_data.get_tokenizer(t5_dirs[1])
    elf.frozen_encoder.cache_clear()
    prepare_data.get_tokenizer.cache_clear()


def test_t5_settings_are_the_papers_unless_given():
    tc, mc = train.parse_args(["--embedding=t5"])
    assert (mc.latent_std, mc.noise_scale, mc.decoder_noise_scale) == (0.2, 2.0, 5.0)
    tc, mc = train.parse_args(["--embedding=t5", "--latent_std=0.5"])
    assert mc.latent_std == 0.5


def test_x_is_as_wide_as_the_encoder(t5_dirs):
    cfg = ELFConfig(embedding="t5", encoder=t5_dirs[0], embed_dim=512)
    assert elf.config_for_data(cfg, dict(tokenizer=t5_dirs[1], vocab_size=17)).embed_dim == 16
