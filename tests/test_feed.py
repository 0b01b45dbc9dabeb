"""The one feed (camcli/feed.py): its batching rules, worked out by hand, its decoding step, its
selection of inputs, and the run layer's warnings that every runner now gives."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camcli.feed import Batch, Decoder, Item, cut_batches, decoding_workers, find_inputs
from camcli.images import Preprocess
from camcli.options import ExplainOptions
from camcli.pipeline import run_explain
from camcli.run import Plan, start_run
from camcli.session import Session


def item(i: int, h: int, w: int) -> Item:
    return Item(i, torch.zeros(3, h, w, dtype=torch.uint8))


def shown(got: list[Item | Batch]) -> list[object]:
    return [[i.index for i in g.items] if isinstance(g, Batch) else f"error {g.index}" for g in got]


def test_batches_are_cut_by_shape_and_under_the_pixel_budget() -> None:
    items = [item(0, 4, 4), item(1, 5, 5), Item(2, error="bad"), item(3, 4, 4), item(4, 10, 10), item(5, 5, 5)]
    # 0 (16 px) and 1 (25 px) wait in their buckets; the failed 2 passes at once; 3 fills the 4x4
    # bucket (batch size 2); 4 (100 px) would hold 125 > 100: the fullest bucket, [1], runs first,
    # and 4 alone fills the budget; 5 waits until the end.
    assert shown(list(cut_batches(items, batch_size=2, budget=100))) == ["error 2", [0, 3], [1], [4], [5]]


def test_more_than_twice_the_batch_size_waiting_runs_the_fullest_bucket() -> None:
    items = [item(0, 2, 2), item(1, 2, 3), item(2, 2, 2), item(3, 2, 4), item(4, 2, 5), item(5, 2, 6)]
    # batch size 3: at most six wait (<= 2 x 3), so nothing runs before the end, where the buckets
    # run in the order they were opened.
    assert shown(list(cut_batches(items, batch_size=3, budget=10**6))) == [[0, 2], [1], [3], [4], [5]]
    # batch size 2: the fifth image makes five waiting (> 4): the bucket with most images, [0, 2], runs.
    assert shown(list(cut_batches(items, batch_size=2, budget=10**6))) == [[0, 2], [1], [3], [4], [5]]
    two = list(cut_batches(items[:5], batch_size=2, budget=10**6))
    assert shown(two[:1]) == [[0, 2]] and shown(two[1:]) == [[1], [3], [4]]


def test_a_full_resolution_image_counts_its_pixels_not_its_model_input() -> None:
    big = Item(0, torch.zeros(3, 2, 2, dtype=torch.uint8), np.zeros((30, 40, 3), np.uint8))
    assert big.pixels == 1200 and item(1, 2, 2).pixels == 4
    # the held 1200 px and the next 1200 px exceed 2000: the first runs before the second waits
    assert shown(list(cut_batches([big, dataclasses.replace(big, index=1)], 8, budget=2000))) == [[0], [1]]


PRE = Preprocess(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_the_decoder_checks_max_pixels_and_reduces_when_no_overlay_is_drawn(tmp_path: Path) -> None:
    from camcli.images import ImageSource

    p = tmp_path / "a.png"
    Image.fromarray(np.full((10, 20, 3), 7, np.uint8)).save(p)
    src = ImageSource(p, Path("a.png"))
    full = Decoder(PRE)(3, src)
    assert full.index == 3 and full.error is None and full.size == (10, 20)
    assert full.image is not None and full.image.shape == (10, 20, 3) and tuple(full.tensor.shape) == (3, 8, 16)
    small = Decoder(PRE, full_images=False)(0, src)
    assert small.image is None and tuple(small.tensor.shape) == (3, 8, 16) and small.pixels == 128
    refused = Decoder(PRE, max_pixels=199)(0, src)
    assert refused.tensor is None and "200 pixels, more than --max-pixels 199" in (refused.error or "")


def test_find_inputs_shards_what_it_found_and_counts_what_it_passed_over(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(6):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / f"{k}.png")
    os.mkfifo(folder / "pipe.png")
    whole = find_inputs([folder], False, tmp_path / "out")
    assert [s.rel.as_posix() for s in whole.sources] == [f"{k}.png" for k in range(6)]
    assert whole.total == 6 and whole.shard is None and whole.skipped == [str(folder / "pipe.png")]
    one, two = (find_inputs([folder], False, None, f"{k}/2") for k in (1, 2))
    assert one.shard == (1, 2) and one.total == two.total == 6
    assert sorted(s.rel for s in one.sources + two.sources) == sorted(s.rel for s in whole.sources)
    assert not set(one.sources) & set(two.sources)


def test_every_runner_warns_about_skipped_entries_and_reused_images(tmp_path: Path) -> None:
    """start_run gives the warnings the local runner gave; the Ray runner, built on it, now gives them too."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    found = find_inputs([folder], False, tmp_path / "out")
    session = Session.open(ExplainOptions(model="toymodels:tiny_cnn", out=str(tmp_path / "out"), quiet=True))
    said: list[str] = []
    session.warn = said.append
    started: list[int] = []
    (tmp_path / "out").mkdir()
    run = start_run(session, Plan(found.sources, 1, None, ["in/fifo.png"]), tmp_path / "out", on_start=started.append)
    run.stream.close()
    assert started == [1] and run.todo == [0]
    assert len(said) == 1 and said[0].startswith("skipped 1 folder entries") and said[0].endswith("first: in/fifo.png")


def objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays of different shapes, as Ray Data hands it to an actor."""
    col = np.empty(len(arrays), dtype=object)
    for k, a in enumerate(arrays):
        col[k] = a
    return col


def test_ray_actor_batches_by_the_feed_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray actor swaps the decoding step only: its rows are cut by cut_batches (one shape per pass)."""
    import camcli.ray_runner as R

    calls: list[list[tuple[int, ...]]] = []

    class Writer:
        def maps_or_error(self, tensors, sizes):  # noqa: ANN001, ANN201
            calls.append([tuple(t.shape) for t in tensors])
            return "model failed on this image: test"

    actor = R.CamActor.__new__(R.CamActor)
    actor.writer = Writer()  # type: ignore[assignment]
    shapes = [(3, 4, 4), (3, 4, 6), (3, 4, 4)]
    batch = {
        "path": np.array(["a", "b", "c", "d"], dtype=object), "rel": np.array(["a", "b", "c", "d"], dtype=object),
        "key": np.array(["ka", "kb", "kc", "kd"], dtype=object), "stem": np.array(["a", "b", "c", "d"], dtype=object),
        "error": np.array(["", "", "", "d: broken"], dtype=object),
        "tensor": objects([np.zeros(s, np.uint8) for s in shapes] + [np.zeros((3, 1, 1), np.uint8)]),
        "image": objects([np.zeros((4, 4, 3), np.uint8)] * 4),
    }
    records = actor.explain_rows(batch)
    assert calls == [[(3, 4, 4), (3, 4, 4)], [(3, 4, 6)]]
    assert [(r["key"], r["status"]) for r in records] == [("kd", "error"), ("ka", "error"), ("kc", "error"), ("kb", "error")]
    assert records[0]["error"] == "d: broken"


def test_more_workers_than_cores_are_capped_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("camcli.feed.available_cores", lambda: 2)
    said: list[str] = []
    assert decoding_workers(64, said.append) == 2
    assert said == ["--workers 64: this process may run on 2 core(s); using 2 decoding workers"]
    assert decoding_workers(2, said.append) == 2 and decoding_workers(0, said.append) == 0
    assert decoding_workers(None, said.append) == 0  # auto: none on 2 cores
    assert len(said) == 1


def test_workers_64_runs_without_torchs_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers 64 leaked DataLoader's "suggested max number of worker" warning; now it is capped."""
    monkeypatch.setattr("camcli.feed.available_cores", lambda: 2)
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(folder / f"{k}.png")
    opts = ExplainOptions(model="toymodels:tiny_cnn", out=str(tmp_path / "out"), workers=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_explain([folder], opts)
    assert result.exit_code == 0
    assert [str(w.message) for w in caught if "worker" in str(w.message)] == []
    assert "--workers 64: this process may run on 2 core(s); using 2 decoding workers" in capsys.readouterr().err
