"""tools/preprocess_data.py under faults: token ids a tokenizer file numbers past its own size, the bad-input
report, progress with an ETA, and worker processes that must end with the tool however it is stopped."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_mile.data import preprocess_report
from megatron_mile.data.cli import preprocess_main
from megatron_mile.data.readers import InputProgress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "data", "sample", "tokenizer.json")
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _outputs(directory, stem):
    return [name for name in os.listdir(directory) if name.startswith(stem)]


# ------------------------------------------------------------------ token ids outside the vocabulary


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("bad_id, dtype_note", [(9000, False), (70000, True)])
def test_token_ids_past_the_vocabulary_are_refused(bad_id, dtype_note, workers, tmp_path, capsys):
    """The sample tokenizer (8,192 entries, uint16 datasets) with ' the' renumbered past its size."""
    tokenizer = json.load(open(TOKENIZER))
    tokenizer["model"]["vocab"]["\u0120the"] = bad_id
    broken = tmp_path / "tokenizer.json"
    broken.write_text(json.dumps(tokenizer))
    source = _jsonl(tmp_path / "in.jsonl", ["A cat.", "Then the dog ran.", "More text."])
    status = preprocess_main(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(broken),
                              "--input", str(source), "--output-prefix", str(tmp_path / "out"),
                              "--workers", str(workers)])
    err = capsys.readouterr().err
    assert status == 1
    assert f"the tokenizer {broken} produced token id {bad_id}, outside its vocabulary of 8,192 entries" in err
    assert ("uint16 tokens cannot even store" in err) == dtype_note
    assert "Traceback" not in err
    assert _outputs(tmp_path, "out") == []


def test_null_tokenizer_ids_past_vocab_size_are_refused(tmp_path, capsys):
    source = _jsonl(tmp_path / "in.jsonl", ["1 2 3", "4 150 6"])
    assert preprocess_main(["--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--input", str(source),
                            "--output-prefix", str(tmp_path / "out")]) == 1
    assert "produced token id 150, outside its vocabulary of 101 entries" in capsys.readouterr().err
    assert _outputs(tmp_path, "out") == []


# ------------------------------------------------------------------ the bad-input report


def test_each_kind_of_bad_input_is_reported_once_with_a_count_and_the_first_lines(tmp_path, capsys):
    empty = {1, 10, 20}
    lines = ['{"text": "broken' if i % 3 == 0 else '{"text": ""}' if i in empty else json.dumps({"text": f"doc {i}"})
             for i in range(1, 31)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert preprocess_main(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", TOKENIZER,
                            "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                            "--workers", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    path = tmp_path / "in.jsonl"
    (json_line,) = [line for line in out if "not valid JSON" in line]
    assert json_line == (f"Bad input: 10 lines skipped, line is not valid JSON: first at {path}:3, {path}:6, "
                         f"{path}:9, {path}:12, {path}:15 (and 5 more)")
    (empty_line,) = [line for line in out if "empty" in line]
    assert empty_line == (f"Bad input: 3 lines kept as empty documents, text is empty: first at {path}:1, "
                          f"{path}:10, {path}:20")


# ------------------------------------------------------------------ progress and ETA


def test_progress_lines_are_throttled_and_give_rates_and_an_eta(tmp_path, monkeypatch):
    source = _jsonl(tmp_path / "in.jsonl", ["x" * 100] * 10)
    input_progress = InputProgress([str(source)])
    total = input_progress.total_bytes
    clock = {"now": 1000.0}
    monkeypatch.setattr(preprocess_report.time, "time", lambda: clock["now"])
    lines = []
    log = preprocess_report.ProgressLog(lines.append, log_interval=10, input_progress=input_progress)
    monkeypatch.setattr(input_progress, "bytes_read", lambda: total // 4)

    clock["now"] += 2.0
    log.update(documents=5, n_bytes=2 * 2**20)  # fewer than --log-interval documents: nothing
    log.update(documents=10, n_bytes=2 * 2**20)  # the first line comes at once
    assert lines == ["Processed 10 documents, 2.00 MB (5 docs/s, 1.00 MB/s); 25.0% of the input, ETA 0:00:06"]
    clock["now"] += 1.0
    log.update(documents=40, n_bytes=3 * 2**20)  # too soon after the last line
    assert len(lines) == 1
    clock["now"] += preprocess_report.PROGRESS_MIN_SECONDS
    log.update(documents=45, n_bytes=4 * 2**20)
    assert len(lines) == 2 and lines[1].startswith("Processed 45 documents, 4.00 MB (")


@pytest.mark.parametrize("compress", [False, True])
def test_a_run_reports_progress_with_an_eta(compress, tmp_path):
    from megatron_mile.data.preprocess import PreprocessConfig, run_preprocess

    source = _jsonl(tmp_path / "in.jsonl", [f"document number {i} " * 20 for i in range(3000)])
    if compress:
        subprocess.run(["zstd", "-q", "--rm", str(source), "-o", str(source) + ".zst"], check=True)
        source = str(source) + ".zst"
    lines = []
    config = PreprocessConfig(input=str(source), output_prefix=str(tmp_path / "out"), batch_lines=50,
                              tokenizer={"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": TOKENIZER},
                              log_interval=100)
    run_preprocess(config, log=lambda m: None, progress=lines.append)
    assert lines and lines[0].startswith("Processed 100 documents")
    assert all("docs/s" in line and "MB/s" in line and "% of the input, ETA " in line for line in lines)


# ------------------------------------------------------------------ workers end with the tool


def _big_input(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    return _jsonl(tmp_path / "big.jsonl", [" ".join(words[(i + j) % 8] for j in range(150)) for i in range(20000)])


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def _assert_gone(pids, within_s):
    deadline = time.time() + within_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    survivors = [p for p in pids if _alive(p)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"worker processes {survivors} outlived the tool"


def _tool_args(tmp_path, source):
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", TOKENIZER, "--input", str(source),
            "--output-prefix", str(tmp_path / "out"), "--workers", "2", "--log-interval", "50"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_workers_end_when_the_tool_is_stopped_mid_run(signum, tmp_path):
    proc = subprocess.Popen([sys.executable, TOOL, *_tool_args(tmp_path, _big_input(tmp_path))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert b"Processed" in proc.stderr.readline()  # workers are encoding
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signum)
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
    _assert_gone(workers, within_s=10)
    if signum != signal.SIGKILL:
        assert _outputs(tmp_path, "out") == []


# The pool forks a worker and is stopped before it has recorded it (the slow part of a start-up, made slow).
_SLOW_START = textwrap.dedent("""
    import multiprocessing.process, sys, time
    real_start = multiprocessing.process.BaseProcess.start
    def start(self):
        real_start(self)
        print("worker", self.pid, flush=True)
        time.sleep(3)
    multiprocessing.process.BaseProcess.start = start
    sys.path.insert(0, {repo!r})
    from megatron_mile.data.cli import preprocess_main
    sys.exit(preprocess_main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_workers_end_when_the_tool_is_stopped_while_starting_them(signum, tmp_path):
    script = tmp_path / "slow_start.py"
    script.write_text(_SLOW_START.format(repo=REPO))
    proc = subprocess.Popen([sys.executable, str(script), *_tool_args(tmp_path, _big_input(tmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("worker "):
            line = proc.stdout.readline()
        worker = int(line.split()[1])
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
    _assert_gone([worker], within_s=10)
