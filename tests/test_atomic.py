"""kdlsq_pl.results.atomic_output: the one helper behind every atomic write (records, reports, teacher store,
teacher cache, packed export)."""

from __future__ import annotations

import pytest

from kdlsq_pl.results import atomic_output, atomic_write_json


def test_file_written_and_renamed(tmp_path):
    target = tmp_path / "a" / "result.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})  # replaced in place
    assert target.read_text().replace(" ", "").replace("\n", "") == '{"x":2}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    assert target.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("directory", [False, True])
def test_error_leaves_nothing_and_keeps_the_old(tmp_path, directory):
    target = tmp_path / "out"
    if directory:
        target.mkdir()
        (target / "old.txt").write_text("old")
    else:
        target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target, directory=directory) as tmp:
            (tmp / "new.txt").write_text("half") if directory else tmp.write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    assert ((target / "old.txt") if directory else target).read_text() == "old"


def test_folder_replaced_whole_or_refused(tmp_path):
    target = tmp_path / "teacher"
    for text in ("one", "two"):
        with atomic_output(target, directory=True) as tmp:
            (tmp / f"{text}.txt").write_text(text)
    assert sorted(p.name for p in target.iterdir()) == ["two.txt"] and target.stat().st_mode & 0o777 == 0o755
    with pytest.raises(FileExistsError, match="teacher exists"):
        with atomic_output(target, directory=True, replace=False) as tmp:
            (tmp / "three.txt").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"] and (target / "two.txt").is_file()
