"""The README is the front door: its curl session, the design card's path, works as shown."""

from support import ROOT
from support.databases import Database
from support.docs import run, same_answer, shell_blocks
from support.servers import Server


def test_readme_curl_lines_answer_as_shown(server: Server, database: Database) -> None:
    session = next(block for block in shell_blocks(ROOT / "README.md") if not block.not_run)
    assert len(session.commands) >= 5
    for command, shown, printed in run(session, server.url, database.config):
        assert command.startswith("curl ")
        assert same_answer(printed, shown), f"{command}\nprinted: {printed}\nREADME shows: {shown}"
