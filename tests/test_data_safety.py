"""Issue 23: merge never loses a source, records files are read defensively, every JSON file camcli
writes is strict JSON, YAML aliases are refused, output names never collide."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from camcli.cli import app
from camcli.pipeline import ExplainOptions, run_explain as explain
from conftest import noise_images

runner = CliRunner()
TINY = dict(model="toymodels:tiny_cnn", workers=0, quiet=True)
TINY_FLAGS = ["--model", "toymodels:tiny_cnn", "--workers", "0", "-q"]


def strict(text: str):  # noqa: ANN201
    """json.loads that refuses NaN and ±Infinity, as JSON.parse and strict parsers do."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def record_lines(path: Path) -> list[dict]:
    return [strict(line) for line in path.read_text().splitlines()]


# item 1 -----------------------------------------------------------------------------------------

def test_merge_into_a_source_folder_reads_it_before_replacing_it(make_images, tmp_path: Path) -> None:  # noqa: ANN001
    pa, pb = tmp_path / "pa", tmp_path / "pb"
    explain([make_images("in", 2, seed=3)], ExplainOptions(out=str(pa), **TINY))
    explain([noise_images(tmp_path / "in2", [(32, 32), (40, 40)], 4, "other{:02d}.png")], ExplainOptions(out=str(pb), **TINY))
    in_a = sorted(r["rel"] for r in record_lines(pa / "records.jsonl")[1:])
    in_b = sorted(r["rel"] for r in record_lines(pb / "records.jsonl")[1:])
    assert in_a == ["img00.png", "img01.png"] and in_b == ["other00.png", "other01.png"]
    r = runner.invoke(app, ["merge", str(pa), str(pa), str(pb)])
    assert r.exit_code == 0, r.output
    header, *recs = record_lines(pa / "records.jsonl")
    assert sorted(x["rel"] for x in recs) == sorted(in_a + in_b)
    assert strict((pa / "summary.json").read_text())["counts"] == {"images": 4, "ok": 4, "error": 0, "reused": 0}
    assert not [p.name for p in pa.iterdir() if ".merging-" in p.name or p.name.endswith(".part")]
    # every overlay a merged record names is on disk, relative to pa
    assert all((pa / e["overlay"]).is_file() for x in recs for e in x["explanations"])


def test_merge_counts_duplicates_between_the_output_folder_and_another_source(make_images, tmp_path: Path) -> None:  # noqa: ANN001
    folder = make_images("in", 3, seed=4)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    explain([folder], ExplainOptions(out=str(m1), **TINY))
    explain([folder], ExplainOptions(out=str(m2), **TINY))
    before = {x["rel"]: x for x in record_lines(m1 / "records.jsonl")[1:]}
    r = runner.invoke(app, ["merge", str(m1), str(m1), str(m2)])
    assert r.exit_code == 0, r.output
    assert "3 images done by more than one shard" in r.stderr
    summary = strict((m1 / "summary.json").read_text())
    assert summary["merge"]["duplicates"]["count"] == 3 and summary["counts"]["images"] == 3
    after = {x["rel"]: x for x in record_lines(m1 / "records.jsonl")[1:]}
    # m1's own records are the ones kept (the first source): their overlays are in m1, not ../m2
    assert {k: v["explanations"][0]["overlay"] for k, v in after.items()} == {
        k: v["explanations"][0]["overlay"] for k, v in before.items()}


def test_merge_refuses_a_source_named_twice(make_images, tmp_path: Path) -> None:  # noqa: ANN001
    folder = make_images("in", 2, seed=5)
    a = tmp_path / "a"
    explain([folder], ExplainOptions(out=str(a), **TINY))
    kept = (a / "records.jsonl").read_bytes()
    for twice in ([str(a), str(a)], [str(a), str(a / "records.jsonl")]):
        r = runner.invoke(app, ["merge", str(tmp_path / "m"), *twice])
        assert r.exit_code == 2, r.output
        assert "name each folder or records file once" in r.stderr and "Traceback" not in r.output
    assert (a / "records.jsonl").read_bytes() == kept and not (tmp_path / "m" / "records.jsonl").exists()


# item 6 -----------------------------------------------------------------------------------------

