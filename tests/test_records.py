"""The records stream (records.jsonl), summaries rebuilt from it, and merging shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from camcli.cli import app
from camcli.pipeline import ExplainOptions, run_explain as explain
from camcli.records import load_run

runner = CliRunner()
TINY = dict(model="toymodels:tiny_cnn", workers=0, quiet=True)
TINY_FLAGS = ["--model", "toymodels:tiny_cnn", "--workers", "0", "-q"]


@pytest.fixture
def folder(make_images) -> Path:  # noqa: ANN001
    return make_images("in", 6, seed=2, sub=3, broken=True)  # sub/img00.png, sub/img03.png


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_stream_one_line_per_image_and_the_summary_holds_counts_not_records(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = explain([folder], ExplainOptions(out=str(out), recursive=True, method="gradcam,layercam", **TINY))
    assert res.exit_code == 3  # broken.png
    header, *records = lines(out / "records.jsonl")
    assert header["schema_version"] == 2 and header["fingerprint"] == res.summary["fingerprint"]
    assert header["shaping"]["method"] == "gradcam,layercam" and header["shaping"]["methods"] == ["gradcam", "layercam"]
    assert header["inputs"] == {"total": 7, "selected": 7, "plan": ".camcli-plan.txt", "shard": None}
    assert sorted(r["rel"] for r in records) == ["broken.png", "img01.png", "img02.png", "img04.png", "img05.png",
                                                 "sub/img00.png", "sub/img03.png"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert "images" not in on_disk and on_disk == res.summary and on_disk["records"] == "records.jsonl"
    assert on_disk["counts"] == {"images": 7, "ok": 6, "error": 1, "reused": 0}
    agg = on_disk["aggregate"]["methods"]
    assert set(agg) == {"gradcam", "layercam"} and agg["gradcam"]["features"]["maps"] == 6
    assert sum(t["images"] for t in on_disk["aggregate"]["top1_classes"]) == 6
    assert res.images == sorted(records, key=lambda r: r["rel"])
    # --json prints one document: the summary with every record
    r = runner.invoke(app, ["explain", str(folder), "-r", "--out", str(tmp_path / "j"), "--json", *TINY_FLAGS])
    doc = json.loads(r.stdout)
    assert doc["counts"]["images"] == 7 and [im["rel"] for im in doc["images"]] == [im["rel"] for im in res.images]


def test_summary_command_rebuilds_the_summary_from_the_records(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = explain([folder], ExplainOptions(out=str(out), recursive=True, **TINY))
    (out / "summary.json").unlink()  # as if the run was killed before writing it
    r = runner.invoke(app, ["summary", str(out)])
    assert r.exit_code == 0, r.output
    assert "images: 7 of 7 planned: 6 ok, 1 failed, 0 reused, 0 not processed" in r.stdout
    assert "gradcam at features: 6 maps, 0 empty" in r.stdout and "broken.png" in r.stderr
    assert not (out / "summary.json").exists()
    r = runner.invoke(app, ["summary", str(out), "--write"])
    rebuilt = json.loads((out / "summary.json").read_text())
    assert rebuilt.pop("rebuilt_from") == "records.jsonl"
    assert rebuilt == res.summary
    r = runner.invoke(app, ["summary", str(out / "records.jsonl"), "--json"])
    assert [im["rel"] for im in json.loads(r.stdout)["images"]] == [im["rel"] for im in res.images]
    # a killed run: the records stop early; the rebuilt summary says what was not reached
    text = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(text[:4]) + "\n" + text[4][:10])
    r = runner.invoke(app, ["summary", str(out), "--json"])
    doc = json.loads(r.stdout)
    assert doc["counts"]["images"] == 3 and doc["counts"]["not_processed"] == 4 and doc["interrupted"] is True


def test_summary_command_names_what_is_there_instead(tmp_path: Path) -> None:
    (tmp_path / "records.shard-1-of-2.jsonl").write_text("{}\n")
    r = runner.invoke(app, ["summary", str(tmp_path)])
    assert r.exit_code == 2 and "holds shard records (records.shard-1-of-2.jsonl)" in r.stderr
    assert f"camcli merge {tmp_path}" in r.stderr
    r = runner.invoke(app, ["summary", str(tmp_path / "records.shard-1-of-2.jsonl")])
    assert r.exit_code == 2 and "is not a camcli records file" in r.stderr
    r = runner.invoke(app, ["summary", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such folder or records file" in r.stderr


def test_skip_existing_reads_the_records_and_redoes_failures(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    explain([folder], ExplainOptions(out=str(out), recursive=True, **TINY))
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "broken.png")  # fixed since
    again = explain([folder], ExplainOptions(out=str(out), recursive=True, skip_existing=True, **TINY))
    assert again.exit_code == 0 and again.summary["counts"] == {"images": 7, "ok": 7, "error": 0, "reused": 6}
    header, *records = lines(out / "records.jsonl")
    assert len(records) == 7 and len({r["key"] for r in records}) == 7
    assert [r["rel"] for r in records if not r.get("reused")] == ["broken.png"]
    assert load_run(out)["counts"]["reused"] == 6


def comparable(rec: dict) -> dict:
    """A record without what differs between runs of the same inputs (paths of the output folder)."""
    return {k: v for k, v in rec.items() if k not in ("reused",)}


def test_merge_one_folder_of_shards_equals_a_whole_run_and_names_what_is_missing(folder: Path, tmp_path: Path) -> None:
    (folder / "broken.png").unlink()
    whole = explain([folder], ExplainOptions(out=str(tmp_path / "whole"), recursive=True, **TINY))
    out = tmp_path / "out"
    for k in (1, 2, 3):
        explain([folder], ExplainOptions(out=str(out), recursive=True, shard=f"{k}/3", **TINY))
    r = runner.invoke(app, ["merge", str(out)])
    assert r.exit_code == 0, r.output
    assert "camcli merge: 3 shards" in r.stderr and "6 images, 6 ok, 0 failed" in r.stderr
    merged = load_run(out)
    assert [comparable(im) for im in merged["images"]] == [comparable(im) for im in whole.images]
    assert merged["counts"] == whole.summary["counts"] and merged["aggregate"] == whole.summary["aggregate"]
    assert merged["merge"]["missing"]["count"] == 0 and merged["fingerprint"] == whole.summary["fingerprint"]
    assert all((out / e["overlay"]).is_file() for im in merged["images"] for e in im["explanations"])
    # shard 2 was killed half-way and shard 3 never ran: merge names what no shard did
    shard2 = out / "records.shard-2-of-3.jsonl"
    header, *recs = shard2.read_text().splitlines()
    assert recs, "this test needs shard 2 to hold an image"
    lost = json.loads(recs[-1])["rel"]
    shard2.write_text("\n".join([header, *recs[:-1]]) + "\n")
    (out / "records.shard-3-of-3.jsonl").unlink()
    r = runner.invoke(app, ["merge", str(out)])
    assert r.exit_code == 3, r.output
    assert "images missing from every shard: " in r.stderr and lost in r.stderr
    assert "no records for shard 3/3" in r.stderr
    assert json.loads((out / "summary.json").read_text())["merge"]["absent_shards"] == ["3/3"]


def test_merge_shard_folders_rebases_paths_reports_duplicates_and_refuses_other_options(
    folder: Path, tmp_path: Path
) -> None:
    (folder / "broken.png").unlink()
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    explain([folder], ExplainOptions(out=str(a), recursive=True, shard="1/2", **TINY))
    explain([folder], ExplainOptions(out=str(b), recursive=True, shard="2/2", **TINY))
    merged_dir = tmp_path / "merged"
    r = runner.invoke(app, ["merge", str(merged_dir), str(a), str(b), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["counts"]["images"] == 6 and len(doc["merge"]) == 4
    overlays = [e["overlay"] for im in doc["images"] for e in im["explanations"]]
    assert all(o.startswith(("../a/", "../b/")) and (merged_dir / o).is_file() for o in overlays)
    # a whole run of the same inputs overlaps both shards: every image is done twice
    explain([folder], ExplainOptions(out=str(c), recursive=True, **TINY))
    r = runner.invoke(app, ["merge", str(merged_dir), str(a), str(b), str(c)])
    assert r.exit_code == 0 and "6 images done by more than one shard" in r.stderr, r.output
    # a shard with another --alpha belongs to another run
    explain([folder], ExplainOptions(out=str(b), recursive=True, shard="2/2", alpha=0.7, **TINY))
    r = runner.invoke(app, ["merge", str(merged_dir), str(a), str(b)])
    assert r.exit_code == 2, r.output
    assert "--alpha is 0.7 there but 0.5 in" in r.stderr and "Traceback" not in r.output
