"""tools/preprocess_data.py end to end: input formats, bad input, strictness, sentence splitting, Pile
domains, worker counts and interruption.

The expected datasets are built independently: ids from the tokenizers library called directly on the
texts, written with megatron-core's IndexedDatasetBuilder; compression with the zstd command line tool and
Python's gzip; sentence boundaries from nltk's Punkt called directly.
"""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tokenizers import Tokenizer

from megatron_mile.data.cli import preprocess_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "data", "sample", "tokenizer.json")
TOK_FLAGS = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", TOKENIZER]

DOCS = [
    {"text": "Hello world. This is the first document.", "meta": {"pile_set_name": "Github"}},
    {"text": "def f(x):\n    return x + 1\n", "meta": {"pile_set_name": "Github"}},
    {"text": "", "meta": {"pile_set_name": "FreeLaw"}},
    {"text": "The Court held that the statute applies. Mr. Smith disagreed.", "meta": {"pile_set_name": "FreeLaw"}},
    {"text": "Wikipedia is a free online encyclopedia. It was launched in 2001.",
     "meta": {"pile_set_name": "Wikipedia (en)"}},
    {"text": "Caf\u00e9 na\u00efve \u6771\u4eac \U0001F642 unicode text.", "meta": {"pile_set_name": "Wikipedia (en)"}},
]


@pytest.fixture(scope="module")
def ref_tok():
    return Tokenizer.from_file(TOKENIZER)


def _reference(prefix, texts, tok, append_eod=True):
    """The dataset Megatron-LM's tool writes: ids without specials, EOD on non-empty documents."""
    eod = tok.token_to_id("<|endoftext|>")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        if ids and append_eod:
            ids.append(eod)
        builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(prefix + ".idx")


def _same(prefix_a, prefix_b):
    for ext in (".bin", ".idx"):
        with open(prefix_a + ext, "rb") as a, open(prefix_b + ext, "rb") as b:
            if a.read() != b.read():
                return False
    return True


def _jsonl(docs):
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")


def _run(*args):
    return preprocess_main([*TOK_FLAGS, *map(str, args)])


@pytest.mark.parametrize("fmt", ["jsonl", "zst", "gz", "dir", "glob"])
def test_input_formats_byte_identical_to_reference(fmt, tmp_path, ref_tok):
    raw = _jsonl(DOCS)
    src = tmp_path / "src"
    src.mkdir()
    if fmt == "jsonl":
        (src / "a.jsonl").write_bytes(raw)
        spec = src / "a.jsonl"
    elif fmt == "zst":
        (src / "a.jsonl").write_bytes(raw)
        subprocess.run(["zstd", "-q", "--rm", str(src / "a.jsonl"), "-o", str(src / "a.jsonl.zst")], check=True)
        spec = src / "a.jsonl.zst"
    elif fmt == "gz":
        with gzip.open(src / "a.jsonl.gz", "wb") as f:
            f.write(raw)
        spec = src / "a.jsonl.gz"
    else:
        # Two shards, read in sorted name order; a non-matching file is ignored.
        (src / "00.jsonl").write_bytes(_jsonl(DOCS[:4]))
        with gzip.open(src / "01.jsonl.gz", "wb") as f:
            f.write(_jsonl(DOCS[4:]))
        (src / "notes.txt").write_text("not a corpus")
        spec = src if fmt == "dir" else src / "0*.jsonl*"
    assert _run("--input", spec, "--output-prefix", tmp_path / "out", "--append-eod") == 0
    _reference(str(tmp_path / "ref"), [d["text"] for d in DOCS], ref_tok)
    assert _same(str(tmp_path / "out_text_document"), str(tmp_path / "ref"))


