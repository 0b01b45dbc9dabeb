"""The batch pipeline: resuming with --skip-existing, --shard partitions, batch-size independence."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camcli.errors import UsageError
from camcli.options import parse_shard
from camcli.pipeline import ExplainOptions, run_explain as explain
from camcli.records import load_run

TINY = dict(model="toymodels:tiny_cnn", workers=0, quiet=True)


@pytest.fixture
def folder(make_images) -> Path:  # noqa: ANN001
    return make_images("many", 12)


def test_skip_existing_resumes_and_redoes_only_missing(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = explain([folder], ExplainOptions(out=str(out), **TINY))
    assert first.summary["counts"]["ok"] == 12
    first_images = first.images  # the next run into this folder replaces records.jsonl
    stamp = (out / "img00.gradcam.png").stat().st_mtime_ns
    again = explain([folder], ExplainOptions(out=str(out), skip_existing=True, **TINY))
    assert again.summary["counts"]["reused"] == 12 and again.summary["counts"]["ok"] == 12
    assert (out / "img00.gradcam.png").stat().st_mtime_ns == stamp
    assert [{k: v for k, v in im.items() if k != "reused"} for im in again.images] == first_images
    with pytest.raises(UsageError, match="now holds the records of another run"):
        first.images
    assert all(im["reused"] for im in again.images)
    (out / "img05.gradcam.png").unlink()
    third = explain([folder], ExplainOptions(out=str(out), skip_existing=True, **TINY))
    assert third.summary["counts"]["reused"] == 11 and (out / "img05.gradcam.png").is_file()


def test_skip_existing_after_an_interrupted_run(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    explain([folder], ExplainOptions(out=str(out), **TINY))
    journal = out / "records.jsonl"
    lines = journal.read_text().splitlines()
    # as if killed after 4 images, in the middle of writing the fifth line, before summary.json
    journal.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    (out / "summary.json").unlink()
    res = explain([folder], ExplainOptions(out=str(out), skip_existing=True, **TINY))
    assert res.summary["counts"]["reused"] == 4 and res.summary["counts"]["ok"] == 12


def test_changed_options_reuse_nothing(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    explain([folder], ExplainOptions(out=str(out), **TINY))
    res = explain([folder], ExplainOptions(out=str(out), skip_existing=True, method="layercam", **TINY))
    assert res.summary["counts"]["reused"] == 0


def test_shards_partition_the_inputs_exactly(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[str] = []
    for k in (1, 2, 3):
        res = explain([folder], ExplainOptions(out=str(out), shard=f"{k}/3", **TINY))
        assert res.summary_path.name == f"summary.shard-{k}-of-3.json"
        seen.extend(Path(im["path"]).name for im in res.images)
    assert sorted(seen) == sorted(p.name for p in folder.iterdir())
    assert len(seen) == len(set(seen)) == 12
    # deterministic: the same shard twice gives the same images
    a = explain([folder], ExplainOptions(out=str(tmp_path / "a"), shard="2/3", **TINY)).images
    assert [im["path"] for im in a] == [im["path"] for im in load_run(out, (2, 3))["images"]]


@pytest.mark.parametrize("bad", ["0/3", "4/3", "x", "1/0", "2"])
def test_bad_shard_spec(bad: str) -> None:
    with pytest.raises(UsageError, match="--shard"):
        parse_shard(bad)


def test_batch_size_never_changes_a_map(folder: Path, tmp_path: Path) -> None:
    maps = {}
    for bs in (1, 5, 8):
        out = tmp_path / f"bs{bs}"
        res = explain([folder], ExplainOptions(out=str(out), batch_size=bs, save_raw=True,
                                               method="gradcam,scorecam", **TINY))
        assert res.summary["counts"]["ok"] == 12
        maps[bs] = {p.name: np.load(p) for p in sorted(out.glob("*.npy"))}
    assert len(maps[1]) == 24
    for bs in (5, 8):
        for name, m in maps[1].items():
            assert np.allclose(m, maps[bs][name], atol=1e-5), (bs, name)


def test_workers_decode_in_parallel_processes(folder: Path, tmp_path: Path) -> None:
    res = explain([folder], ExplainOptions(out=str(tmp_path / "w"), model="toymodels:tiny_cnn", workers=2, quiet=True))
    assert res.summary["counts"]["ok"] == 12
    shutil.rmtree(tmp_path / "w")


def test_interrupted_run_leaves_only_complete_files(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen = [0]

    def progress(n: int) -> None:  # Ctrl-C arrives in the main thread after the second batch
        seen[0] += n
        if seen[0] >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        explain([folder], ExplainOptions(out=str(out), batch_size=4, save_raw=True, **TINY), progress=progress)
    assert not list(out.rglob("*.part")), "temporary files must not survive an interruption"
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) <= 8  # only the two batches computed before the interrupt can have outputs
    for p in pngs:  # every file that exists decodes completely
        with Image.open(p) as im:
            im.load()
    for p in out.glob("*.npy"):
        assert np.load(p).shape in {(32, 48), (40, 40), (48, 32)}
    # writes already running finished (and were journaled); queued ones were cancelled.
    # --skip-existing reuses exactly the finished images and redoes the rest.
    res = explain([folder], ExplainOptions(out=str(out), batch_size=4, save_raw=True, skip_existing=True, **TINY))
    assert res.summary["counts"]["ok"] == 12 and res.summary["counts"]["reused"] == len(pngs)
