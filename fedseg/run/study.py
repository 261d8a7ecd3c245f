"""``fedseg study``: a federated study that drives itself over NVFlare's admin API.

The lead starts a study once. The supervisor submits the study's job (a *segment*), follows it
with the lead's admin kit (``nvflare.fuel.flare_api``), and whenever a segment ends short of the
study's rounds it submits the next one, which continues from the last completed round in the
server's durable study store (``fedseg.app.study_store``): the global model, FedOpt's optimizer
state, and (at the sites, under the study's name) each site's personal store. Nothing has to be
downloaded to go on.

Every segment is the same job folder, copied into the study folder with two settings added to its
round workflow (``study_id``: the study's folder in the store; ``resume_from_store``: start after
its newest round). A segment therefore never redoes a completed round, and the last one finishes
the study (cross-site evaluation and, for personalized methods, the personal scores included).

State, on the lead's disk (``STUDY_DIR/study.json``, written atomically after every change):
which segments ran (job id, status, why it ended, where its results were downloaded), rounds
done of total, each site's participation, the decisions with their reasons and the last error.
Running ``fedseg study run`` again with the same study folder picks the study up where it was:
a segment that is still running is followed again, a finished one is read, a dead one is ended.

What the supervisor decides, and why (``decide``; every decision is printed and appended to
``STUDY_DIR/study.log``):

- the segment finished with all rounds done: the study is complete;
- it finished short (a round with too few sites, an abort, the server's job process died): the
  next segment is submitted, after a pause that doubles with every segment in a row that added no
  round (``Policy.retry_base`` .. ``retry_max``); after ``max_retries`` such segments the study
  stops and says what to check;
- the job is RUNNING in NVFlare's job store but the server does not run it for ``dead_grace``
  seconds: the server restarted (NVFlare 2.9 neither resumes nor ends such a job), or the job's
  server process has finished and NVFlare holds the job for a vanished site's outcome (up to
  ``client_outcome_wait_timeout``, 900 s by default). It is ended (an abort, which NVFlare
  refuses for a job it no longer knows and takes for one it holds) and its results are read: the
  study completes or continues;
- a running segment completes no round for ``stall_limit`` seconds (default: 3 round timeouts, at
  least 10 minutes): it is ended and the study continues;
- a site left out of the last round (NVFlare never redeploys a running job to a restarted site) is
  connected again without the job, and a new segment would run at least ``rejoin_rounds_left``
  rounds (the one in flight included): the segment is ended (the round in flight is lost) and the
  next one includes the site; with fewer rounds left the study finishes without it (a new segment
  costs its start and the round in flight, more than the site's last round gains);
- the server cannot be reached: wait and retry; after ``server_down_limit`` seconds the study
  stops, saying to start the server kit and run the same command again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

STATE_FILE = "study.json"
LOG_FILE = "study.log"
JOB_COPY = "job"
SEGMENTS = "segments"
STATS_GROUP = "fedseg_study"  # fedseg.app.resilient_fedavg.STATS_GROUP (not imported: no NVFlare here)
WORKFLOWS = ("ResilientFedAvg", "ResilientFedOpt")
WAITING = ("SUBMITTED", "DISPATCHED")


class StudyError(RuntimeError):
    """The study cannot start or go on; the message says what to do."""


# ---------------------------------------------------------------------------------------- policy and state


@dataclass(frozen=True)
class Policy:
    """When the supervisor ends, continues or gives up a study (seconds unless named otherwise)."""

    poll: float = 5.0
    stall_limit: float = 0.0  # 0: 3 x the job's round timeout, at least 600 s
    dead_grace: float = 30.0
    server_down_limit: float = 3600.0
    waiting_limit: float = 3600.0  # a segment SUBMITTED/DISPATCHED (too few sites connected)
    max_retries: int = 5
    retry_base: float = 10.0
    retry_max: float = 300.0
    rejoin_rounds_left: int = 2

    def stall_seconds(self, round_timeout: float) -> float:
        return self.stall_limit or max(600.0, 3.0 * float(round_timeout or 0))

    def retry_pause(self, retries: int) -> float:
        return 0.0 if retries <= 0 else min(self.retry_max, self.retry_base * 2 ** (retries - 1))


@dataclass
class Segment:
    job_id: str
    submitted_at: float
    rounds_before: int = 0
    status: str = "RUNNING"
    ended_at: float | None = None
    rounds_after: int | None = None
    download: str = ""
    reason: str = ""


@dataclass
class StudyState:
    study_id: str
    source: str
    job_folder: str
    job_name: str
    total_rounds: int
    round_timeout: float
    min_sites: int
    status: str = "running"  # running, completed, stopped
    reason: str = ""
    rounds_done: int = 0
    retries: int = 0
    final_done: bool = False  # the last round's job completed (cross-site evaluation included)
    last_error: str = ""
    segments: list[Segment] = field(default_factory=list)
    sites: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # site -> answered / missed rounds
    decisions: list[dict[str, Any]] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    @property
    def current(self) -> Segment | None:
        seg = self.segments[-1] if self.segments else None
        return seg if seg is not None and seg.ended_at is None else None

    def save(self, folder: Path) -> None:
        path = Path(folder) / STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: Path) -> StudyState:
        doc = json.loads((Path(folder) / STATE_FILE).read_text())
        doc["segments"] = [Segment(**s) for s in doc.get("segments", [])]
        return cls(**doc)

    def note_rounds(self, records: list[dict[str, Any]]) -> None:
        """Participation records (the store's, or a segment's) into rounds done and the sites' table."""
        for rec in records:
            rnd = int(rec["round"])
            for site in {*rec.get("targets", []), *rec.get("disconnected", []), *rec.get("answered", []),
                         *rec.get("missing", []), *(rec.get("failed") or {})}:
                entry = self.sites.setdefault(site, {"answered": [], "missed": []})
                for key in ("answered", "missed"):
                    if rnd in entry[key]:
                        entry[key].remove(rnd)
                entry["answered" if site in rec.get("answered", []) else "missed"].append(rnd)
                entry["answered"].sort()
                entry["missed"].sort()
            if len(rec.get("answered", [])) >= self.min_sites:
                self.rounds_done = max(self.rounds_done, rnd)


