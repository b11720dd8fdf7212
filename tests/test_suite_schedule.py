"""`make test`'s schedule: every test file has its seconds, and workers get the longest files first."""

from __future__ import annotations

import json
from types import SimpleNamespace

import conftest
from conftest import REPO


def test_every_test_file_has_its_seconds_and_no_other_file_does():
    table = json.loads(conftest.FILE_SECONDS.read_text())
    files = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")}
    assert set(table) == files, (
        "tests/file_seconds.json is out of date: add the new file's rough serial seconds, or refresh the whole table "
        "with `make test TEST_JOBS=0 ARGS=--record-file-seconds`")


def test_under_xdist_the_longest_files_come_first_and_each_file_keeps_its_order(monkeypatch, tmp_path):
    table = tmp_path / "seconds.json"
    table.write_text(json.dumps({"tests/test_a.py": 1.0, "tests/test_b.py": 50.0}))
    monkeypatch.setattr(conftest, "FILE_SECONDS", table)
    ids = ["tests/test_a.py::x", "tests/test_a.py::y", "tests/test_b.py::z", "tests/test_b.py::w", "tests/test_new.py::n"]
    items = [SimpleNamespace(nodeid=i) for i in ids]

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    conftest.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == ids  # one process: untouched

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    conftest.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == [ids[2], ids[3], ids[0], ids[1], ids[4]]


def test_record_file_seconds_sums_each_files_phases_into_the_table(monkeypatch, tmp_path):
    table = tmp_path / "seconds.json"
    table.write_text(json.dumps({"tests/test_a.py": 1.0, "tests/test_old.py": 3.0}))
    monkeypatch.setattr(conftest, "FILE_SECONDS", table)
    monkeypatch.setattr(conftest, "_recorded", {})
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    for nodeid, seconds in (("tests/test_a.py::x", 2.0), ("tests/test_a.py::x", 0.5), ("tests/test_b.py::y", 4.0)):
        conftest.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, duration=seconds))
    session = SimpleNamespace(config=SimpleNamespace(getoption=lambda name: name == "--record-file-seconds"))
    conftest.pytest_sessionfinish(session, 0)
    assert json.loads(table.read_text()) == {"tests/test_a.py": 2.5, "tests/test_b.py": 4.0, "tests/test_old.py": 3.0}
