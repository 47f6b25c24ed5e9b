"""tools/plot_comparison.py: PNGs, markdown and JSON from small fake inputs; clear errors for bad ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")  # the `eval` and `test` extras install it

from megatron_mile.evaluation.comparison import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BUCKETS = ("high", "medium", "low")


def fake_summary(path: Path, lm_losses) -> None:
    iterations = list(range(1, len(lm_losses) + 1))
    path.write_text(json.dumps({
        "iterations": len(lm_losses), "wall_seconds": 12.0, "final_train_lm_loss_last10": lm_losses[-1],
        "validation": [{"iteration": len(lm_losses), "lm_loss": lm_losses[-1] + 0.1}],
        "history": {"iteration": iterations, "lm_loss": lm_losses, "loss": lm_losses, "skipped": [False] * len(lm_losses)},
    }))


def fake_buckets(path: Path, loss_type: str, perplexities) -> None:
    path.write_text(json.dumps({
        "loss_type": loss_type, "loss_settings": {"gamma": 1.0 if loss_type != "cross_entropy" else None},
        "buckets": [{"bucket": b, "perplexity": p, "loss": 1.0, "tokens": 10, "training_fraction": f, "token_ids": 3}
                    for b, p, f in zip(BUCKETS, perplexities, (0.8, 0.15, 0.05))],
        "overall": {"perplexity": perplexities[0] * 1.5, "loss": 2.0, "tokens": 30},
        "domains": {"Github": {"loss": 2.0, "perplexity": 7.4, "tokens": 20},
                    "FreeLaw": {"loss": 2.5, "perplexity": 12.2, "tokens": 10}},
    }))


def test_runs_give_pngs_markdown_and_a_results_json_that_redraws(tmp_path):
    runs = []
    for name, loss_type, curve, ppl in (("ce", "cross_entropy", [7.0, 6.0, 5.5], (20.0, 300.0, 900.0)),
                                        ("mile", "mile", [7.0, 5.9, 5.4], (21.0, 280.0, None))):
        fake_summary(tmp_path / f"{name}_summary.json", curve)
        fake_buckets(tmp_path / f"{name}_buckets.json", loss_type, ppl)
        runs += ["--run", name, str(tmp_path / f"{name}_summary.json"), str(tmp_path / f"{name}_buckets.json")]
    out = tmp_path / "out"
    assert main(runs + ["--output-dir", str(out), "--title", "CE vs MiLe"]) == 0
    for png in ("lm_loss.png", "bucket_perplexity.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    text = (out / "results.md").read_text()
    assert "# CE vs MiLe" in text and "| mile | mile (gamma=1) |" in text
    assert "280.00 (-6.7%)" in text  # medium bucket against the first run
    assert "n/a" in text  # an empty bucket's perplexity
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["ce", "mile"]
    assert results["runs"][1]["history"]["lm_loss"] == [7.0, 5.9, 5.4]

    # The results file alone redraws everything.
    again = tmp_path / "again"
    assert main(["--results-json", str(out / "results.json"), "--output-dir", str(again)]) == 0
    assert (again / "bucket_perplexity.png").read_bytes().startswith(PNG_MAGIC)


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    fake_buckets(tmp_path / "b.json", "mile", (1.0, 2.0, 3.0))
    (tmp_path / "old_summary.json").write_text(json.dumps({"iterations": 3}))
    assert main(["--run", "x", str(tmp_path / "old_summary.json"), str(tmp_path / "b.json"),
                 "--output-dir", str(tmp_path / "o")]) == 1
    assert "has no per-iteration history" in capsys.readouterr().err
    assert main(["--run", "x", str(tmp_path / "missing.json"), str(tmp_path / "b.json"),
                 "--output-dir", str(tmp_path / "o")]) == 1
    assert "missing.json does not exist" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path / "o")]) == 1
    assert "give either --run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_tool_runs_as_a_script(tmp_path):
    results = {"runs": [{"name": "a", "loss": "cross_entropy", "iterations": 2, "wall_seconds": 1.0,
                         "final_train_lm_loss": 5.0, "final_validation_lm_loss": None,
                         "history": {"iteration": [1, 2], "lm_loss": [6.0, 5.0]}, "validation": [],
                         "buckets": {b: {"perplexity": 10.0, "token_ids": 1, "training_fraction": 0.3} for b in BUCKETS},
                         "overall": {"perplexity": 10.0}, "domains": {}}]}
    (tmp_path / "r.json").write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_comparison.py"), "--results-json",
                           str(tmp_path / "r.json"), "--output-dir", str(tmp_path / "png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "png" / "lm_loss.png").read_bytes().startswith(PNG_MAGIC)


def compare_script_runs(script: str, losses: str = "") -> list:
    """(name, loss flags) of every run of an examples/ comparison script: its train_and_evaluate lines, or,
    where the script picks its runs by name from LOSSES (`losses`: that variable; empty: the default), what
    its loss_flags function gives each name (bash evaluates the script's own definitions)."""
    import shlex

    text = (REPO / "examples" / script).read_text()
    if "\nloss_flags() {" in text:
        show = (f'LOSSES="{losses}"; eval "$(sed -n \'/^LOSSES=/,/^}}/p\' examples/{script})"; '
                'for n in $LOSSES; do echo "$n $(loss_flags "$n")"; done')
        out = subprocess.run(["bash", "-c", show], cwd=REPO, capture_output=True, text=True, check=True).stdout
        return [(words[0], words[1:]) for words in map(shlex.split, out.splitlines())]
    runs = []
    for line in text.splitlines():
        if line.startswith("train_and_evaluate "):
            words = shlex.split(line)
            runs.append((words[1], words[2:]))
    return runs


ALL_COMPARED = "cross_entropy focal mile dft mile_zloss cross_entropy_ls mile_ls entropy_selection ce_selection"


@pytest.mark.parametrize("script, names, losses", [
    ("compare_losses.sh", ["cross_entropy", "focal", "mile"], ""),
    ("compare_losses.sh", ALL_COMPARED.split(), ALL_COMPARED),
    ("sweep_gamma.sh", ["cross_entropy", "mile_gamma0.5", "mile", "mile_gamma2"], ""),
])
def test_comparison_scripts_train_with_flags_that_validate(script, names, losses):
    from megatron_mile.arguments import parse_args

    # The shared training flags, expanded by bash from the script itself with stand-in data paths.
    expand = (
        'TRAIN_ITERS=300; TP=1; DATA_DIR=/d; DATA_PATH=(1 /d/sample_Github_text_document); '
        'TOKENIZER=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model t.json); '
        'eval "$(sed -n "/^COMMON_FLAGS=(/,/^)/p" examples/_compare_common.sh)"; printf "%s\\n" "${COMMON_FLAGS[@]}"'
    )
    common = subprocess.run(["bash", "-c", expand], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")[:-1]
    assert "--seed" in common and "--train-iters" in common
    runs = compare_script_runs(script, losses)
    assert [name for name, _ in runs] == names
    specs = set()
    for _, loss_flags in runs:
        config = parse_args(common + loss_flags, world_size=2)  # the scripts' default: 2 processes
        assert config.model.seq_length == 128 and config.training.global_batch_size == 16
        l = config.loss
        specs.add((l.loss_type, l.gamma, l.label_smoothing, l.z_loss_coeff))
    assert len(specs) == len(runs)  # every run differs in its loss only
