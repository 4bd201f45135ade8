"""``mlx_flash.doctor``: macOS checks with the platform calls mocked; the Linux ones for real."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys

import mlx.core as mx
import pytest

from mlx_flash import doctor
from mlx_flash.doctor import CHECK_FILE, FAIL, NOT_RUN, PASS
from mlx_flash.runtime.pagecache import cached_bytes, drop_from_page_cache, mincore_bytes

GIB = 1 << 30


class FakeMac:
    """What a Mac answers: a Metal device, a recommended working set, a wired limit that is set
    and read back, and ``F_NOCACHE`` calls recorded."""

    def __init__(self, monkeypatch, uncached_lands: int = 0):
        self.wired, self.nocache_fds = 0, []
        monkeypatch.setattr(sys, "platform", "darwin")
        monkeypatch.setattr(mx.metal, "is_available", lambda: True)
        monkeypatch.setattr(
            mx,
            "device_info",
            lambda: {
                "device_name": "Apple M2",
                "memory_size": 16 * GIB,
                "max_recommended_working_set_size": 11 * GIB,
            },
        )
        monkeypatch.setattr(mx, "set_wired_limit", self.set_wired_limit)
        monkeypatch.setattr(fcntl, "fcntl", self.fcntl)
        # page-cache residency after: writing, the uncached read, the cached (control) read
        answers = iter([0, uncached_lands, CHECK_FILE])
        monkeypatch.setattr(doctor, "cached_bytes", lambda path: next(answers))

    def set_wired_limit(self, limit: int) -> int:
        old, self.wired = self.wired, limit
        return old

    def fcntl(self, fd: int, cmd: int, arg: int = 0) -> int:
        assert cmd == getattr(fcntl, "F_NOCACHE", 48) and arg == 1
        self.nocache_fds.append(fd)
        return 0


def test_macos_checks_pass_with_honoured_platform_calls(monkeypatch, tmp_path):
    mac = FakeMac(monkeypatch)
    assert doctor.check_metal() == doctor.Check(
        "Metal device", PASS, "Apple M2, 17.18 GB unified memory"
    )
    assert doctor.bypass_modes() == [("F_NOCACHE", "nocache")]
    bypass = doctor.check_bypass(tmp_path, "F_NOCACHE", "nocache")
    assert bypass.status == PASS, bypass
    assert len(mac.nocache_fds) == 2  # the probe file written uncached, then read uncached
    wired = doctor.check_wired_limit()
    assert wired.status == PASS and "set to 11.81 GB" in wired.detail, wired
    assert mac.wired == 0  # restored
    assert not list(tmp_path.iterdir())  # the check's file is gone


def test_macos_f_nocache_not_honoured_is_a_failure(monkeypatch, tmp_path):
    FakeMac(monkeypatch, uncached_lands=CHECK_FILE)
    check = doctor.check_bypass(tmp_path, "F_NOCACHE", "nocache")
    assert check.status == FAIL and "not honoured: 16.78 MB of 16.78 MB" in check.detail


def test_macos_without_metal_or_recommended_size(monkeypatch):
    FakeMac(monkeypatch)
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "Apple M2"})
    assert doctor.check_wired_limit().status == FAIL
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert doctor.check_metal().status == FAIL
    assert doctor.check_wired_limit().status == NOT_RUN


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux bypasses")
def test_linux_bypasses_keep_reads_out_of_the_page_cache(tmp_path):
    assert [name for name, _ in doctor.bypass_modes()] == ["RWF_DONTCACHE", "O_DIRECT"]
    for name, mode in doctor.bypass_modes():
        check = doctor.check_bypass(tmp_path, name, mode)
        assert check.status in (PASS, NOT_RUN), check  # not run: a kernel before 6.14
        if check.status == PASS:
            assert check.detail.startswith("0 B of 16.78 MB")


def test_report_marks_what_was_not_run(tmp_path, capsys):
    code = doctor.main(
        ["--path", str(tmp_path), "--skip", "probe", "--json", str(tmp_path / "d.json")]
    )
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "d.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert code == 0 and statuses["dense equivalence"] == PASS
    assert statuses["probe"] == NOT_RUN and "| probe | not run | skipped (--skip) |" in out
    if sys.platform != "darwin":
        assert statuses["Metal device"] == NOT_RUN and statuses["wired limit"] == NOT_RUN
    assert f"{sum(s == NOT_RUN for s in statuses.values())} not run" in out


def test_a_check_that_raises_is_a_failure_and_the_rest_still_run(monkeypatch, tmp_path):
    def broken(_tmp):
        raise RuntimeError("convert exploded")

    monkeypatch.setattr(doctor, "check_dense_equivalence", broken)
    checks = doctor.run_checks(tmp_path, {"probe", "bypass"})
    failed = [c for c in checks if c.status == FAIL]
    assert failed == [doctor.Check("equivalence", FAIL, "RuntimeError: convert exploded")]
    assert checks[-1].name == "probe"


@pytest.mark.skipif(shutil.which("fincore") is None, reason="fincore tells the truth to compare")
def test_mincore_the_macos_measure_agrees_with_fincore(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(4 << 20))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # dirty pages would stay cached
    drop_from_page_cache(path)
    assert mincore_bytes(path) == cached_bytes(path) == 0
    with open(path, "rb") as f:
        f.read(1 << 20)
    assert mincore_bytes(path) == cached_bytes(path) >= 1 << 20