def damage(path: Path) -> list[int]:
    """Replace record lines 3 and 5 by garbage, turn 4 into a JSON array and 6 into invalid UTF-8,
    give 7 a null status; returns the damaged line numbers (1 is the header)."""
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 9, "this test needs 8 records"
    lines[2] = b'{"rel": "img0\n'
    lines[3] = b'["an", "array"]\n'
    lines[4] = b"#!garbled\n"
    lines[5] = b'{"rel": "\xff\xfe"}\n'
    rec = json.loads(lines[6])
    rec["status"] = None
    lines[6] = (json.dumps(rec) + "\n").encode()
    path.write_bytes(b"".join(lines))
    return [3, 4, 5, 6, 7]


def test_summary_skips_and_names_bad_lines_and_reads_on(make_images, tmp_path: Path) -> None:  # noqa: ANN001
    folder = make_images("in", 8, seed=6)
    out = tmp_path / "out"
    explain([folder], ExplainOptions(out=str(out), **TINY))
    bad = damage(out / "records.jsonl")
    with open(out / "records.jsonl", "ab") as f:
        f.write(b'{"rel": "cut by a kil')  # a crash mid-line: no damage, no warning
    r = runner.invoke(app, ["summary", str(out), "--write"])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "error: None" not in r.output
    assert "images: 3 of 8 planned: 3 ok, 0 failed, 0 reused, 5 not processed" in r.stdout
    assert "skipped 5 unreadable line(s)" in r.stderr and "line 3, 4, 5, 6, 7)" in r.stderr
    written = strict((out / "summary.json").read_text())
    assert written["counts"]["images"] == 3 and written["unreadable_lines"] == {"count": 5, "lines": bad}
    # only a cut last line: read silently
    out2 = tmp_path / "out2"
    explain([folder], ExplainOptions(out=str(out2), **TINY))
    with open(out2 / "records.jsonl", "ab") as f:
        f.write(b'{"rel": "cut')
    r = runner.invoke(app, ["summary", str(out2)])
    assert r.exit_code == 0 and "unreadable" not in r.output and "images: 8 of 8 planned" in r.stdout


def test_skip_existing_over_bad_lines_redoes_their_images(make_images, tmp_path: Path) -> None:  # noqa: ANN001
    folder = make_images("in", 8, seed=6)
    out = tmp_path / "out"
    explain([folder], ExplainOptions(out=str(out), **TINY))
    damage(out / "records.jsonl")
    r = runner.invoke(app, ["explain", str(folder), "--out", str(out), "--skip-existing", *TINY_FLAGS[:-1]])
    assert r.exit_code == 0, r.output
    assert "skipped 5 unreadable line(s)" in r.stderr and "Traceback" not in r.output
    assert "--skip-existing: 3 of 8 images already done" in r.stderr
    recs = record_lines(out / "records.jsonl")[1:]
    assert sorted(x["rel"] for x in recs) == [f"img{i:02d}.png" for i in range(8)]
    assert sum(bool(x.get("reused")) for x in recs) == 3
    assert not list(out.glob(".*.part"))


# item 12 ----------------------------------------------------------------------------------------