# ---------------------------------------------------------------------------------------- observation and decision


@dataclass
class Observation:
    """What the supervisor saw of the current segment in one poll."""

    now: float
    reachable: bool
    status: str | None = None  # NVFlare's job status
    server_runs_job: bool | None = None  # the job in the server's list of running jobs
    progress: dict[str, Any] | None = None  # the server workflow's stats (STATS_GROUP)
    connected: list[str] = field(default_factory=list)
    sites_with_job: list[str] | None = None  # sites whose client runs the job now
    error: str = ""


@dataclass
class Memo:
    """What the decision needs to remember between polls (not saved: a restart starts the clocks again)."""

    last_progress: tuple[Any, ...] | None = None
    progress_at: float | None = None
    unreachable_since: float | None = None
    not_run_since: float | None = None
    waiting_since: float | None = None


@dataclass(frozen=True)
class Decision:
    action: str  # wait, finished, end, stop
    reason: str


def decide(state: StudyState, seg: Segment, obs: Observation, memo: Memo, policy: Policy) -> Decision:
    """What to do with the running segment ``seg`` after ``obs`` (updates ``memo``'s clocks)."""
    if not obs.reachable:
        memo.unreachable_since = obs.now if memo.unreachable_since is None else memo.unreachable_since
        down = obs.now - memo.unreachable_since
        if down >= policy.server_down_limit:
            return Decision("stop", f"the server has not answered for {down:.0f} s ({obs.error}); ask the server "
                                    "admin to start the server kit (KIT/startup/start.sh), then run the same "
                                    "`fedseg study run` command again: the study continues from its last round")
        return Decision("wait", f"the server does not answer ({obs.error}); retrying")
    if memo.unreachable_since is not None:  # back: the clocks start again
        memo.unreachable_since = None
        memo.progress_at = obs.now
        memo.not_run_since = None
    status = obs.status or ""
    if status.startswith("FINISHED") or status in ("ABANDONED", "FAILED"):
        return Decision("finished", f"job {seg.job_id} ended {status}")
    if status in WAITING:
        memo.waiting_since = obs.now if memo.waiting_since is None else memo.waiting_since
        waited = obs.now - memo.waiting_since
        if waited >= policy.waiting_limit:
            return Decision("stop", f"job {seg.job_id} has waited {waited:.0f} s to be scheduled ({status}); "
                                    f"connected sites: {', '.join(obs.connected) or 'none'}. Start the missing "
                                    "sites, then run the same command again")
        return Decision("wait", f"job {seg.job_id} {status}: waiting for the server to start it "
                                f"(connected: {', '.join(obs.connected) or 'none'})")
    memo.waiting_since = None
    if memo.progress_at is None:
        memo.progress_at = obs.now
    if obs.server_runs_job is False:
        memo.not_run_since = obs.now if memo.not_run_since is None else memo.not_run_since
        if obs.now - memo.not_run_since >= policy.dead_grace:
            return Decision("end", f"job {seg.job_id} is {status or 'RUNNING'} in NVFlare's job store but the "
                                   f"server has not run it for {obs.now - memo.not_run_since:.0f} s: its server "
                                   "job process is gone (the server restarted: NVFlare 2.9 neither resumes nor "
                                   "ends such a job; or the job is done and NVFlare waits for a vanished site's "
                                   "outcome)")
        return Decision("wait", f"job {seg.job_id}: not in the server's running jobs; checking again")
    memo.not_run_since = None
    progress = obs.progress or {}
    key = (progress.get("rounds_done"), progress.get("current_round"))
    if progress and key != memo.last_progress:
        memo.last_progress, memo.progress_at = key, obs.now
    stalled = obs.now - memo.progress_at
    limit = policy.stall_seconds(state.round_timeout)
    if stalled >= limit:
        return Decision("end", f"job {seg.job_id}: no progress for {stalled:.0f} s (limit {limit:.0f} s)")
    total = int(progress.get("total_rounds") or state.total_rounds)
    done = int(progress.get("rounds_done") or 0)
    if obs.sites_with_job is not None and progress:
        last = progress.get("last_round") or {}
        left_out = {*(last.get("missing") or []), *(last.get("disconnected") or []), *(last.get("failed") or {})}
        # connected again but without the job: its client restarted (a site that crashed in a round, or
        # refused its data, still runs the job and is not counted)
        back = sorted((set(obs.connected) & left_out) - set(obs.sites_with_job))
        left = total - done  # the rounds a new segment would run, the one in flight included
        if back and left >= policy.rejoin_rounds_left:
            return Decision("end", f"{', '.join(back)} connected again but out of job {seg.job_id} (NVFlare "
                                   f"does not redeploy a running job); {left} round(s) left: the next segment "
                                   "includes it")
    return Decision("wait", "")


