"""The authors' paired layout (README: The paper's conditional tasks): source cut to a length,
target, end-of-text padding; its masks, their conditional sampler, and
the scores (exact match, BLEU, ROUGE). fixtures/authors/expected_pairs.pt was made by running the
authors' own code on two pairs (fixtures/make_authors_fixture.py; the commit is beside it)."""
import json
import sys

import numpy as np
import pytest
import torch

import elf
import prepare_data
import sample
import train
from test_authors import FIXTURE, relative_error, t5_dir  # noqa: F401 (t5_dir: a fixture)
from test_conditional import TINY_ARGS, reverse_pairs, write_jsonl


def theirs():
    return torch.load(FIXTURE / "expected_pairs.pt", weights_only=True)


def test_scores_by_hand():
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    same = sample.score_pairs(["the cat sat", "a dog"], [{"target": "the cat sat"},
                                                         {"target": "a dog"}])
    assert all(v == pytest.approx(100) for v in same.values())
    disjoint = sample.score_pairs(["x y z"], [{"target": "a b c"}])
    assert all(v == 0 for v in disjoint.values())
    # "the cat" against "the cat sat": every 1- and 2-gram right, so BLEU is its brevity penalty
    # exp(1 - 3/2); ROUGE-1 P 1, R 2/3: F 0.8; ROUGE-2 P 1, R 1/2: F 2/3; ROUGE-L as ROUGE-1.
    short = sample.score_pairs(["the cat"], [{"target": "the cat sat"}])
    assert short["bleu"] == pytest.approx(100 * np.exp(-0.5))
    assert (short["rouge1"], short["rouge2"], short["rougeL"]) == pytest.approx((80, 200 / 3, 80))
    assert short["exact_match"] == 0


def test_scores_without_their_packages_are_exact_match_and_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    scores = sample.score_pairs(["a"], [{"target": "a"}])
    assert scores == {"exact_match": 100.0}
    assert "pip install sacrebleu rouge-score" in capsys.readouterr().out


def prepare_their_pairs(tmp_path, tokenizer, *extra):
    """The fixture's two pairs, prepared in the authors' layout as an evaluation set."""
    pairs = write_jsonl(tmp_path / "their.jsonl", theirs()["pairs"])
    prepare_data.main(["--pairs", pairs, "--source_field=input", "--target_field=output",
                       "--source_length=4", "--block_size=8", f"--tokenizer={tokenizer}",
                       "--split=test", "--out_dir", str(tmp_path / "data"), *extra])
    return tmp_path / "data" / "their"


def test_the_layout_and_masks_are_theirs(t5_dir, tmp_path, capsys):  # noqa: F811
    folder = prepare_their_pairs(tmp_path, t5_dir)
    assert "1 sources, 0 targets cut" in capsys.readouterr().out     # said once, in the summary
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["source_length"], meta["val_tokens"], meta["train_tokens"]) == (4, 18, 0)
    rows = np.fromfile(folder / "their_val_000000.bin", "<u2", offset=1024).reshape(2, 9)
    tokens, cond, valid = elf.condition_masks(torch.from_numpy(rows.astype(np.int64)), meta)
    batch = theirs()["batch"]
    assert torch.equal(tokens, batch["input_ids"])
    assert torch.equal(cond, batch["cond_seq_mask"].bool())
    assert torch.equal(valid, batch["attention_mask"].bool())
    texts = sample.read_rows(str(folder), "source")            # sample.py --pairs=FOLDER
    assert texts == [{"source": p["input"], "target": p["output"]} for p in theirs()["pairs"]]


def test_the_t5_encoder_masks_padding_and_a_dropped_condition_as_theirs(t5_dir):  # noqa: F811
    batch, expected = theirs()["batch"], theirs()
    cond, valid = batch["cond_seq_mask"].bool(), batch["attention_mask"].bool()
    x = elf.t5_embedding(t5_dir, batch["input_ids"], cond, valid, torch.tensor([False, True]))
    assert relative_error(x / 0.2, expected["x0_dropped"]) < 1e-6
    x = elf.t5_embedding(t5_dir, batch["input_ids"], cond, valid)
    assert relative_error((x / 0.2)[cond], expected["cond_seq"][cond]) < 1e-6


def test_their_conditional_sampler_gives_their_tokens(t5_dir, monkeypatch):  # noqa: F811
    expected, batch = theirs()["sampler"], theirs()["batch"]
    model, _ = sample.load_checkpoint(str(FIXTURE), encoder=t5_dir)
    monkeypatch.setattr(sample, "get_tokenizer", lambda name: prepare_data.Tokenizer(
        name, None, None, 1, 64))                            # their argmax: all 64 rows
    settings = sample.SamplerConfig(steps=expected["steps"], sampler="ode", scale=1.0,
                                    schedule="uniform", cfg_scale=expected["cfg_scale"])
    cond = batch["cond_seq_mask"].bool()
    final = []
    tokens = sample.generate(model, 2, 8, settings, torch.Generator().manual_seed(expected["seed"]),
                             cond, batch["input_ids"], on_step=lambda t, z, x: final.append(z))
    assert relative_error(final[-1], expected["latent"]) < 1e-5
    assert torch.equal(tokens[~cond], expected["raw"][~cond])


