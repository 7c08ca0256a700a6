"""bitfit writes only into a folder it created, one run at a time: a user's folder is never touched."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import train
from bitfit import run_folder
from bitfit.errors import BitfitError
from test_train import saved
from tiny import tiny_llama

QUICK = ["--split", "train[:8]", "--eval-data", "none", "--max-steps", "1"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return saved(tiny_llama, tmp_path_factory.mktemp("model") / "llama")


def test_an_out_dir_holding_a_model_is_refused_and_the_model_folder_stays_byte_identical(model_dir, capsys):
    before = snapshot(Path(model_dir))
    for extra in ([], ["--overwrite"]):
        assert train.main(["--model", model_dir, *QUICK, "--out-dir", model_dir, *extra]) == 2
        assert "holds files bitfit did not write" in capsys.readouterr().err
    assert snapshot(Path(model_dir)) == before


def test_an_empty_folder_or_a_new_path_is_accepted_and_marked_as_a_bitfit_run(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out)]) == 0
        assert run_folder.is_run_folder(out) and (out / "delta.safetensors").is_file()


def test_overwrite_deletes_only_what_a_run_wrote(model_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out)]) == 0
    (out / "my_notes.txt").write_text("mine")
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out), "--overwrite"]) == 0
    assert (out / "my_notes.txt").read_text() == "mine"


def test_overwrite_deletes_checkpoints_file_by_file_keeps_a_users_files_among_them_and_says_so(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--max-steps", "2", "--save-every", "1", "--keep-checkpoints", "2",
                       "--out-dir", str(out)]) == 0
    mine = [out / "checkpoints" / "notes.txt", out / "checkpoints" / "step-000002" / "mine.txt",
            out / "checkpoints" / "best" / "state.json", out / "checkpoints" / "step-000009" / "state.json"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    (out / ".delta.safetensors.x1y2.writing").write_bytes(b"half")  # what a killed write of bitfit's leaves
    capsys.readouterr()
    assert train.main(["--model", model_dir, *QUICK, "--max-steps", "1", "--out-dir", str(out), "--overwrite"]) == 0
    assert all(path.read_text() == "mine" for path in mine[:3])
    assert not mine[3].exists()  # a step-N folder holds what bitfit writes there: its state.json is bitfit's
    assert not (out / "checkpoints" / "step-000001").exists() and not (out / ".delta.safetensors.x1y2.writing").exists()
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").iterdir()) == ["mine.txt"]
    said = capsys.readouterr().out
    assert "--overwrite: deleted the earlier run's files; kept 3 that bitfit did not write: " in said
    assert str(mine[0]) in said


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


def test_a_folder_in_use_by_another_run_is_refused_while_that_run_holds_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bitfit import run_folder; "
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


def test_an_out_dir_that_is_a_file_is_refused_untouched(model_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("precious")
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "precious"


def test_resuming_a_finished_run_says_there_is_nothing_to_resume(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, *QUICK, "--out-dir", str(out)]) == 0
    assert train.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a finished run, nothing to resume" in err and "--overwrite" not in err
