"""benchmarks/RESULTS.md: a benchmark run rewrites only its own marked blocks and keeps the rest."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import results_md as R  # noqa: E402  (benchmarks/results_md.py)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HAND = "A paragraph written by hand, in no block.\n"
ORDER = ["a", "b", "c"]


def test_update_replaces_a_block_in_place_and_keeps_everything_else() -> None:
    text = "# title\n\n" + R.block("a", ["old a"]) + "\n" + HAND + "\n" + R.block("other", ["not ours"]) + "\n"
    new = R.update(text, {"a": ["new a", "", "two"]}, ORDER)
    assert new == text.replace("old a", "new a\n\ntwo")
    assert R.update(new, {"a": ["new a", "", "two"]}, ORDER) == new  # idempotent


def test_a_missing_block_goes_after_its_predecessor_else_before_its_successor_else_at_the_end() -> None:
    text = R.block("a", ["A"]) + "\n" + HAND + R.block("c", ["C"])
    got = R.update(text, {"b": ["B"]}, ORDER)
    assert R.keys(got) == ["a", "b", "c"] and HAND in got
    assert R.keys(R.update(R.block("c", ["C"]), {"a": ["A"]}, ORDER)) == ["a", "c"]
    assert R.keys(R.update(HAND, {"b": ["B"]}, ORDER)) == ["b"] and R.update(HAND, {"b": ["B"]}, ORDER).startswith(HAND)
    assert R.update("", {"a": ["A"]}, ORDER) == R.block("a", ["A"])


def test_the_committed_results_keep_the_ray_section_and_say_how_to_fill_the_cuda_one() -> None:
    text = RESULTS.read_text(encoding="utf-8")
    assert "ray_vs_local" in R.keys(text) and "bench/cuda" in R.keys(text)
    cuda = text[text.index(R.begin("bench/cuda")) : text.index(R.end("bench/cuda"))]
    assert "Not measured" in cuda and "python benchmarks/bench.py --device cuda" in cuda


def outside(text: str, keys: list[str]) -> str:
    """``text`` without the blocks ``keys`` (and the blank lines that set inserted blocks apart)."""
    for k in keys:
        text = re.sub(re.escape(R.begin(k)) + ".*?" + re.escape(R.end(k)) + "\n", "", text, flags=re.S)
    return re.sub(r"\n{3,}", "\n\n", text)


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    import bench as B  # benchmarks/bench.py (imports the peers, which the dev extra installs)

    monkeypatch.setattr(B, "machine", lambda: ["- machine: a test"])
    return B


@pytest.mark.parametrize("present", [True, False], ids=["replaced", "inserted"])
def test_a_section_rerun_rewrites_its_blocks_only(bench, tmp_path: Path, present: bool) -> None:  # noqa: ANN001
    out = tmp_path / "RESULTS.md"
    ours = ["bench/startup", "bench/targets/startup"]
    before = RESULTS.read_text(encoding="utf-8")
    if not present:  # a RESULTS.md written before the section existed
        before = outside(before, ours)
        assert "bench/startup" not in before
    out.write_text(before, encoding="utf-8")
    blocks = bench.section_blocks("startup", ["| a table |"], {"startup_ratio": 1.5}, "_Measured now._")
    bench.write_blocks(out, blocks, "cpu")
    after = out.read_text(encoding="utf-8")
    assert outside(after, ours) == outside(before, ours)  # every other block (Ray's too) and all text kept byte for byte
    keys = R.keys(after)
    assert keys.index("bench/memory") < keys.index("bench/startup") < keys.index("bench/targets")
    assert keys.index("bench/targets/memory") < keys.index("bench/targets/startup") < keys.index("bench/cuda")
    assert "1.50x, met" in after and "| a table |" in after


def test_a_gpu_run_fills_the_cuda_section_and_keeps_the_cpu_ones(bench, tmp_path: Path) -> None:  # noqa: ANN001
    import torch

    out = tmp_path / "RESULTS.md"
    before = RESULTS.read_text(encoding="utf-8")
    out.write_text(before, encoding="utf-8")
    bench.DEVICE = torch.device("cuda")
    try:
        blocks = bench.section_blocks("e2e", ["| gpu |"], {"e2e_ratio": 3.0, "e2e_api_ratio": 4.0}, "_now._")
        bench.write_blocks(out, blocks, "cuda")
    finally:
        bench.DEVICE = torch.device("cpu")
    after = out.read_text(encoding="utf-8")
    new = ["bench/cuda", "bench/cuda/e2e", "bench/cuda/targets", "bench/cuda/targets/e2e"]
    assert outside(after, new) == outside(before, ["bench/cuda"])
    assert "Not measured" not in after and "### 2. End to end on a folder" in after and "| gpu |" in after
    assert R.keys(after).index("bench/cuda/targets/e2e") < R.keys(after).index("ray_vs_local")


def test_only_names_known_sections(bench, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    monkeypatch.setattr(sys, "argv", ["bench.py", "--only", "startup,nope"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and "unknown section 'nope'" in capsys.readouterr().err
