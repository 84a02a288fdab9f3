"""The README as a newcomer runs it: its two set-up commands, and its "Use it"
program against ``sfrtr emulator``, exactly as written (only the emulator's port
differs when 8765 is taken)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.S | re.M)


def test_exactly_two_set_up_and_go_commands():
    commands = code_blocks("sh")
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/sfrtr demo\n",
        "python3 -m venv .venv && .venv/bin/pip install nox && .venv/bin/nox -s tests\n",
    ]


def test_the_use_it_program_runs_against_sfrtr_emulator():
    program = next(block for block in code_blocks("python") if "asyncio.run(main())" in block)
    assert program.count("http://127.0.0.1:8765") == 1
    emulator = subprocess.Popen(
        [sys.executable, "-m", "sfrtr", "emulator", "--port", "0"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert emulator.stdout is not None
        url = emulator.stdout.readline().strip().removeprefix("sfrtr emulator on ")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        ran = subprocess.run([sys.executable, "-c", program.replace("http://127.0.0.1:8765", url)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONWARNINGS": "error::ResourceWarning"})
    finally:
        os.killpg(emulator.pid, signal.SIGINT)
        emulator.communicate(timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "0 accounts; refreshed once\n"
    assert ran.stderr == ""
    assert emulator.returncode == 0


def test_the_docs_site_shows_the_same_program():
    """docs/getting-started.md includes docs/quickstart.py: it must be the README's."""
    program = next(block for block in code_blocks("python") if "asyncio.run(main())" in block)
    quickstart = Path(__file__).parent.parent / "docs" / "quickstart.py"
    assert quickstart.read_text() == program
    assert '--8<-- "docs/quickstart.py"' in (quickstart.parent / "getting-started.md").read_text()


def test_the_in_process_emulator_snippet_of_getting_started_runs():
    """docs/getting-started.md's in-process snippet, in an async function as a reader
    would put it; it must give a grant the OAuth client can refresh."""
    page = (Path(__file__).parent.parent / "docs" / "getting-started.md").read_text()
    snippet = next(block for block in re.findall(r"^```python\n(.*?)^```$", page,
                                                 flags=re.S | re.M)
                   if "emulator.serve()" in block)
    body = "".join(f"    {line}\n" for line in snippet.splitlines())
    program = ("import asyncio\nimport sfrtr\n\nasync def main():\n" + body +
               "        outcome = await oauth.refresh(grant.refresh_token)\n"
               "        await oauth.aclose()\n"
               "        print(outcome.kind.value)\n\nasyncio.run(main())\n")
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "ok\n"
