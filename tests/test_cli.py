"""`python -m minihires`: every command resolves to its module's cli_<command>, and usage lists it."""
from minihires.cli import COMMANDS, cli_function, main, usage


def test_every_command_has_its_cli_function():
    for command in COMMANDS:
        assert callable(cli_function(command)), command


def test_usage_and_unknown_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.strip() == usage().strip() and all(c in out for c in COMMANDS)
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
