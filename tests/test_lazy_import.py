"""``import sfrtr`` stays light (the heavy names load on first use, PEP 562), and every
public name still resolves, from ``sfrtr.X`` and ``from sfrtr import X`` alike."""

from __future__ import annotations

import subprocess
import sys

import sfrtr


def child(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def test_import_sfrtr_does_not_import_aiohttp():
    out = child("import sys, sfrtr\n"
                "print('aiohttp' in sys.modules, 'sfrtr.manager' in sys.modules)\n"
                "from sfrtr import TokenManager\n"
                "print('aiohttp' in sys.modules, sfrtr.TokenManager is TokenManager)")
    assert out.split() == ["False", "False", "True", "True"]


def test_the_version_and_help_do_not_import_the_emulator_or_aiohttp():
    for argv in (["--version"], ["--help"], ["status", "--help"]):
        out = child("import runpy, sys\n"
                    f"sys.argv = ['sfrtr', *{argv!r}]\n"
                    "try:\n"
                    "    runpy.run_module('sfrtr', run_name='__main__')\n"
                    "except SystemExit:\n"
                    "    pass\n"
                    "print('modules', 'aiohttp' in sys.modules, 'sfrtr.emulator' in sys.modules)")
        assert out.splitlines()[-1] == "modules False False", argv


def test_every_public_name_resolves_to_its_modules_object():
    import importlib

    for name in sfrtr.__all__:
        value = getattr(sfrtr, name)
        if name == "__version__":
            continue
        module = importlib.import_module(sfrtr._LAZY[name]) if name in sfrtr._LAZY else None
        if module is not None:
            assert getattr(module, name) is value, name
    assert set(sfrtr._LAZY) <= set(sfrtr.__all__)
    assert set(sfrtr.__all__) <= set(dir(sfrtr))
    namespace: dict[str, object] = {}
    exec("from sfrtr import *", namespace)
    assert {n for n in namespace if not n.startswith("__")} == set(sfrtr.__all__) - {
        "__version__"}
