"""`parallm jobs` reads the data directory's database directly."""
from ft_support import open_fine_tuning, text_rows
from parallm.cli import main
from parallm.engine.finetune import FineTuning, JobRequest


def test_parallm_jobs_lists_jobs_and_events(tmp_path, capsys):
    ft = open_fine_tuning(tmp_path, base_models={"tiny": "unused"})  # runner not started: jobs stay queued
    f = ft.files.save_bytes(text_rows(4), filename="t.jsonl", purpose="fine-tune")
    first = ft.jobs.create(JobRequest(model="tiny", training_file=f.id))
    second = ft.jobs.create(JobRequest(model="tiny", training_file=f.id))
    ft.jobs.cancel(second.id)
    ft.store.close()
    assert main(["jobs", "--data-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [[second.id, "cancelled"], [first.id, "queued"]]
    assert main(["jobs", "--data-dir", str(tmp_path), first.id]) == 0
    out = capsys.readouterr().out
    assert "Created fine-tuning job" in out and "Job queued" in out
    assert main(["jobs", "--data-dir", str(tmp_path), "ftjob-nope"]) == 1
