"""The `mtfm` command line: the `data` subcommands (help, synth -> aggregate), and what commands refuse before work starts."""
from __future__ import annotations

import json
import shutil

import pytest

from repo_paths import REPO_ROOT
from mtfm.platform.cli import main


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "synth", "--help"], ["data", "aggregate", "--help"],
                                  ["data", "movielens", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--config-dir" in text or argv == ["data", "--help"]
    assert {"data": "synth", "synth": "--first-day", "aggregate": "--window", "movielens": "recbole"}[argv[-2]] in text


@pytest.mark.parametrize("argv, words", [
    (["data", "synth", "--out", "x", "--seed", "-1"], "argument --seed: expected an integer >= 0, found '-1'"),
    (["model", "summary", "--config", "configs/model/tiny.yaml", "--targets", "-4"],
     "argument --targets: expected an integer >= 0, found '-4'"),
    (["serve", "config", "--port", "70000"], "argument --port: expected a TCP port, 1-65535, found '70000'"),
    (["serve", "config", "--host", ""], "argument --host: expected an interface address or host name, e.g. "
                                        "127.0.0.1, found ''"),
])
def test_numbers_out_of_range_are_refused_by_argument(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_synth_then_aggregate(ray_cluster, config_dir, tmp_path, capsys):
    raw, agg = tmp_path / "raw", tmp_path / "agg"
    assert main(["data", "synth", "--config-dir", str(config_dir), "--out", str(raw), "--users", "20", "--days", "2"]) == 0
    assert "exposures/sqs:" in capsys.readouterr().out
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg),
                 "--window", "12h"]) == 0
    out = capsys.readouterr().out
    assert "compression" in out and "user samples out" in out
    summary = json.loads((agg / "_summary.json").read_text())
    assert summary["window_ms"] == 43_200_000 and summary["exposures_in"] == summary["exposures_out"] > 0
    # A second run into the same folder is refused with a clear message, not a traceback.
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg)]) == 1
    err = capsys.readouterr().err
    assert f"already holds {summary['samples_out']:,} aggregated user samples of {raw}" in err and "--overwrite" in err
    assert main(["data", "synth", "--config-dir", str(config_dir), "--out", str(raw)]) == 1
    # Every row quarantined (all later than --max-ts): the samples are written, empty, and the command fails.
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg),
                 "--max-ts", "0", "--overwrite"]) == 1
    assert "no user samples from" in capsys.readouterr().err
    assert json.loads((agg / "_summary.json").read_text())["samples_out"] == 0
    # That empty output is replaced without --overwrite only by a run of the same logs (another
    # folder's logs would take away the quarantine of these).
    other = tmp_path / "raw2"
    shutil.copytree(raw, other)
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(other), "--out", str(agg)]) == 1
    assert f"already holds 0 aggregated user samples of {raw}" in capsys.readouterr().err
    # Nothing to lose for the same logs: the corrected command reruns without --overwrite.
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg),
                 "--window", "12h"]) == 0
    assert "wrote no user samples" in capsys.readouterr().out
    assert json.loads((agg / "_summary.json").read_text())["samples_out"] == summary["samples_out"] > 0
    # An aggregation that died before its summary, or one whose summary is unreadable, is not replaced silently.
    (agg / "_summary.json").write_text("{")
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg)]) == 1
    assert "_summary.json cannot be read" in capsys.readouterr().err
    (agg / "_summary.json").unlink()
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg)]) == 1
    assert "did not finish" in capsys.readouterr().err