def test_the_reversal_task_in_the_authors_layout_is_scored(tmp_path, capsys):
    """From scratch on the CPU: a tiny model memorises six reversals laid out as the authors'
    (source cut to 5 tokens, no end-of-text between), then sample.py scores its targets."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    pairs = write_jsonl(tmp_path / "r.jsonl", reverse_pairs(8, longest=3))
    prepare_data.main(["--pairs", pairs, "--block_size=10", "--source_length=5",
                       "--out_dir", str(tmp_path / "data"), "--val_fraction=0.25"])
    train.main(["--dataset=r", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}",
                *TINY_ARGS, "--block_size=10", "--max_iters=400", "--eval_interval=400"])
    seen = write_jsonl(tmp_path / "seen.jsonl", list(reverse_pairs(8, longest=3))[:6])
    results = tmp_path / "results.jsonl"
    sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--pairs", seen, "--steps=16",
                 "--sampler=ode", "--scale=1", "--cfg_scale=2", "--eval", f"--results={results}"])
    summary = json.loads(results.read_text())
    assert summary["exact_match"] == 100 and summary["bleu"] == pytest.approx(100)
    assert summary["rougeL"] == pytest.approx(100) and summary["gen_ppl"] is None
    capsys.readouterr()


def test_bad_pairs_are_one_line(t5_dir, tmp_path, capsys):  # noqa: F811
    rows = [{"translation": {"de": "to be", "en": "or not"}}, {"translation": {"de": "that"}}]
    nested = write_jsonl(tmp_path / "n.jsonl", rows)
    args = ["--pairs", nested, "--source_field=translation.de", "--target_field=translation.en",
            f"--tokenizer={t5_dir}", "--out_dir", str(tmp_path / "data"), "--block_size=8"]
    with pytest.raises(SystemExit, match=r"n.jsonl, line 2: no string field translation.de and "
                                         r"translation.en"):
        prepare_data.main(args)
    rows[1]["translation"]["en"] = ""                           # an empty target: left out, said
    write_jsonl(tmp_path / "n.jsonl", rows * 3)
    prepare_data.main(args + ["--split=test"])
    assert "3 empty targets left out" in capsys.readouterr().out
    tok = prepare_data.get_tokenizer()                          # sample.py says it once too
    sample.templates(None, [{"source": "red cat dog"}, {"source": "sun"}], 10, tok, cut=2)
    assert "note: 1 of 2 sources cut to 2 tokens" in capsys.readouterr().out
    for bad in (["--source_length=8"], ["--source_length=-1"]):
        with pytest.raises(SystemExit, match="0 <= --source_length < --block_size"):
            prepare_data.main(args + bad)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SystemExit, match="needs the optional `datasets` package"):
        prepare_data.main(["--pairs", "wmt14", "--hf_config=de-en", "--out_dir", str(tmp_path)])
    monkeypatch.undo()


def test_pairs_from_a_hugging_face_dataset(tmp_path, monkeypatch, capsys):
    """A dataset by name, its split and nested fields (WMT14's rows), as `datasets` streams them."""
    rows = [{"translation": {"de": "rot Katze", "en": "red cat"}}] * 3
    opened = []
    fake = type(sys)("datasets")
    fake.load_dataset = lambda *args, **kwargs: opened.append((args, kwargs)) or rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    prepare_data.main(["--pairs", "wmt14", "--hf_config=de-en", "--split=validation",
                       "--source_field=translation.de", "--target_field=translation.en",
                       "--block_size=12", "--source_length=6", "--out_dir", str(tmp_path)])
    assert opened == [(("wmt14", "de-en"), {"split": "validation", "streaming": True})]
    assert sample.read_rows(str(tmp_path / "wmt14"), "source") == [
        {"source": "rot Katze", "target": "red cat"}] * 3
    assert "3 documents" in capsys.readouterr().out


def test_training_on_the_authors_layout_with_t5_masks_its_padding(t5_dir, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    """train.py on their layout with the T5 embedding: each step's encoder sees the condition and
    padding masks (the draws carry them), and the run writes a checkpoint that knows the layout."""
    pairs = write_jsonl(tmp_path / "p.jsonl", theirs()["pairs"] * 10)
    prepare_data.main(["--pairs", pairs, "--source_field=input", "--target_field=output",
                       "--source_length=4", "--block_size=8", f"--tokenizer={t5_dir}",
                       "--out_dir", str(tmp_path / "data"), "--val_fraction=0.2"])
    seen = []
    monkeypatch.setattr(elf, "t5_embedding", lambda name, tokens, cond=None, valid=None,
                        drop=None: seen.append((cond, valid)) or torch.zeros(*tokens.shape, 16))
    train.main(["--dataset=p", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'o'}",
                f"--encoder={t5_dir}", "--embedding=t5", "--n_layer=1", "--n_embd=32",
                "--n_head=2", "--bottleneck_dim=8", "--block_size=8", "--batch_size=4",
                "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--num_eval_samples=1",
                "--sample_steps=2"])
    cond, valid = seen[0]
    assert cond is not None and valid is not None and not valid.all()   # padding is masked
    assert torch.equal(cond.sum(1) <= 4, torch.ones(4, dtype=torch.bool))
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ckpt["data"]["source_length"] == 4