# ---------------------------------------------------------------------------------------- the admin session


class Session(Protocol):
    def job_status(self, job_id: str) -> str: ...
    def server_jobs(self) -> list[str]: ...
    def connected_sites(self) -> list[str]: ...
    def sites_with_job(self, job_id: str) -> list[str] | None: ...
    def progress(self, job_id: str) -> dict[str, Any] | None: ...
    def submit(self, folder: Path, token: str) -> str: ...
    def abort(self, job_id: str) -> str: ...
    def download(self, job_id: str, dest: Path) -> Path: ...
    def close(self) -> None: ...


class FlareSession:
    """``Session`` over NVFlare's admin API (``nvflare.fuel.flare_api``) with the lead's kit.

    A call whose connection fails closes the session; the next call opens a new one, so a server
    that restarted is reached again as soon as it is back.
    """

    def __init__(self, kit: Path, username: str = "", timeout: float = 10.0) -> None:
        self.kit = Path(kit).resolve()
        if not (self.kit / "startup").is_dir():
            raise StudyError(f"{self.kit}: not an admin startup kit (no startup/ folder)")
        self.username = username or self.kit.name
        self.timeout = timeout
        self._s: Any = None
        self._info: tuple[float, Any] | None = None

    def _session(self) -> Any:
        if self._s is None:
            from nvflare.fuel.flare_api.flare_api import new_secure_session

            self._s = new_secure_session(self.username, str(self.kit), timeout=self.timeout)
        return self._s

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        from nvflare.fuel.flare_api.api_spec import NoConnection, NoReply, SessionClosed

        try:
            return fn(self._session())
        except (NoConnection, NoReply, SessionClosed, ConnectionError, TimeoutError, OSError):
            self.close()  # the next call logs in again: the server may have restarted
            raise

    def close(self) -> None:
        if self._s is not None:
            try:
                self._s.close()
            except Exception:
                pass
            self._s = None

    def job_status(self, job_id: str) -> str:
        return str(self._call(lambda s: s.get_job_meta(job_id)).get("status", ""))

    def _system_info(self) -> Any:
        """``check_status server``, once per look (the jobs and the sites come from the same answer)."""
        now = time.monotonic()
        if self._info is None or now - self._info[0] > 1.0:
            self._info = (now, self._call(lambda s: s.get_system_info()))
        return self._info[1]

    def server_jobs(self) -> list[str]:
        return [str(j.job_id) for j in self._system_info().job_info or []]

    def connected_sites(self) -> list[str]:
        return sorted(str(c.name) for c in self._system_info().client_info or [])

    def sites_with_job(self, job_id: str) -> list[str] | None:
        rows = self._call(lambda s: s.get_client_job_status())
        if not isinstance(rows, list):
            return None
        return sorted({str(r.get("client_name")) for r in rows if isinstance(r, dict) and r.get("job_id") == job_id})

    def progress(self, job_id: str) -> dict[str, Any] | None:
        try:
            stats = self._call(lambda s: s.show_stats(job_id, "server"))
        except Exception:
            return None
        return find_progress(stats)

    def submit(self, folder: Path, token: str) -> str:
        """Submit with a retry-safe token: the same token again returns the job it made, not a new one."""
        from nvflare.fuel.flare_api.api_spec import SubmitTokenConflict

        try:
            return str(self._call(lambda s: s.submit_job(str(folder), submit_token=token)))
        except SubmitTokenConflict as err:
            if err.existing_job_id:
                return str(err.existing_job_id)
            raise

    def abort(self, job_id: str) -> str:
        try:
            self._call(lambda s: s.abort_job(job_id))
            return "abort sent"
        except Exception as err:  # e.g. "Job ... is not running": a dead job the server no longer runs
            return f"abort: {type(err).__name__}: {err}"

    def download(self, job_id: str, dest: Path) -> Path:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(self._call(lambda s: s.download_job_result(job_id, str(dest))))