def test_an_output_folder_that_is_a_file_is_refused_by_name(ray_cluster, config_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    raw = tmp_path / "raw"
    config = ["--config-dir", str(config_dir)]
    assert main(["data", "synth", *config, "--out", str(raw), "--users", "5", "--days", "1"]) == 0
    capsys.readouterr()
    tiny = str(REPO_ROOT / "configs/train/tiny.yaml")
    for argv, given in [
        (["data", "synth", *config, "--out", str(afile)], f"--out {afile}"),
        (["data", "synth", *config, "--out", str(afile / "sub")], f"--out {afile / 'sub'}"),
        (["data", "aggregate", *config, "--raw", str(raw), "--out", str(afile)], f"--out {afile}"),
        (["train", *config, "--config", tiny, "--out", str(afile)], f"--out {afile}"),
        (["quickstart", *config, "--train-config", tiny, "--out", str(afile)], f"--out {afile}"),
        (["quickstart", *config, "--train-config", tiny, "--out", str(tmp_path / "q"), "--run-dir", str(afile / "run")],
         f"--run-dir {afile / 'run'}"),
        (["eval", "--checkpoint", str(tmp_path), "--json", str(afile / "eval.json")], f"--json {afile / 'eval.json'}"),
    ]:
        assert main(argv) == 1, argv
        assert capsys.readouterr().err == f"error: {given}: {afile} is a file, not a folder\n"
    assert afile.read_text() == "not a folder" and not (tmp_path / "q").exists()


def test_missing_input_folders_are_named_before_ray_starts(config_dir, tmp_path, monkeypatch, capsys):
    """A typo'd --raw or --data is refused at once, not after Ray's start-up (seconds on a small box)."""
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a missing input folder")

    monkeypatch.setattr("mtfm.platform.cluster.init_ray", no_ray)
    missing = tmp_path / "typo"
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(missing),
                 "--out", str(tmp_path / "agg")]) == 1
    assert f"{missing}: raw log folder not found" in capsys.readouterr().err
    assert main(["train", "--config-dir", str(config_dir), "--config", str(REPO_ROOT / "configs/train/tiny.yaml"),
                 "--data", str(missing), "--out", str(tmp_path / "run")]) == 1
    assert f"{missing}: no aggregated samples here" in capsys.readouterr().err


def test_a_ray_address_where_nothing_listens_is_refused_at_once(config_dir, tmp_path):
    """Ray retries such an address for minutes (a timeout line a second); the command says so in one line."""
    import os
    import subprocess
    import sys
    import time

    from mtfm.platform.cluster import unused_port

    raw = tmp_path / "raw"
    assert main(["data", "synth", "--config-dir", str(config_dir), "--out", str(raw), "--users", "10", "--days",
                 "2"]) == 0
    address = f"127.0.0.1:{unused_port()}"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mtfm.platform.cli", "data", "aggregate", "--config-dir",
                           str(config_dir), "--raw", str(raw), "--out", str(tmp_path / "agg")],
                          env=os.environ | {"RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and time.monotonic() - start < 60, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == (
        f"error: RAY_ADDRESS={address}: cannot connect to the Ray cluster (nothing answers there: connection "
        "refused); start it (`ray start --head`, `ray up ray_cluster.yaml`), or unset RAY_ADDRESS to run on an "
        "embedded local Ray")
    assert "Traceback" not in done.stderr and not any((tmp_path / "agg").rglob("*"))  # nothing written


def test_an_interrupted_synth_says_its_output_is_partial(tmp_path, monkeypatch, capsys):
    import mtfm.platform.synth as synth

    real = synth.synthesize

    def interrupted_at_the_end(registry, out, **kwargs):  # as Ctrl-C would, once tables are written
        real(registry, out, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "synthesize", interrupted_at_the_end)
    out = tmp_path / "raw"
    assert main(["data", "synth", "--out", str(out), "--users", "5", "--days", "1"]) == 130
    assert capsys.readouterr().err.strip() == (f"interrupted: {out} holds only part of the logs; run the command "
                                               "again with --overwrite")


def test_synth_adds_later_days_with_first_day(config_dir, tmp_path, capsys):
    raw = tmp_path / "raw"
    config = ["--config-dir", str(config_dir)]
    assert main(["data", "synth", *config, "--out", str(raw), "--users", "10", "--days", "2"]) == 0
    assert main(["data", "synth", *config, "--out", str(raw), "--users", "10", "--days", "1", "--first-day", "2"]) == 0
    assert "(2026-01-03 to 2026-01-03, days 2-2; seed 0)" in capsys.readouterr().out
    assert sorted(p.name for p in (raw / "exposures" / "hp").iterdir()) == [
        "2026-01-01.parquet", "2026-01-02.parquet", "2026-01-03.parquet"]
    assert main(["data", "synth", *config, "--out", str(raw), "--users", "10", "--days", "1", "--first-day", "1"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {raw / 'exposures/hp/2026-01-02.parquet'} already exists "
                                              f"(day 1): {raw} holds days 0-2; write only days it lacks (--first-day "
                                              "N --days D), or pass --overwrite")
    assert main(["data", "synth", *config, "--out", str(raw), "--users", "10", "--days", "1", "--first-day", "3",
                 "--seed", "1"]) == 1
    assert f"error: {raw} holds the synthetic logs of seed 0 and 10 users (_synth.json), not of --seed 1 and " \
           "--users 10" in capsys.readouterr().err
