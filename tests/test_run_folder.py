"""bitfit writes only into a folder it created, one run at a time: a user's folder is never touched."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import saved

import train
from bitfit.core.errors import BitfitError
from bitfit.model.delta import read_delta
from bitfit.run import run_folder
from tiny import tiny_llama

QUICK = ["--split", "train[:8]", "--eval-data", "none", "--max-steps", "1"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return saved(tiny_llama, tmp_path_factory.mktemp("model") / "llama")


@pytest.mark.slow
def test_an_out_dir_holding_a_model_is_refused_and_the_model_folder_stays_byte_identical(model_dir, capsys):
    before = snapshot(Path(model_dir))
    for extra in ([], ["--overwrite"]):
        assert train.main(["--model", model_dir, *QUICK, "--out-dir", model_dir, *extra]) == 2
        assert "holds files bitfit did not write" in capsys.readouterr().err
    assert snapshot(Path(model_dir)) == before


@pytest.mark.slow
def test_an_empty_folder_or_a_new_path_is_accepted_and_marked_as_a_bitfit_run(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out)]) == 0
        assert run_folder.is_run_folder(out) and (out / "delta.safetensors").is_file()


@pytest.mark.slow
def test_overwrite_deletes_only_what_a_run_wrote(model_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out)]) == 0
    (out / "my_notes.txt").write_text("mine")
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out), "--overwrite"]) == 0
    assert (out / "my_notes.txt").read_text() == "mine"


def finished(model_dir: str, out: Path) -> Path:
    assert train.main(["--model", model_dir, *QUICK, "--split", "train[:16]", "--max-steps", "2", "--save-every", "1", "--keep-checkpoints", "2",
                       "--out-dir", str(out)]) == 0  # 2 steps, 2 checkpoints
    return out


@pytest.mark.slow
def test_overwrite_replaces_the_runs_own_files_keeps_a_users_and_names_them(model_dir, tmp_path, capsys):
    out = finished(model_dir, tmp_path / "run")
    mine = [out / "checkpoints" / "notes.txt", out / "checkpoints" / "best" / "state.json", out / "my_notes.txt",
            out / "plots" / "mine.txt"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    (out / ".delta.safetensors.x1y2.writing").write_bytes(b"half")  # what a killed write of bitfit's leaves
    before = read_delta(str(out / "delta.safetensors"))[0]
    capsys.readouterr()
    assert train.main(["--model", model_dir, *QUICK, "--max-steps", "1", "--seed", "3", "--out-dir", str(out),
                       "--overwrite", "--save-every", "1", "--keep-checkpoints", "1"]) == 0
    assert all(path.read_text() == "mine" for path in mine)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "notes.txt", "step-000001"]  # not 2
    assert not (out / ".delta.safetensors.x1y2.writing").exists() and not (out / run_folder.REPLACED).exists()
    after = read_delta(str(out / "delta.safetensors"))[0]
    assert any(not torch.equal(after[name], before[name]) for name in before)  # the new run's
    said = capsys.readouterr().out
    assert "--overwrite: the earlier run is set aside in" in said and "kept 4 that bitfit did not write: " in said


@pytest.mark.slow
def test_overwrite_that_fails_before_its_first_step_puts_the_earlier_run_back_as_it_was(model_dir, tmp_path):
    out = finished(model_dir, tmp_path / "run")
    before = snapshot(out)
    for failing in (["--data", "missing.jsonl"], ["--model", str(tmp_path / "no-model")], ["--warmup-steps", "100"]):
        model = [] if "--model" in failing else ["--model", model_dir]
        assert train.main([*model, *QUICK, *failing, "--out-dir", str(out), "--overwrite"]) == 2
        assert snapshot(out) == before and not (out / run_folder.REPLACED).exists()


@pytest.mark.slow
@pytest.mark.parametrize("what", ["a user's file inside", "a link", "a folder named like a run file"])
def test_a_name_bitfit_writes_holding_what_bitfit_did_not_write_is_refused_and_nothing_moves(what, model_dir, tmp_path, capsys):
    out = finished(model_dir, tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "state.json").write_text("{}")  # what a checkpoint holds, but the user's
    if what == "a link":
        shutil.rmtree(out / "checkpoints" / "step-000002")
        (out / "checkpoints" / "step-000002").symlink_to(tmp_path / "elsewhere")
    elif what == "a folder named like a run file":
        (out / "loss.png").unlink()
        (out / "loss.png").mkdir()
    else:
        (out / "checkpoints" / "step-000002" / "mine.txt").write_text("mine")
    before, elsewhere = snapshot(out), snapshot(tmp_path / "elsewhere")
    for extra in (["--overwrite"], ["--overwrite", "--save-every", "1", "--keep-checkpoints", "1"]):
        assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out), *extra]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith({
            "a link": f"error: {out / 'checkpoints' / 'step-000002'} is named like a checkpoint but is a link",
            "a folder named like a run file": f"error: {out / 'loss.png'} is named like a file a run writes, but is no file",
            "a user's file inside": f"error: {out / 'checkpoints' / 'step-000002'} is named like a checkpoint but holds "
                                    "files bitfit did not write (mine.txt"}[what]), last
        assert snapshot(out) == before and snapshot(tmp_path / "elsewhere") == elsewhere


@pytest.mark.slow
@pytest.mark.parametrize("where", ["new", "empty", "default"])
def test_a_run_that_fails_before_its_first_step_gives_its_folder_back_as_it_found_it(where, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "runs").mkdir()
    out = {"new": ["--out-dir", "new/run"], "empty": ["--out-dir", "empty"], "default": []}[where]
    for failing in (["--data", "missing.jsonl"], ["--warmup-steps", "100"]):  # before the model loads; after
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        assert train.main(["--model", model_dir, *QUICK, *failing, *out]) == 2
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_folder.time, "strftime", lambda pattern: "20261123-120000")
    folders = [run_folder.claim("") for _ in range(3)]
    run_folder.release()
    assert [f.name for f in folders] == ["20261123-120000", "20261123-120000-2", "20261123-120000-3"]


@pytest.mark.slow
def test_a_folder_in_use_by_another_run_is_refused_while_that_run_holds_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bitfit.run import run_folder; "
                               f"run_folder.claim({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BitfitError, match=rf"is in use by another run \(pid {holder.pid}\)"):
            run_folder.claim(str(out))
    finally:
        holder.kill()
        holder.wait()
    run_folder.claim(str(out))  # the lock went with the process that held it, however it ended
    run_folder.release()


@pytest.mark.slow
def test_an_out_dir_that_is_a_file_is_refused_untouched(model_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("precious")
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "precious"


@pytest.mark.slow
def test_resuming_a_finished_run_says_there_is_nothing_to_resume(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out)]) == 0
    assert train.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a finished run, nothing to resume" in err and "--overwrite" not in err


@pytest.mark.slow
def test_an_overwrite_that_fails_after_it_trained_keeps_the_earlier_run_until_one_finishes_and_a_plain_run_refuses(
        model_dir, tmp_path, monkeypatch, capsys):
    out = finished(model_dir, tmp_path / "run")
    earlier = snapshot(out)
    real = train.save_delta
    monkeypatch.setattr(train, "save_delta", lambda *args, **kwargs: (_ for _ in ()).throw(BitfitError("the disk is full")))
    assert train.main(["--model", model_dir, *QUICK, "--split", "train[:16]", "--max-steps", "2", "--save-every", "1",
                       "--seed", "3", "--out-dir", str(out), "--overwrite"]) == 2
    aside = out / run_folder.REPLACED
    assert snapshot(aside) == {name: digest for name, digest in earlier.items() if name != run_folder.MARKER}  # whole
    capsys.readouterr()
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out)]) == 2  # without --overwrite: refused
    assert f"the run it replaces is kept in {aside}" in capsys.readouterr().err and aside.is_dir()
    monkeypatch.setattr(train, "save_delta", real)
    assert train.main(["--resume", str(out)]) == 0  # the new run finishes: only now is the earlier one gone
    assert not aside.exists() and read_delta(str(out / "delta.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("what", ["a link", "a file", "a folder holding a user's file"])
def test_a_replaced_folder_that_bitfit_did_not_make_is_refused_by_every_command_before_anything_moves(
        what, model_dir, tmp_path, capsys):
    out = finished(model_dir, tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("the user's")
    aside = out / run_folder.REPLACED
    if what == "a link":
        aside.symlink_to(tmp_path / "elsewhere")
    elif what == "a file":
        aside.write_text("the user's")
    else:
        aside.mkdir()
        (aside / "mine.txt").write_text("the user's")
    before, elsewhere = snapshot(out), snapshot(tmp_path / "elsewhere")
    for extra in (["--overwrite"], [], ["--resume", str(out)]):
        args = extra if "--resume" in extra else ["--model", model_dir, *QUICK, "--out-dir", str(out), *extra]
        assert train.main(args) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: {aside} is where --overwrite keeps an earlier run, but it "), last
        assert snapshot(out) == before and snapshot(tmp_path / "elsewhere") == elsewhere


@pytest.mark.slow
def test_a_finished_run_started_with_overwrite_is_not_resumed(model_dir, tmp_path, capsys):
    out = finished(model_dir, tmp_path / "run")
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out), "--overwrite", "--save-every", "1"]) == 0
    before = snapshot(out)
    assert train.main(["--resume", str(out)]) == 2
    assert "is a finished run, nothing to resume" in capsys.readouterr().err and snapshot(out) == before


@pytest.mark.parametrize("command", [["--overwrite"], []], ids=["--overwrite", "a plain rerun"])
def test_a_checkpoints_link_to_a_users_folder_is_refused_and_nothing_is_written_through_it(command, model_dir, tmp_path, capsys):
    out, theirs = tmp_path / "run", tmp_path / "theirs"
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out)]) == 0
    for step in (1, 2):  # a user's folders, named and filled as a checkpoint would be
        (theirs / f"step-00000{step}").mkdir(parents=True)
        for name in ("state.json", "state.safetensors"):
            (theirs / f"step-00000{step}" / name).write_text("mine")
    (out / "checkpoints").symlink_to(theirs)
    before = snapshot(theirs)
    assert train.main(["--model", model_dir, *QUICK, "--save-every", "1", "--keep-checkpoints", "1", *command,
                       "--out-dir", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"error: {out / 'checkpoints'} is named like the folder of a run's checkpoints, but is a link: bitfit "
                    "never writes or deletes through it; move it out, or pick another --out-dir")
    assert snapshot(theirs) == before
