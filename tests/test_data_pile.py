"""Pile sampling weights, --data-path blends, tools/pile_blend.py, and the shipped sample corpus."""

import io
import json
import os

import numpy as np
import pytest

from megatron_mile.data.cli import pile_blend_main
from megatron_mile.data.indexed_writer import IndexedDatasetWriter
from megatron_mile.data.pile import BlendError, blend_data_path, load_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "sample")

# A few of the MiLe paper's Pile sampling rates, typed in from the paper's configuration.
PAPER_RATES = {"PubMed Central": 0.1661, "ArXiv": 0.1175, "Github": 0.0566, "Wikipedia (en)": 0.0660,
               "FreeLaw": 0.0527, "Enron Emails": 0.0017}


def _dataset(prefix):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document([1, 2, 3])
        w.finalize()


def test_shipped_weights_are_the_papers():
    weights = load_weights()
    assert len(weights) == 22
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-3)
    for domain, rate in PAPER_RATES.items():
        assert weights[domain] == rate


def test_blend_renormalises_over_present_domains(tmp_path):
    _dataset(str(tmp_path / "gh"))
    _dataset(str(tmp_path / "wiki"))
    blend = blend_data_path({"Github": str(tmp_path / "gh"), "Wikipedia (en)": str(tmp_path / "wiki")})
    assert blend[1::2] == [str(tmp_path / "gh"), str(tmp_path / "wiki")]
    w = [float(x) for x in blend[0::2]]
    assert w[0] == pytest.approx(0.0566 / (0.0566 + 0.0660))
    assert w[1] == pytest.approx(0.0660 / (0.0566 + 0.0660))
    # A custom weights file.
    (tmp_path / "w.json").write_text(json.dumps({"_note": "x", "Github": 3, "Wikipedia (en)": 1}))
    blend = blend_data_path({"Github": str(tmp_path / "gh"), "Wikipedia (en)": str(tmp_path / "wiki")},
                            load_weights(str(tmp_path / "w.json")))
    assert [float(x) for x in blend[0::2]] == [0.75, 0.25]


def test_blend_errors(tmp_path):
    _dataset(str(tmp_path / "gh"))
    with pytest.raises(BlendError, match="no sampling weight for domain"):
        blend_data_path({"Python docs": str(tmp_path / "gh")})
    os.remove(tmp_path / "gh.idx")
    with pytest.raises(BlendError, match=r"missing .*gh\.idx"):
        blend_data_path({"Github": str(tmp_path / "gh")})
    with pytest.raises(BlendError, match="no domain"):
        blend_data_path({})


def test_cli_prints_blend(tmp_path, capsys):
    for name in ("Github", "FreeLaw"):
        _dataset(str(tmp_path / f"pile_{name}_text_document"))
    assert pile_blend_main(["--output-prefix", str(tmp_path / "pile"), "--format", "json"]) == 0
    blend = json.loads(capsys.readouterr().out)
    # Domains come in the weights file's order (Github is listed before FreeLaw there).
    assert blend[1::2] == [str(tmp_path / "pile_Github_text_document"), str(tmp_path / "pile_FreeLaw_text_document")]
    assert float(blend[0]) == pytest.approx(0.0566 / (0.0527 + 0.0566))
    assert pile_blend_main(["--domain", "Github", str(tmp_path / "pile_Github_text_document")]) == 0
    assert capsys.readouterr().out.split() == ["1.0", str(tmp_path / "pile_Github_text_document")]
    assert pile_blend_main(["--domain", "Nope", str(tmp_path / "x")]) == 1
    assert "no sampling weight" in capsys.readouterr().err


def test_sample_corpus_is_in_pile_format():
    import zstandard

    seen = {}
    for split in ("train", "val"):
        with open(os.path.join(SAMPLE, f"{split}.jsonl.zst"), "rb") as f:
            text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8").read()
        docs = [json.loads(line) for line in text.splitlines()]
        assert docs, split
        for d in docs:
            assert isinstance(d["text"], str) and d["text"]
            seen.setdefault(split, set()).add(d["meta"]["pile_set_name"])
    assert seen["train"] == {"Wikipedia (en)", "Github", "FreeLaw"}
    assert seen["val"] <= seen["train"]
    assert set(seen["train"]) <= set(load_weights())
    assert os.path.getsize(os.path.join(SAMPLE, "tokenizer.json")) < 1 << 20


def test_blend_feeds_megatron_gpt_dataset(tmp_path):
    """Per-domain datasets from tools/preprocess_data.py --split-by-domain, blended with the Pile weights,
    load through megatron-core's BlendedMegatronDatasetBuilder + GPTDataset: every sample is made of
    contiguous pieces of the documents' token ids, and the domains are sampled in the blend's proportions."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list
    from tokenizers import Tokenizer

    from megatron_mile.data.cli import preprocess_main
    from megatron_mile.data.tokenizers import build_tokenizer

    texts = {"Github": [f"def function_{i}(x):\n    return x * {i} + {i * i}\n" for i in range(30)],
             "FreeLaw": [f"Case {i}. The court finds for the plaintiff in matter number {i * 7}." for i in range(30)]}
    docs = [{"text": t, "meta": {"pile_set_name": d}} for d in texts for t in texts[d]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tok_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", SAMPLE]
    assert preprocess_main([*tok_flags, "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                            str(tmp_path / "pile"), "--append-eod", "--split-by-domain"]) == 0
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert pile_blend_main(["--output-prefix", str(tmp_path / "pile")]) == 0
    blend = out.getvalue().split()

    ref = Tokenizer.from_file(os.path.join(SAMPLE, "tokenizer.json"))
    eod = ref.token_to_id("<|endoftext|>")
    doc_ids = [ref.encode(t, add_special_tokens=False).ids for d in texts for t in texts[d]]

    config = GPTDatasetConfig(random_seed=1234, sequence_length=16, blend_per_split=[get_blend_from_list(blend), None, None],
                              split=None, tokenizer=build_tokenizer("HuggingFaceTokenizer", tokenizer_model=SAMPLE),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              path_to_cache=None, mmap_bin_files=True)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [300, None, None], lambda: True, config).build()
    counts = [0, 0]
    for i in range(len(train)):
        sample = train[i]
        counts[int(sample["dataset_id"])] += 1
        window = sample["tokens"].tolist() + sample["labels"].tolist()[-1:]
        pieces, current = [], []
        for t in window:
            if t == eod:
                pieces.append(current)
                current = []
            else:
                current.append(t)
        pieces.append(current)
        for piece in pieces:
            if piece:
                assert any(_contains(ids, piece) for ids in doc_ids), (i, piece)
    weights = [float(w) for w in blend[0::2]]
    for count, weight in zip(counts, weights):
        assert abs(count / len(train) - weight) < 0.02


def _contains(seq, sub):
    n = len(sub)
    return any(seq[i:i + n] == sub for i in range(len(seq) - n + 1))