def test_two_workers_and_small_batches_give_identical_output(tmp_path, ref_tok):
    docs = DOCS * 40
    (tmp_path / "in.jsonl").write_bytes(_jsonl(docs))
    from megatron_mile.data.preprocess import PreprocessConfig, run_preprocess

    cfg = PreprocessConfig(input=str(tmp_path / "in.jsonl"), output_prefix=str(tmp_path / "w2"),
                           tokenizer={"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": TOKENIZER},
                           append_eod=True, workers=2, batch_lines=7, log_interval=50)
    result = run_preprocess(cfg, log=lambda m: None, progress=lambda m: None)
    assert result.documents == len(docs)
    _reference(str(tmp_path / "ref"), [d["text"] for d in docs], ref_tok)
    assert _same(str(tmp_path / "w2_text_document"), str(tmp_path / "ref"))


def test_without_append_eod_and_several_keys(tmp_path, ref_tok):
    docs = [{"text": d["text"], "title": f"Title {i}"} for i, d in enumerate(DOCS)]
    (tmp_path / "in.jsonl").write_bytes(_jsonl(docs))
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "out",
                "--json-keys", "text", "title") == 0
    _reference(str(tmp_path / "ref_text"), [d["text"] for d in docs], ref_tok, append_eod=False)
    _reference(str(tmp_path / "ref_title"), [d["title"] for d in docs], ref_tok, append_eod=False)
    assert _same(str(tmp_path / "out_text_document"), str(tmp_path / "ref_text"))
    assert _same(str(tmp_path / "out_title_document"), str(tmp_path / "ref_title"))


BAD_LINES = [
    (b'{"text": "good one"}\n', None),
    (b'{"text": "broken\n', "malformed_json"),
    (b'{"title": "no text key"}\n', "missing_key"),
    (b'{"text": "bad \xff\xfe bytes"}\n', "invalid_utf8"),
    (b'\n', None),  # blank lines are passed over silently
    (b'{"text": ""}\n', "empty_text"),
    (b'[1, 2, 3]\n', "not_an_object"),
    (b'{"text": 42}\n', "missing_key"),
    (b'{"text": "good two"}\n', None),
]


def test_bad_input_is_skipped_counted_and_reported(tmp_path, ref_tok, capsys):
    (tmp_path / "in.jsonl").write_bytes(b"".join(line for line, _ in BAD_LINES))
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "out", "--append-eod") == 0
    out = capsys.readouterr().out
    # Line numbers of each reported problem.
    assert "not valid JSON" in out and "in.jsonl:2" in out
    assert "missing or not a string" in out and "in.jsonl:3" in out and "in.jsonl:8" in out
    assert "not valid UTF-8" in out and "in.jsonl:4" in out
    assert "empty" in out and "in.jsonl:6" in out
    assert "not an object" in out and "in.jsonl:7" in out
    # Good documents, and the empty one kept as an empty document (Megatron-LM's output for it).
    _reference(str(tmp_path / "ref"), ["good one", "", "good two"], ref_tok)
    assert _same(str(tmp_path / "out_text_document"), str(tmp_path / "ref"))


