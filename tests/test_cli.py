import subprocess
import sys

from tasks.cli import main


def test_help_lists_subcommands():
    res = subprocess.run([sys.executable, "-m", "tasks.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "parity" in res.stdout


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "subcommands" in capsys.readouterr().out
