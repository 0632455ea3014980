"""Judging samples (README: Judging samples): unigram entropy, the pooled NLL of generative
perplexity, sample.py --eval."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import sample
from prepare_data import get_tokenizer

EOT = 50256  # GPT-2's end-of-text, the judge's BOS


def test_unigram_entropy_by_hand():
    # frequencies 1/2, 1/4, 1/4
    assert sample.unigram_entropy([7, 7, 3, 9]) == pytest.approx(
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    )
    assert sample.unigram_entropy([5, 5, 5]) == 0.0 and sample.unigram_entropy([]) == 0.0


def test_samples_are_cut_at_end_of_text_and_judged_as_the_gpt2_tokens_of_their_text(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no judge: entropy only
    model = SimpleNamespace(cfg=SimpleNamespace(tokenizer="gpt2"))
    ids = get_tokenizer("gpt2").encode(" to be or not to be")
    assert sample.decode_texts(model, [ids + [EOT] + ids, ids]) == [" to be or not to be"] * 2
    args = SimpleNamespace(judge="surely-not-a-model", samples="s.jsonl",
                           results=str(tmp_path / "results.jsonl"))
    sample.judge_samples([" to be or not to be"], args, sample.SamplerConfig(), None, "cpu")
    summary = json.loads((tmp_path / "results.jsonl").read_text())
    assert summary["entropy"] == pytest.approx(sample.unigram_entropy(ids), abs=1e-4)


def test_pooled_nll_by_hand():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=6, n_embd=16, n_layer=1, n_head=2
    )
    judge = transformers.GPT2LMHeadModel(config).eval()
    samples = [[5, 6, EOT], [9, 8, 7, 6, 5, 4, 3]]  # the second is longer than the context
    total, count = sample.pooled_nll(judge, samples)
    expected, n = 0.0, 0
    for tokens in samples:
        ids = ([EOT] + tokens)[:6]  # BOS, then at most the context
        with torch.no_grad():
            logits = judge(torch.tensor([ids])).logits[0]
        for i in range(1, len(ids)):
            expected -= torch.log_softmax(logits[i - 1].double(), -1)[ids[i]].item()
            n += 1
    assert count == n == 3 + 5
    assert total == pytest.approx(expected, rel=1e-5)


def test_eval_without_judge_weights_reports_entropy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no downloads: the judge cannot load
    texts = tmp_path / "samples.jsonl"
    texts.write_text(
        json.dumps({"text": "to be or not to be"}) + "\n" + json.dumps({"text": "aaa aaa"}) + "\n"
    )
    sample.main(["--eval", f"--samples={texts}", "--judge=surely-not-a-model"])
    out = capsys.readouterr().out
    assert "no generative perplexity" in out and "Traceback" not in out
    summary = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert summary["gen_ppl"] is None and summary["n"] == 2 and summary["entropy"] > 0
    assert "sampler" not in summary   # the file's sampler settings are unknown: none claimed


def test_eval_of_a_missing_or_empty_samples_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    for path in (tmp_path / "missing.jsonl", tmp_path / "empty.jsonl"):
        with pytest.raises(SystemExit, match=f"^error: (no samples in )?{path}"):
            sample.main(["--eval", f"--samples={path}"])