@pytest.mark.parametrize("index", [i for i, (_, reason) in enumerate(BAD_LINES) if reason])
def test_strict_makes_each_bad_line_fatal(index, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(BAD_LINES[0][0] + BAD_LINES[index][0])
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "out", "--strict") == 1
    assert "--strict" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_input_is_an_error(content, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(content)
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "out") == 1
    assert "no documents" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_missing_and_unreadable_inputs_are_errors(tmp_path, capsys):
    assert _run("--input", tmp_path / "absent.jsonl", "--output-prefix", tmp_path / "out") == 1
    assert "no such file" in capsys.readouterr().err
    assert _run("--input", str(tmp_path / "*.jsonl"), "--output-prefix", tmp_path / "out") == 1
    assert "matches no file" in capsys.readouterr().err
    (tmp_path / "corrupt.jsonl.zst").write_bytes(b"this is not zstandard data at all")
    assert _run("--input", tmp_path / "corrupt.jsonl.zst", "--output-prefix", tmp_path / "out") == 1
    assert "corrupt.jsonl.zst" in capsys.readouterr().err
    if os.geteuid() != 0:  # root reads any file
        (tmp_path / "locked.jsonl").write_bytes(b'{"text": "x"}\n')
        os.chmod(tmp_path / "locked.jsonl", 0)
        assert _run("--input", tmp_path / "locked.jsonl", "--output-prefix", tmp_path / "out") == 1
        assert "cannot open" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_split_by_domain_and_domain_filter(tmp_path, ref_tok, capsys):
    docs = DOCS + [{"text": "no domain here"}]
    (tmp_path / "in.jsonl").write_bytes(_jsonl(docs))
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "pile", "--append-eod",
                "--split-by-domain") == 0
    assert "meta.pile_set_name is missing" in capsys.readouterr().out
    for domain, name in [("Github", "Github"), ("FreeLaw", "FreeLaw"), ("Wikipedia (en)", "Wikipedia_en")]:
        texts = [d["text"] for d in DOCS if d["meta"]["pile_set_name"] == domain]
        _reference(str(tmp_path / f"ref_{name}"), texts, ref_tok)
        assert _same(str(tmp_path / f"pile_{name}_text_document"), str(tmp_path / f"ref_{name}"))

    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "sub", "--append-eod",
                "--pile-domains", "Github", "Wikipedia (en)") == 0
    texts = [d["text"] for d in DOCS if d["meta"]["pile_set_name"] in ("Github", "Wikipedia (en)")]
    _reference(str(tmp_path / "ref_sub"), texts, ref_tok)
    assert _same(str(tmp_path / "sub_text_document"), str(tmp_path / "ref_sub"))

    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "none",
                "--pile-domains", "ArXiv") == 1
    assert "filtered out" in capsys.readouterr().err


PROSE = [
    "Dr. Watson arrived at 10 a.m. on Monday. He was late again! The train, as usual, had stopped at "
    "Reading for no reason. Mrs. Hudson made tea.\nShe asked whether he would stay. He said no.",
    "Short one. Another short one? Yes, indeed.\n\nA new paragraph starts here. It ends here.",
] * 30


def _write_punkt_tab(params, directory):
    """punkt_tab files as nltk's own data package lays them out (one item per line, tab-separated)."""
    directory.mkdir(parents=True)
    (directory / "collocations.tab").write_text("\n".join(f"{a}\t{b}" for a, b in params.collocations))
    (directory / "sent_starters.txt").write_text("\n".join(params.sent_starters))
    (directory / "abbrev_types.txt").write_text("\n".join(params.abbrev_types))
    (directory / "ortho_context.tab").write_text("\n".join(f"{k}\t{v}" for k, v in params.ortho_context.items()))


def test_split_sentences_with_punkt_dir_matches_nltk(tmp_path, ref_tok):
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

    params = PunktTrainer(" ".join(PROSE)).get_params()
    _write_punkt_tab(params, tmp_path / "punkt" / "english")
    splitter = PunktSentenceTokenizer(params)
    docs = PROSE[:2] + [""]
    (tmp_path / "in.jsonl").write_bytes(_jsonl([{"text": t} for t in docs]))
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "out", "--append-eod",
                "--split-sentences", "--punkt-dir", tmp_path / "punkt") == 0

    eod = ref_tok.token_to_id("<|endoftext|>")
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for text in docs:
        sentences = [ref_tok.encode(s, add_special_tokens=False).ids for s in splitter.tokenize(text)]
        sentences = [s for s in sentences if s]
        if sentences:
            sentences[-1].append(eod)  # EOD ends the last sentence; it is not a sequence of its own
        builder.add_document([t for s in sentences for t in s], [len(s) for s in sentences])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert _same(str(tmp_path / "out_text_sentence"), str(tmp_path / "ref"))
    assert len(IndexedDataset(str(tmp_path / "out_text_sentence"))) > len(docs)


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences_trains_punkt_on_the_input(keep_newlines, tmp_path, ref_tok, capsys):
    (tmp_path / "in.jsonl").write_bytes(_jsonl([{"text": t} for t in PROSE]))
    flags = ["--keep-newlines"] if keep_newlines else []
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "out", "--split-sentences",
                *flags) == 0
    out = capsys.readouterr().out
    assert "training nltk's Punkt" in out
    ds = IndexedDataset(str(tmp_path / "out_text_sentence"))
    first = [ref_tok.decode(ds[i].tolist(), skip_special_tokens=False)
             for i in range(ds.document_indices[0], ds.document_indices[1])]
    assert len(first) >= 4
    assert first[0].rstrip() == "Dr. Watson arrived at 10 a.m. on Monday."
    if keep_newlines:
        assert "".join(first) == PROSE[0]  # whitespace, newlines included, stays with the sentences
    else:
        assert all(s == s.strip() for s in first)
        assert " ".join(first).split() == PROSE[0].split()
    # The trained model is saved and loads back through --punkt-dir.
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "again", "--split-sentences",
                "--punkt-dir", tmp_path / "out_punkt_tab", *flags) == 0
    assert _same(str(tmp_path / "again_text_sentence"), str(tmp_path / "out_text_sentence"))


