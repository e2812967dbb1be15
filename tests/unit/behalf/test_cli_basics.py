import os

from behalf.cli import main


def test_bad_setting_exits_2_with_one_line(capsys, monkeypatch):
    monkeypatch.setenv("BEHALF_REFRESH_SKEW_SECONDS", "soon")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "behalf: BEHALF_REFRESH_SKEW_SECONDS: expected a positive integer, got 'soon'"


def test_unknown_option_exits_2(capsys):
    assert main(["migrate", "--nope"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_migrate_twice_is_a_no_op(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BEHALF_DATABASE_URL", f"sqlite:///{tmp_path}/db.sqlite3")
    monkeypatch.setenv("BEHALF_LOCAL_KEY_FILE", os.fspath(tmp_path / "key"))
    assert main(["migrate"]) == 0
    assert "migrated empty ->" in capsys.readouterr().out
    assert main(["migrate"]) == 0
    assert "already at" in capsys.readouterr().out
