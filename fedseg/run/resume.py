"""The resume point of a stopped study, under the runners' name: it lives in ``fedseg.jobs.resume``
(a job that resumes reads it when it is built, and ``jobs`` sits below ``fedseg.run``)."""

from fedseg.jobs.resume import GLOBAL_MODEL_FILE, ResumeError, ResumePoint, find_resume_point

__all__ = ["GLOBAL_MODEL_FILE", "ResumeError", "ResumePoint", "find_resume_point"]