def find_progress(stats: Any) -> dict[str, Any] | None:
    """The ``STATS_GROUP`` entry anywhere in a ``show_stats`` answer."""
    if isinstance(stats, dict):
        if STATS_GROUP in stats and isinstance(stats[STATS_GROUP], dict):
            return stats[STATS_GROUP]
        for value in stats.values():
            found = find_progress(value)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------- the job folder


def prepare_job(source: Path, folder: Path, study_id: str) -> dict[str, Any]:
    """Copy the job folder ``source`` to ``folder`` with the study's store settings; the round settings.

    The round workflow (``ResilientFedAvg`` or ``ResilientFedOpt``) gets ``study_id`` and
    ``resume_from_store``. Returns ``{"rounds", "round_timeout", "min_sites", "name"}``.
    """
    source = Path(source).resolve()
    if not (source / "meta.json").is_file():
        raise StudyError(f"{source}: not an NVFlare job folder (no meta.json)")
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("__pycache__"))
    found = None
    for config in sorted(folder.glob("*/config/config_fed_server.json")):
        doc = json.loads(config.read_text())
        for wf in doc.get("workflows", []):
            if str(wf.get("path", "")).rsplit(".", 1)[-1] in WORKFLOWS:
                wf.setdefault("args", {}).update(study_id=study_id, resume_from_store=True)
                args = wf["args"]
                found = {"rounds": int(args.get("start_round", 0)) + int(args.get("num_rounds", 5)),
                         "round_timeout": float(args.get("round_timeout", 0)),
                         "min_sites": int(args.get("min_sites", 1))}
                config.write_text(json.dumps(doc, indent=4))
                break
    if found is None:
        raise StudyError(f"{source}: its server runs no fedseg round workflow ({', '.join(WORKFLOWS)}); "
                         "`fedseg study` drives fedseg's FedAvg, FedProx, FedOpt and personalized jobs")
    meta = json.loads((folder / "meta.json").read_text())
    found["name"] = str(meta.get("name") or source.name)
    return found


# ---------------------------------------------------------------------------------------- the supervisor


