"""`parallm jobs` reads the data directory's database directly."""
from ft_support import open_fine_tuning, text_rows
import argparse

from parallm.cli import SUBCOMMANDS
from parallm.commands import job_listing as jobs_command
from parallm.finetune import FineTuning, JobRequest


def main(argv):
    """`parallm jobs ...` (through its own parser: the CLI builds every subcommand's parser)."""
    assert argv[0] == "jobs" and SUBCOMMANDS["jobs"][0] == jobs_command.__name__
    parser = argparse.ArgumentParser()
    jobs_command.add_arguments(parser)
    return jobs_command.run(parser.parse_args(argv[1:]))


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


def test_parallm_jobs_marks_a_deleted_fine_tuned_model(tmp_path, capsys):
    ft = open_fine_tuning(tmp_path, base_models={"tiny": "unused"})
    f = ft.files.save_bytes(text_rows(4), filename="t.jsonl", purpose="fine-tune")
    kept, deleted = (ft.jobs.create(JobRequest(model="tiny", training_file=f.id)) for _ in range(2))
    for job in (kept, deleted):  # as the runner leaves a finished job
        ft.store.update_job(job.id, status="succeeded", fine_tuned_model=f"ft:tiny::{job.id[6:]}")
    ft.jobs.adapter_dir(kept.id).mkdir(parents=True)  # the other's files are gone (DELETE /v1/models/...)
    ft.store.close()
    assert main(["jobs", "--data-dir", str(tmp_path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines[deleted.id].endswith(" (deleted)") and "(deleted)" not in lines[kept.id]
