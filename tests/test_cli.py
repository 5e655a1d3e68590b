"""The command line: every sub-command module is registered, help and errors exit as documented."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

from quantscale import cli, commands


def _defines_register(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "register" for n in tree.body)


def test_every_command_module_is_registered():
    folder = Path(commands.__path__[0])
    found = {
        info.name
        for info in pkgutil.iter_modules(commands.__path__)
        if _defines_register(folder / f"{info.name}.py")
    }
    assert found == {m.__name__.rpartition(".")[2] for m in cli.COMMANDS}
    help_text = cli.build_parser().format_help()
    assert all(name in help_text for name in found)


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("quantscale ")


def test_quantscale_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
