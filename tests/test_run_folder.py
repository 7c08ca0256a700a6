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
