"""Every console script declared in setup.py also works as ``python -m MODULE`` (a module without a ``__main__``
guard imports, does nothing and exits 0). The list is read from setup.py, so a new script is covered automatically."""
from __future__ import annotations

import os
import re
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def console_scripts() -> list[tuple[str, str]]:
    """``(script name, module)`` of every ``console_scripts`` entry in setup.py."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        text = f.read()
    block = re.search(r'"console_scripts":\s*\[(.*?)\]', text, re.S).group(1)
    return re.findall(r'"([\w-]+)\s*=\s*([\w.]+):main"', block)


def test_setup_declares_the_scripts():
    names = [name for name, _ in console_scripts()]
    assert {"megatron-dil-train", "megatron-dil-preprocess", "megatron-dil-hf-to-megatron",
            "megatron-dil-megatron-to-hf"} <= set(names)


@pytest.mark.parametrize("name,module", console_scripts())
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # the test process imported it already
def test_console_script_runs_as_python_m(name, module, monkeypatch, capsys):
    # runpy.run_module(run_name="__main__") is what `python -m MODULE` executes (in-process: no second torch import)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {name} ")