def test_yaml_alias_bomb_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    levels = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = "\n".join(levels) + "\nclass: *a9\n"
    check = tmp_path / "check.yaml"
    check.write_text(bomb + "cases: []\n")
    config = tmp_path / "config.yaml"
    config.write_text(bomb)
    for args in (["check", str(check)], ["explain", str(tmp_path), "--config", str(config), *TINY_FLAGS]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        assert "line 2: YAML aliases (*a0) are not accepted" in r.stderr and "Traceback" not in r.output
        assert len(r.output) < 400  # the value is never printed


# item 7 -----------------------------------------------------------------------------------------

def nan_cnn():  # noqa: ANN201
    """tiny_cnn with a NaN bias on class 0: every logit's softmax is NaN, the maps stay finite."""
    import torch
    from toymodels import tiny_cnn

    m = tiny_cnn()
    with torch.no_grad():
        m.fc.bias[0] = float("nan")
    return m


def test_every_json_file_is_strict_json_when_the_model_returns_nan(tmp_path: Path) -> None:
    folder = noise_images(tmp_path / "in", [(32, 32), (40, 32)], 7)
    nan = ["--model", "test_data_safety:nan_cnn", "-q"]
    r = runner.invoke(app, ["explain", str(folder), "-o", str(tmp_path / "a"), "--workers", "0", "--json", *nan])
    assert r.exit_code == 0, r.output
    doc = strict(r.stdout)
    header, *recs = record_lines(tmp_path / "a" / "records.jsonl")
    assert len(recs) == 2 and doc["counts"]["ok"] == 2
    for rec in recs:  # the NaN is null, and the record says where
        assert rec["predictions"][0]["probability"] is None and "predictions.0.probability" in rec["non_finite"]
    strict((tmp_path / "a" / "summary.json").read_text())
    r = runner.invoke(app, ["summary", str(tmp_path / "a"), "--write", "--json"])
    assert r.exit_code == 0, r.output
    strict(r.stdout), strict((tmp_path / "a" / "summary.json").read_text())
    runner.invoke(app, ["explain", str(folder), "-o", str(tmp_path / "b"), "--workers", "0", *nan])
    r = runner.invoke(app, ["merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b"), "--json"])
    assert r.exit_code == 0, r.output
    strict(r.stdout), record_lines(tmp_path / "m" / "records.jsonl"), strict((tmp_path / "m" / "summary.json").read_text())
    r = runner.invoke(app, ["evaluate", str(folder), "-o", str(tmp_path / "e"), "--metric", "deletion_auc,average_drop", *nan])
    assert r.exit_code == 0, r.output
    strict((tmp_path / "e" / "evaluation.json").read_text())
    ev_records = [strict(line) for line in (tmp_path / "e" / "evaluation-records.jsonl").read_text().splitlines()]
    assert len(ev_records) == 2 and all(rec["non_finite"] for rec in ev_records)
    check = tmp_path / "check.yaml"
    check.write_text(f"model: {{name: 'test_data_safety:nan_cnn'}}\nmethod: [gradcam]\ncases:\n"
                     f"  - image: {folder / '00.png'}\n    expect: {{top_k: 4, min_energy_in_region: 0.1, region: [0, 0, 16, 16]}}\n")
    r = runner.invoke(app, ["check", str(check), "--json", str(tmp_path / "check.json"), "-q"])
    assert r.exit_code == 0, r.output
    strict((tmp_path / "check.json").read_text())


# item 5 -----------------------------------------------------------------------------------------

def test_output_names_are_unique_and_the_same_in_every_shard(tmp_path: Path) -> None:
    from PIL import Image

    from camcli.images import discover
    from camcli.run import output_stems

    folder = tmp_path / "in"
    names = ["y.jpg", "y.png", "y.jpg.png",  # same stem; name.ext against name.ext.ext
             "Cat.png", "cat.jpg", "B.png", "b.png",  # case differences (case-insensitive file systems)
             "sub/a.png", "sub/a.jpg", "sub/a.png.jpg", "a.png", "solo.png", "sub/solo.png"]
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (i * 20, 0, 0)).save(folder / name, format="PNG")
    every = discover([folder], recursive=True)
    stems = dict(zip((s.rel.as_posix() for s in every), (p.as_posix() for p in output_stems(every))))
    assert len({s.casefold() for s in stems.values()}) == len(names)
    # unchanged where nothing collides; the suffix where only the stem does; a hash beyond that
    assert stems["solo.png"] == "solo" and stems["sub/solo.png"] == "sub/solo" and stems["a.png"] == "a"
    assert stems["y.png"] == "y.png" and stems["sub/a.jpg"] == "sub/a.jpg"
    # y.jpg.png wants y.jpg, which y.jpg wants beside y.png: both step up
    assert stems["y.jpg"] == "y.jpg-" + hashlib.sha1(b"y.jpg").hexdigest()[:8] and stems["y.jpg.png"] == "y.jpg.png"
    assert stems["sub/a.png"].startswith("sub/a.png-") and stems["sub/a.png.jpg"] == "sub/a.png.jpg"
    assert stems["Cat.png"] == "Cat.png" and stems["cat.jpg"] == "cat.jpg"
    assert stems["B.png"].startswith("B.png-") and stems["b.png"].startswith("b.png-")
    # stable: the same from any order of the inputs, and for a shard's share of them
    assert output_stems(every[::-1], every) == output_stems(every)[::-1]
    assert output_stems(every[:3], every) == output_stems(every)[:3]
    # a real run: every image its own files, in one folder and in shards of one --out
    r = runner.invoke(app, ["explain", str(folder), "-r", "-o", str(tmp_path / "o"), *TINY_FLAGS])
    assert r.exit_code == 0, r.output
    overlays = [e["overlay"] for x in record_lines(tmp_path / "o" / "records.jsonl")[1:] for e in x["explanations"]]
    assert len(overlays) == len(names) == len({o.casefold() for o in overlays})
    assert all((tmp_path / "o" / o).is_file() for o in overlays)
    for k in (1, 2, 3):
        r = runner.invoke(app, ["explain", str(folder), "-r", "-o", str(tmp_path / "s"), "--shard", f"{k}/3", *TINY_FLAGS])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    sharded = [e["overlay"] for x in record_lines(tmp_path / "s" / "records.jsonl")[1:] for e in x["explanations"]]
    assert sorted(sharded) == sorted(overlays)