class Supervisor:
    """Drive one study in ``folder`` with ``session``; ``run()`` returns the final state."""

    def __init__(self, folder: Path, session: Session, *, policy: Policy = Policy(),
                 log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, display: Any = None) -> None:
        self.folder = Path(folder).resolve()
        self.session = session
        self.policy = policy
        self.print = log or (lambda line: print(line, flush=True))
        self.clock = clock
        self.sleep = sleep
        #: the live view (``fedseg.run.study_progress.StudyProgress``: ``update(progress)``); None: a line per round
        self.display = display
        self.state = StudyState.load(self.folder)
        self.memo = Memo()
        self._shown_round = 0

    # -------------------------------------------------------------- creating a study

    @classmethod
    def create(cls, folder: Path, job: Path, *, rounds: int | None = None) -> StudyState:
        """A new study in ``folder`` for the job folder ``job`` (``StudyError`` if the folder has one)."""
        folder = Path(folder).resolve()
        if (folder / STATE_FILE).is_file():
            raise StudyError(f"{folder} already holds a study ({STATE_FILE}); run it again to continue it, "
                             "or choose another folder")
        folder.mkdir(parents=True, exist_ok=True)
        study_id = f"{Path(job).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        settings = prepare_job(Path(job), folder / JOB_COPY, study_id)
        if rounds:
            if rounds < 1:
                raise StudyError("rounds must be >= 1")
            _set_rounds(folder / JOB_COPY, rounds)
            settings["rounds"] = rounds
        state = StudyState(study_id=study_id, source=str(Path(job).resolve()), job_folder=str(folder / JOB_COPY),
                           job_name=settings["name"], total_rounds=settings["rounds"],
                           round_timeout=settings["round_timeout"], min_sites=settings["min_sites"])
        state.save(folder)
        return state

    # -------------------------------------------------------------- logging

    def decision(self, action: str, reason: str) -> None:
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock())), "action": action,
                 "reason": reason, "rounds_done": self.state.rounds_done}
        self.state.decisions = [*self.state.decisions, entry][-100:]
        line = f"[study] {action}: {reason}"
        self.print(line)
        with open(self.folder / LOG_FILE, "a") as f:
            f.write(f"{entry['at']} {line}\n")
        self.state.save(self.folder)

    # -------------------------------------------------------------- the loop

    def run(self) -> StudyState:
        st = self.state
        if st.status != "running":
            self.print(f"[study] {st.study_id} is {st.status}: {st.reason}")
            return st
        self.decision("follow", f"study {st.study_id}: {st.rounds_done}/{st.total_rounds} rounds done, "
                                f"{len(st.segments)} segment(s) so far")
        while st.status == "running":
            seg = st.current
            if seg is None:
                if st.rounds_done >= st.total_rounds and st.final_done:
                    self._finish("completed", f"all {st.total_rounds} rounds done")
                    break
                if st.retries >= self.policy.max_retries:
                    self._finish("stopped", f"{st.retries} segments in a row added no round (last: "
                                            f"{st.segments[-1].reason if st.segments else 'none'}). Check the server's "
                                            "and the sites' logs (`fedseg study status`), fix the cause, then run the "
                                            "same `fedseg study run` command again")
                    break
                self._submit()
                continue
            self._follow(seg)
        return st

    def _submit(self) -> None:
        st = self.state
        pause = self.policy.retry_pause(st.retries)
        if pause:
            self.decision("pause", f"{pause:.0f} s before the next segment ({st.retries} segment(s) in a row "
                                   "added no round)")
            self.sleep(pause)
        # one token per segment: a lead killed after the server took the job and before study.json
        # recorded it submits the same token again when restarted, and gets that job back
        token = f"{st.study_id}.segment-{len(st.segments) + 1}"
        try:
            job_id = self.session.submit(Path(st.job_folder), token)
        except Exception as err:
            st.last_error = f"submit: {type(err).__name__}: {err}"
            st.retries += 1
            self.decision("retry", f"could not submit the next segment ({st.last_error})")
            return
        st.segments.append(Segment(job_id=job_id, submitted_at=self.clock(), rounds_before=st.rounds_done))
        self.memo = Memo()
        what = "first segment" if len(st.segments) == 1 else f"segment {len(st.segments)}"
        self.decision("submit", f"{what}: job {job_id}, continuing after the newest round in the server's store "
                                 f"({st.rounds_done} of {st.total_rounds} done as far as the lead has seen)")

    def observe(self, seg: Segment) -> Observation:
        now = self.clock()
        try:
            status = self.session.job_status(seg.job_id)
            running = self.session.server_jobs()
            connected = self.session.connected_sites()
        except Exception as err:
            return Observation(now=now, reachable=False, error=f"{type(err).__name__}: {err}")
        obs = Observation(now=now, reachable=True, status=status, server_runs_job=seg.job_id in running,
                          connected=connected)
        if status == "RUNNING" and obs.server_runs_job:
            obs.progress = self.session.progress(seg.job_id)
            try:
                obs.sites_with_job = self.session.sites_with_job(seg.job_id)
            except Exception:
                obs.sites_with_job = None
        return obs

    def _follow(self, seg: Segment) -> None:
        obs = self.observe(seg)
        if obs.progress:
            self._show_progress(obs.progress)
            before = self.state.rounds_done
            last = obs.progress.get("last_round") or {}
            if last.get("round"):
                self.state.note_rounds([last])
            # rounds a dead segment completed show up as the next segment's start
            done = max(int(obs.progress.get("rounds_done") or 0), int(obs.progress.get("start_round") or 0))
            self.state.rounds_done = max(self.state.rounds_done, done)
            if self.state.rounds_done > before:
                self.state.retries = 0  # progress: the retries start again
                self.state.save(self.folder)  # a lead restarted now knows these rounds
        d = decide(self.state, seg, obs, self.memo, self.policy)
        if d.action == "wait":
            if d.reason and d.reason != getattr(self, "_last_wait", ""):
                self.decision("wait", d.reason)
            self._last_wait = d.reason
            self.sleep(self.policy.poll)
        elif d.action == "stop":
            self.state.last_error = d.reason
            self._finish("stopped", d.reason)
        elif d.action == "end":
            answer = self.session.abort(seg.job_id)
            self.decision("end", d.reason + f"; ending job {seg.job_id}: " + answer)
            # an abort the server took turns into a final status within seconds; a dead job's never does
            self._end_segment(seg, "ENDED", d.reason, wait_for_end=answer == "abort sent")
        elif d.action == "finished":
            self._end_segment(seg, obs.status or "FINISHED", d.reason)

    def _show_progress(self, progress: dict[str, Any]) -> None:
        if self.display is not None:
            self.display.update(progress)
            return
        last = progress.get("last_round") or {}
        rnd = int(last.get("round") or 0)
        if rnd > self._shown_round:
            self._shown_round = rnd
            parts = [f"answered {', '.join(last.get('answered') or []) or 'none'}"]
            for key in ("missing", "disconnected"):
                if last.get(key):
                    parts.append(f"{key} {', '.join(last[key])}")
            if last.get("failed"):
                parts.append("failed " + ", ".join(f"{s} ({w})" for s, w in last["failed"].items()))
            self.print(f"round {rnd}/{progress.get('total_rounds', self.state.total_rounds)}: {'; '.join(parts)}")

    def _end_segment(self, seg: Segment, status: str, reason: str, wait_for_end: bool = False) -> None:
        st = self.state
        if wait_for_end:  # give an abort a moment to turn into a final status (a dead job never does)
            deadline = self.clock() + 60
            while self.clock() < deadline:
                try:
                    current = self.session.job_status(seg.job_id)
                except Exception:
                    break
                if current.startswith("FINISHED"):
                    status = current
                    break
                self.sleep(2)
        seg.status, seg.ended_at, seg.reason = status, self.clock(), reason
        records: list[dict[str, Any]] = []
        if status.startswith("FINISHED"):
            try:
                path = self.session.download(seg.job_id, self.folder / SEGMENTS)
                seg.download = str(path)
                records = read_study_records(path)
            except Exception as err:
                st.last_error = f"download of job {seg.job_id}: {type(err).__name__}: {err}"
                self.decision("note", f"results of job {seg.job_id} not downloaded ({st.last_error}); the next "
                                      "segment learns the rounds done from the server's store")
        else:
            self.decision("note", f"job {seg.job_id} cannot be downloaded (its server job process is gone); the "
                                  "next segment continues after the last round in the server's store")
        st.note_rounds(records)
        for rec in records:  # rounds that closed between the last look and the segment's end
            self._show_progress({"total_rounds": st.total_rounds, "last_round": rec})
        seg.rounds_after = st.rounds_done
        summary = read_summary(Path(seg.download)) if seg.download else {}
        if summary.get("reason"):
            seg.reason = f"{reason}: {summary['reason']}"
        st.final_done = st.rounds_done >= st.total_rounds and summary.get("status") == "completed"
        st.retries = 0 if st.rounds_done > seg.rounds_before or st.final_done else st.retries + 1
        if not st.final_done:
            st.last_error = seg.reason
        self.decision("segment-end", f"job {seg.job_id} {status}; rounds done {st.rounds_done}/{st.total_rounds}"
                                     + (f" ({seg.reason})" if seg.reason else ""))
        if st.final_done:
            self._finish("completed", f"all {st.total_rounds} rounds done; results in {seg.download}")
        elif st.rounds_done >= st.total_rounds:
            self.decision("continue", "every round is done but the job did not finish its end (cross-site "
                                      "evaluation, personal scores): one more segment, with no round to train")
        else:
            self.decision("continue", f"{st.total_rounds - st.rounds_done} round(s) left: the next segment "
                                      f"continues after the last round in the server's store")

    def _finish(self, status: str, reason: str) -> None:
        self.state.status, self.state.reason = status, reason
        self.decision("study-" + status, reason)


