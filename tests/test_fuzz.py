"""Schemathesis fuzzes the running service against its own /openapi.json.

Every answer must conform to the document (status, content type, headers,
body schema), none may be a 5xx, and the server must go on answering, with
access control off and on. /events is left out: its 200 is an endless
stream, which a fuzzer cannot read to the end (its errors are covered by
test_errors.py and test_auth.py). Long-polls are capped at 1 s
(CHANGEFEED_MAX_WAIT_S) so the run stays short; the document says so too.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import requests

ST = Path(sys.executable).parent / "st"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")
SECRET = "fuzz-secret-" + "0123456789abcdef" * 3


@pytest.mark.parametrize("access_control", [False, True], ids=["access control off", "access control on"])
def test_every_answer_conforms_to_the_openapi_document_under_fuzzing(make_server, access_control, tmp_path):
    seed = os.environ.get("CHANGEFEED_FUZZ_SEED", "1")
    env, headers = {"CHANGEFEED_MAX_WAIT_S": "1"}, []
    if access_control:
        env.update(CHANGEFEED_JWT_SECRET=SECRET, CHANGEFEED_AUTH_READS="1")
        token = jwt.encode({"sub": "fuzzer", "exp": int(time.time()) + 3600,
                            "changefeed": {"read": ["*"], "write": ["*"]}}, SECRET, algorithm="HS256")
        headers = ["--header", f"Authorization: Bearer {token}"]
    server = make_server(workers=1, env=env)
    result = subprocess.run(
        [str(ST), "run", f"{server.url}/openapi.json", "--checks", CHECKS, "--exclude-path", "/events", "--exclude-path", "/ws",
         "--max-examples", "30", "--seed", seed, "--workers", "1", "--request-timeout", "10", *headers],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path)  # its example database (.schemathesis/) stays out of the repository
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"seed {seed} (CHANGEFEED_FUZZ_SEED replays it):\n{report}"
    assert "generated" in result.stdout and "24 selected" in result.stdout, report  # 12 operations, 12 OPTIONS
    assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200  # still answering
    assert "Traceback" not in server.log()
