"""The CLI's shared pieces: per-invocation state, one error mapper for every command."""

import typer
from typer.testing import CliRunner

from gprebn_edge.cli import _app, app

runner = CliRunner()


def test_debug_does_not_leak_into_the_next_invocation(tmp_path):
    missing = str(tmp_path / "none.safetensors")
    r = runner.invoke(app, ["--debug", "info", missing])
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)
    assert _app.session.debug
    r = runner.invoke(app, ["info", missing])
    assert r.exit_code == 1 and "no such checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not _app.session.debug and _app.session.command == "info"


def test_every_command_goes_through_the_one_error_mapper():
    import gprebn_edge.cli  # noqa: F401  (registers the commands)

    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert sorted(names) == sorted(["adapt", "info", "export", "bench", "compare", "loop", "loop-report", "demo"])
    for c in app.registered_commands:
        assert getattr(c.callback, "__wrapped__", None) is not None, c.callback  # wrapped by @command


def test_a_bug_is_one_line_with_exit_2(monkeypatch):
    import gprebn_edge.demo

    def boom(*a, **k):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(gprebn_edge.demo, "run_demo", boom)
    r = runner.invoke(app, ["demo", "--quick"])
    assert r.exit_code == 2 and "ValueError: boom" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_missing_demo_dependency_is_mapped(monkeypatch):
    """demo's import of the library is under the error mapping: a missing extra is one line, exit 1."""
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "gprebn_edge.demo":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    r = runner.invoke(app, ["demo", "--quick"])
    assert r.exit_code == 1, r.output
    assert "torch" in r.stderr.lower() and len(r.stderr.strip().splitlines()) == 1


def test_shared_options_read_the_same():
    """An option several commands take is declared once (gprebn_edge/cli/options.py): same flag, same help."""
    from gprebn_edge.cli import options

    group = typer.main.get_command(app)
    shared = {"--trust-model-code": options.TRUST_HELP, "--verify": options.VERIFY_HELP,
              "--json": options.JSON_HELP, "--threads": None, "--device": None}
    seen: dict[str, set] = {flag: set() for flag in shared}
    users: dict[str, list] = {flag: [] for flag in shared}
    for name, cmd in group.commands.items():
        for param in cmd.params:
            for flag in shared:
                if flag in getattr(param, "opts", ()):
                    seen[flag].add(param.help)
                    users[flag].append(name)
    for flag, help_text in shared.items():
        assert len(seen[flag]) == 1, (flag, seen[flag])
        if help_text is not None:
            assert seen[flag] == {help_text}
    assert sorted(users["--json"]) == ["adapt", "bench", "compare", "export", "info", "loop-report"]
    assert sorted(users["--trust-model-code"]) == ["bench", "compare", "export", "loop"]
