"""The study jobs whose exported folders are checked in under ``jobs/<name>/``.

``fedseg jobs export`` regenerates them from these definitions and a test checks that the folders
are up to date, so ``nvflare job submit -j jobs/<name>`` always runs what this code describes.
Their settings are the ``study`` profile (``fedseg.config``: 128^3 crops, as in the BraTS federated
papers); for a quick run on a laptop use ``fedseg simulate`` / ``fedseg poc``, which export small
variants on the fly.
"""

from __future__ import annotations

from pathlib import Path

from fedseg.jobs.base import Job, algorithms, export

JOBS_DIR = Path(__file__).resolve().parent

#: the checked-in jobs: each algorithm's own (``Algorithm.study_job``: the study profile's settings;
#: none for HE, whose job needs HE kits)
STUDY_JOBS: dict[str, Job] = {name: job for name, algo in algorithms().items() if (job := algo.study_job()) is not None}


def export_all(out_dir: Path = JOBS_DIR) -> list[Path]:
    """Export every study job, and the federated statistics job (``jobs/stats``), to ``out_dir/<name>``;
    returns the job folders."""
    from fedseg.jobs.stats import export_stats

    return [*(export(job, out_dir) for job in STUDY_JOBS.values()), export_stats(out_dir)]


def job_files(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file in an exported job folder (no caches)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def stale_jobs(out_dir: Path = JOBS_DIR) -> list[str]:
    """Names of checked-in job folders that differ from a fresh export (empty when up to date)."""
    import tempfile

    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for folder in export_all(Path(tmp)):
            if job_files(folder) != job_files(out_dir / folder.name):
                stale.append(folder.name)
    return stale