def test_missing_punkt_dir_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(_jsonl(DOCS))
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "out", "--split-sentences",
                "--punkt-dir", tmp_path / "nope") == 1
    assert "punkt_tab" in capsys.readouterr().err


def test_killed_run_leaves_no_dataset(tmp_path):
    """SIGKILL in the middle of a run: no .bin/.idx pair appears (only temporary files may remain)."""
    src = os.path.join(REPO, "data", "sample", "train.jsonl.zst")
    prefix = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *TOK_FLAGS, "--input", src,
         "--output-prefix", str(prefix), "--append-eod", "--log-interval", "20", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    line = proc.stderr.readline()  # the first progress line: the run is under way
    assert b"Processed" in line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not IndexedDataset.exists(str(prefix) + "_text_document")
    assert not os.path.exists(str(prefix) + "_text_document.idx")


def test_sigterm_cleans_up(tmp_path):
    src = os.path.join(REPO, "data", "sample", "train.jsonl.zst")
    prefix = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *TOK_FLAGS, "--input", src,
         "--output-prefix", str(prefix), "--append-eod", "--log-interval", "20", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert b"Processed" in proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    assert os.listdir(tmp_path) == []  # temporaries removed too


def _die(work):
    os._exit(3)  # a worker killed mid-batch (as by the out-of-memory killer)


def test_dead_worker_fails_cleanly_instead_of_hanging(tmp_path, monkeypatch):
    from megatron_mile.data import preprocess

    (tmp_path / "in.jsonl").write_bytes(_jsonl(DOCS))
    monkeypatch.setattr(preprocess, "_encode_batch", _die)
    cfg = preprocess.PreprocessConfig(input=str(tmp_path / "in.jsonl"), output_prefix=str(tmp_path / "out"),
                                      tokenizer={"tokenizer_type": "HuggingFaceTokenizer",
                                                 "tokenizer_model": TOKENIZER}, workers=2)
    start = time.time()
    with pytest.raises(preprocess.PreprocessError, match="worker process died"):
        preprocess.run_preprocess(cfg, log=lambda m: None, progress=lambda m: None)
    assert time.time() - start < 30
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_pre_split_sentence_lists_are_sequences(tmp_path, ref_tok):
    """A list of strings is a document already split into sentences (Megatron-LM's _ss files)."""
    docs = [{"text": ["First sentence.", "Second one!", ""]}, {"text": []}, {"text": ["Only one."]}]
    (tmp_path / "in.jsonl").write_bytes(_jsonl(docs))
    assert _run("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "out", "--append-eod") == 0
    eod = ref_tok.token_to_id("<|endoftext|>")
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for doc in docs:
        sentences = [ref_tok.encode(s, add_special_tokens=False).ids for s in doc["text"]]
        sentences = [s for s in sentences if s]
        if sentences:
            sentences[-1].append(eod)
        builder.add_document([t for s in sentences for t in s], [len(s) for s in sentences])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert _same(str(tmp_path / "out_text_document"), str(tmp_path / "ref"))


def test_preprocessing_does_not_import_torch_or_megatron():
    code = ("import sys; import megatron_mile.data.preprocess, megatron_mile.data.cli, megatron_mile.data.merge; "
            "bad = [m for m in ('torch', 'megatron') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