def _set_rounds(folder: Path, rounds: int) -> None:
    """The study's total rounds, on the server and in what the sites are told: a site sizes its
    learning-rate schedule by them and answers no training round past them (``SiteExecutor``). A
    site that approves jobs must approve the changed job again (its fingerprint changed)."""
    for config in folder.glob("*/config/config_fed_server.json"):
        doc = json.loads(config.read_text())
        for wf in doc.get("workflows", []):
            if str(wf.get("path", "")).rsplit(".", 1)[-1] in WORKFLOWS:
                args = wf.setdefault("args", {})
                args["num_rounds"] = rounds - int(args.get("start_round", 0))
        config.write_text(json.dumps(doc, indent=4))
    for config in folder.glob("*/config/config_fed_client.json"):
        doc = json.loads(config.read_text())
        for item in doc.get("executors", []):
            job = item.get("executor", {}).get("args", {}).get("job")
            if isinstance(job, dict) and "study" in job:
                job["study"].setdefault("federation", {})["rounds"] = rounds
        config.write_text(json.dumps(doc, indent=4))


def read_summary(download: Path) -> dict[str, Any]:
    path = Path(download) / "workspace" / "metrics" / "participation_summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_study_records(download: Path) -> list[dict[str, Any]]:
    """The whole study's round records from a downloaded segment (``study_participation.json``), or the
    segment's own ``participation.jsonl``."""
    metrics = Path(download) / "workspace" / "metrics"
    try:
        return list(json.loads((metrics / "study_participation.json").read_text())["rounds"])
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    try:
        return [json.loads(line) for line in (metrics / "participation.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def status_text(state: StudyState, now: float | None = None) -> str:
    """``fedseg study status``: one screen."""
    now = now or time.time()
    lines = [f"study {state.study_id} ({state.job_name}): {state.status}"
             + (f" - {state.reason}" if state.reason else ""),
             f"rounds done: {state.rounds_done}/{state.total_rounds}", "", "segments:"]
    for i, seg in enumerate(state.segments, 1):
        took = (seg.ended_at or now) - seg.submitted_at
        lines.append(f"  {i}. job {seg.job_id}  {seg.status:<22} rounds {seg.rounds_before}->"
                     f"{seg.rounds_after if seg.rounds_after is not None else '?'}  {took / 60:.1f} min"
                     + (f"  {seg.reason}" if seg.reason else ""))
        if seg.download:
            lines.append(f"     results: {seg.download}")
    if not state.segments:
        lines.append("  none yet")
    lines += ["", "sites (rounds answered / missed):"]
    for site, entry in sorted(state.sites.items()):
        missed = entry.get("missed", [])
        lines.append(f"  {site:<16} {len(entry.get('answered', []))} answered"
                     + (f", missed {', '.join(map(str, missed))}" if missed else ""))
    if not state.sites:
        lines.append("  no round recorded yet")
    lines += ["", f"last error: {state.last_error or 'none'}"]
    if state.decisions:
        last = state.decisions[-1]
        lines.append(f"last decision: {last['at']} {last['action']}: {last['reason']}")
    return "\n".join(lines)


__all__ = [
    "Decision",
    "FlareSession",
    "Memo",
    "Observation",
    "Policy",
    "Segment",
    "StudyError",
    "StudyState",
    "Supervisor",
    "decide",
    "prepare_job",
    "read_study_records",
    "status_text",
]
