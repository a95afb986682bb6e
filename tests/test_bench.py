"""`make bench QUICK=1` runs every scenario end to end, so the harness never rots.

It asserts what the bench proves about correctness (no failed or lost save,
every subscriber reached), never a speed: speed is the full bench's job.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from support import ROOT


def require_bench_tools():
    if shutil.which("wrk"):
        return
    reason = "the quick bench needs wrk: apt-get install wrk (and nginx for the ceiling)"
    if os.environ.get("CHANGEFEED_REQUIRE_BENCH_TOOLS") == "1":
        pytest.fail(f"{reason}; CHANGEFEED_REQUIRE_BENCH_TOOLS=1 makes this a failure", pytrace=False)
    pytest.skip(reason)


def test_quick_bench_runs_every_scenario(tmp_path):
    require_bench_tools()
    result = subprocess.run([sys.executable, "bench/run.py", "--quick", "--results", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "latest.json").read_text())
    summary = report["summary"]
    assert set(report["runs"]) == {"poll", "saves", "propagation", "nginx", "varnish", "hosts", "capacity",
                                    "ws_capacity", "many", "stores"}
    assert summary["unchanged_rps"] > 0 and summary["unchanged_errors"] == 0
    assert summary["saves_failed"] == 0 and summary["saves_unaccounted"] == 0 and summary["saves_exact"] is True
    for transport in ("sse", "sse_prefix", "ws", "longpoll", "poll", "longpoll100"):
        assert summary[f"{transport}_missed"] == 0 and summary[f"{transport}_failed"] == 0
    for front in ("nginx", "varnish"):
        if report["runs"][front]:  # run when it is installed
            assert summary[f"longpoll_{front}_missed"] == 0 and summary[f"longpoll_{front}_failed"] == 0
            assert summary[f"longpoll_{front}_service_polls_per_save"] < summary[f"longpoll_{front}_load_rps"]
        elif os.environ.get(f"CHANGEFEED_REQUIRE_{front.upper()}") == "1":
            pytest.fail(f"the bench ran no long-poll through {front}: it is not installed")
    if report["runs"]["hosts"]:  # run when a PostgreSQL server answers
        for transport in ("sse", "longpoll"):
            assert summary[f"hosts_{transport}_missed"] == 0 and summary[f"hosts_{transport}_failed"] == 0
        assert summary["hosts_saves_one_slug_rps"] > 0
    elif os.environ.get("CHANGEFEED_REQUIRE_POSTGRES") == "1":
        pytest.fail("the bench ran no scenario across hosts: no PostgreSQL server answered")
    assert summary["capacity_dropped"] == 0 and summary["ws_capacity_dropped"] == 0
    assert summary["stores_non_2xx"] == summary["stores_socket_errors"] == summary["stores_saves_unaccounted"] == 0
    assert summary["stores_saves_exact"] is True and summary["stores_stock_gevent_rps"] > 0
    if report["runs"]["hosts"]:  # the same PostgreSQL server: the stores A/B has its side too
        assert summary["stores_pg_saves_many_rps"] > 0 and summary["stores_pg_polls_vs_sqlite"] > 0
    assert (tmp_path / "propagation.png").stat().st_size > 10_000
    assert "scenario" in result.stdout and "median" in result.stdout  # the table was printed