# item 13 ----------------------------------------------------------------------------------------

def test_boxes_state_their_unit_and_json_files_are_read_as_json(tmp_path: Path) -> None:
    from camcli.boxes import BoxError, parse_box
    from camcli.evaluate import load_boxes

    f = tmp_path / "boxes.json"
    f.write_text('{"a.png": [[0, 0, 5e1, 40]]}')  # 5e1 is a JSON number (YAML 1.1 reads a string)
    assert [b.pixels(100, 100) for b in load_boxes(f)["a.png"]] == [(0.0, 0.0, 50.0, 40.0)]
    f.write_text('{"a.png": [[0.1, 0.1, 0.5, 0.5]]}')
    with pytest.raises(Exception, match=r"ambiguous.*\{fraction: \[0.1, 0.1, 0.5, 0.5\]\}.*\{pixels: "):
        load_boxes(f)
    f.write_text('{"a.png": {"fraction": [0.1, 0.1, 0.5, 0.5]}}')
    assert [b.pixels(200, 100) for b in load_boxes(f)["a.png"]] == [(20.0, 10.0, 100.0, 50.0)]
    # check regions and --region: [0, 0, 1, 1] is refused; documented plain fractions still work
    with pytest.raises(BoxError, match="ambiguous"):
        parse_box([0, 0, 1, 1], plain_fractions=True)
    assert parse_box({"pixels": [0, 0, 1, 1]}, plain_fractions=True).pixels(9, 9) == (0, 0, 1, 1)
    assert parse_box([0.28, 0.03, 0.7, 0.6], plain_fractions=True).unit == "fraction"
    assert parse_box("fraction:0,0,1,1", plain_fractions=True, cli=True).pixels(10, 20) == (0, 0, 10, 20)
    with pytest.raises(BoxError, match="fraction:0,0,1,1 .* or pixels:0,0,1,1"):
        parse_box("0,0,1,1", plain_fractions=True, cli=True)


def test_model_errors_from_user_code_are_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "badimp.py").write_text("import no_such_module_xyz\n")
    folder = noise_images(tmp_path / "in", [(32, 32)], 1)
    r = runner.invoke(app, ["explain", str(folder), "--model", str(tmp_path / "badimp.py"), "-q"])
    assert r.exit_code == 2 and "Python source" in r.stderr and "unsafe-load" not in r.stderr, r.output
    r = runner.invoke(app, ["explain", str(folder), "--model", "badimp:build", "-q"])
    assert r.exit_code == 2 and "No module named 'no_such_module_xyz'" in r.stderr, r.output
    check = tmp_path / "c.yaml"
    check.write_text(f"model: {{name: 'sys:exit'}}\ncases:\n  - image: {folder / '00.png'}\n    expect: {{top_k: 1}}\n")
    r = runner.invoke(app, ["check", str(check), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 2 and "calling it failed" in r.stderr, r.output
    r = runner.invoke(app, ["check", str(check), "--junit", "/proc/x.xml"])
    assert r.exit_code == 2 and "--junit '/proc/x.xml'" in r.stderr, r.output


def test_check_reports_progress_per_case(tmp_path: Path) -> None:
    from camcli.check import run_check

    folder = noise_images(tmp_path / "in", [(32, 32), (40, 40), (32, 48)], 2)
    check = tmp_path / "c.yaml"
    cases = "".join(f"  - image: {p}\n    expect: {{top_k: 4}}\n" for p in sorted(folder.iterdir()))
    check.write_text(f"model: {{name: 'toymodels:tiny_cnn'}}\nmethod: [gradcam]\ncases:\n{cases}")
    seen: list[tuple[str, int]] = []
    report = run_check(check, on_start=lambda n: seen.append(("start", n)), progress=lambda n: seen.append(("done", n)))
    assert report.passed and seen == [("start", 3), ("done", 1), ("done", 1), ("done", 1)]
