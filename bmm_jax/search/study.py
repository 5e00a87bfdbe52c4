"""The Vizier study of a search, persisted in an SQLite datastore inside the run directory.

The study is Vizier's own: an in-process ``VizierServicer`` whose datastore is
``sqlite:///<run_dir>/vizier.db`` (Vizier's ``SQLDataStore``, one committed transaction per
write), so any Vizier client can open it afterwards. The datastore is the source of truth:

* a trial is created (``REQUESTED``) and marked ``ACTIVE`` *before* it is evaluated, and completed
  with its measurement right after; a process killed with ``kill -9`` therefore leaves every
  finished trial completed and at most one ``ACTIVE`` trial, which the next run evaluates once
  (same id, same parameters) instead of asking for a new point;
* study-level facts (the exact anchor's validation score, the search-space fingerprint) live in the
  study metadata, namespace ``bmm_jax``.

Notes. We never call the service's ``SuggestTrials``: it would rebuild a designer per call, and a
process killed inside it leaves a suggestion operation that never completes and that the next
``SuggestTrials`` waits on forever. Trials are activated directly in the datastore (exactly what
``SuggestTrials`` does with ``REQUESTED`` trials). The servicer is built with a placeholder Pythia
service, because Vizier's default one switches ``jax_enable_x64`` on globally at construction.
A ``fcntl`` lock on ``<run_dir>/.search.lock`` stops two live processes from driving one study;
the kernel releases it when a process dies, so a killed search can be resumed at once.

A study is checked before anything is written: a damaged ``vizier.db`` (truncated, garbage) raises
:class:`StudyError` naming the file, and a missing or empty ``vizier.db`` next to the reports of an
earlier search (``trials.json``, ``best.json``) is refused rather than silently starting a new
study over them.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import urllib.parse
from typing import Any, Mapping, NamedTuple

NAMESPACE = "bmm_jax"
METRIC = "objective"
CLIENT_ID = "bmm_jax"
OWNER = "bmm_jax"
DB_NAME = "vizier.db"
# reports of a finished search (bmm_jax.search.reports): their presence means the study held trials
RESULT_FILES = ("trials.json", "trials.csv", "best.json")


class StudyError(ValueError):
    """A run directory whose study cannot be used: a damaged or missing ``vizier.db``, or a study
    of another search. The message names the file and what to do."""


class RunDirInUse(RuntimeError):
    """Another live process drives the study of this run directory."""


def check_database(path: str) -> None:
    """Raise :class:`StudyError` naming ``path`` unless it is an SQLite database that passes
    ``PRAGMA quick_check`` (a hot journal left by a killed writer is rolled back, as any opener
    would). The caller holds the run directory's lock."""
    run_dir = os.path.dirname(path) or "."
    advice = (f"its trials cannot be resumed: use a new run directory (or move {run_dir} aside), or "
              "restore vizier.db from a copy")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise StudyError(f"search study {path} cannot be read ({e.strerror}); {advice}") from None
    if head != b"SQLite format 3\x00":
        raise StudyError(f"search study {path} is not an SQLite database (damaged or overwritten); {advice}")
    try:
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
        con = sqlite3.connect(uri, uri=True, timeout=30)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise StudyError(f"search study {path} is damaged ({e}); {advice}") from None
    if rows != [("ok",)]:
        raise StudyError(f"search study {path} is damaged ({'; '.join(str(r[0]) for r in rows[:3])}); {advice}")


def check_run_dir(run_dir: str) -> None:
    """Checks of a run directory before a study is opened in it (nothing is written).

    Raises:
      StudyError: ``vizier.db`` is damaged, or it is missing / empty while reports of an earlier
        search (:data:`RESULT_FILES`) are there.
    """
    path = os.path.join(run_dir, DB_NAME)
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size:
        check_database(path)
        return
    if os.path.lexists(path) and size is None:
        raise StudyError(f"search study {path} is not a file; move it aside or use a new run directory")
    results = [f for f in RESULT_FILES if os.path.exists(os.path.join(run_dir, f))]
    if results:
        state = "is empty" if size == 0 else "is missing"
        raise StudyError(
            f"search study {path} {state}, but {run_dir} holds the reports of an earlier search "
            f"({', '.join(results)}): refusing to start a new study over them. Restore vizier.db, or move "
            f"{', '.join(results)} aside (or use a new run directory) to start a new search")


class TrialRecord(NamedTuple):
    """One trial of the study as plain Python data.

    Attributes:
      id: Vizier trial id (1, 2, ...; the exact-anchor evaluation is reported as id 0).
      state: ``"COMPLETED" | "INFEASIBLE" | "ACTIVE" | "REQUESTED"``.
      point: ``{parameter name: value}``.
      value: the objective (``None`` unless completed).
      metrics: extra metrics of the final measurement (per-task accuracies, ``acc/<task>``).
      seconds: wall time of the evaluation (params + objective).
      source: ``"seed:anchor"``, ``"seed:default"``, ``"designer"``, ``"fallback: ..."``, ``"anchor"``.
      infeasible_reason: why an infeasible trial is infeasible.
      suggest_seconds: wall time the designer took to suggest this point.
    """
    id: int
    state: str
    point: dict
    value: float | None
    metrics: dict
    seconds: float | None
    source: str
    infeasible_reason: str | None = None
    suggest_seconds: float | None = None


class _NoPythia:
    """Placeholder: this study never asks the service for suggestions."""

    def Suggest(self, *a, **k):  # noqa: N802 - Vizier's RPC name
        raise RuntimeError("bmm_jax studies get suggestions from an in-RAM designer, not the service")

    def EarlyStop(self, *a, **k):  # noqa: N802
        raise RuntimeError("bmm_jax studies do not use early stopping")


class SQLiteStudy:
    """A Vizier study in ``<run_dir>/vizier.db``, created or reopened.

    Args:
      run_dir: the run directory (created if missing).
      problem: the ``vz.ProblemStatement`` (used when the study is created).
      study_id: the study's display name inside the datastore.
      fingerprint: a string identifying the search; reopening a study created with a different
        fingerprint raises ``ValueError`` (a run directory holds one search).

    Raises:
      RunDirInUse: another live process holds this run directory (a ``RuntimeError``).
      StudyError: a damaged ``vizier.db``, a missing one beside an earlier search's reports, or a
        study of another search (a ``ValueError`` naming the file; see :func:`check_run_dir`).
    """

    def __init__(self, run_dir: str, problem, *, study_id: str = "bmm-search", fingerprint: str = ""):
        from vizier._src.service import resources, study_pb2, vizier_client, vizier_service
        from vizier._src.service import vizier_service_pb2
        from vizier.service import pyvizier as svz

        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, DB_NAME)
        self._servicer = None
        self._lock = open(os.path.join(run_dir, ".search.lock"), "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RunDirInUse(f"run directory {run_dir!r} is in use by another live search process") from None
        try:
            check_run_dir(run_dir)
            self._servicer = vizier_service.VizierServicer(
                database_url=f"sqlite:///{os.path.abspath(self.path)}", default_pythia_service=_NoPythia())
            config = svz.StudyConfig.from_problem(problem)
            request = vizier_service_pb2.CreateStudyRequest(
                parent=resources.OwnerResource(OWNER).name,
                study=study_pb2.Study(display_name=study_id, study_spec=config.to_proto()))
            study = self._servicer.CreateStudy(request)  # creates, or loads the one with this name
            self.resource_name = study.name
            self._client = vizier_client.VizierClient(study.name, CLIENT_ID, self._servicer)
            old = self.get_meta("fingerprint")
        except StudyError:
            self.close()
            raise
        except Exception as e:
            self.close()
            if _is_database_error(e):
                raise StudyError(f"search study {self.path} cannot be opened ({_first_line(e)}); use a new "
                                 f"run directory (or move {run_dir} aside), or restore vizier.db from a "
                                 "copy") from None
            raise
        if old is None:
            self.set_meta("fingerprint", fingerprint)
        elif old != fingerprint:
            self.close()
            raise StudyError(
                f"run directory {run_dir!r} already holds a study with a different search space or "
                f"objective; use a new run directory (stored: {old[:300]}...; requested: "
                f"{fingerprint[:300]}...)")

    # ----------------------------------------------------------------- metadata
    def get_meta(self, key: str) -> str | None:
        md = self._client.get_study_config().metadata.ns(NAMESPACE)
        return md.get(key)

    def set_meta(self, key: str, value: str) -> None:
        from vizier import pyvizier as vz
        md = vz.Metadata()
        md.ns(NAMESPACE)[key] = str(value)
        self._client.update_metadata(vz.MetadataDelta(on_study=md))

    # ----------------------------------------------------------------- trials
    def vz_trials(self) -> list:
        """All ``vz.Trial`` of the study, by id."""
        return sorted(self._client.list_trials(), key=lambda t: t.id)

    def records(self) -> list[TrialRecord]:
        return [to_record(t) for t in self.vz_trials()]

    def add(self, point: Mapping[str, float], source: str, suggest_seconds: float | None = None) -> int:
        """Create a trial at ``point`` and mark it ``ACTIVE``; returns its id."""
        from vizier import pyvizier as vz
        md = vz.Metadata()
        md.ns(NAMESPACE)["source"] = source
        if suggest_seconds is not None:
            md.ns(NAMESPACE)["suggest_seconds"] = repr(float(suggest_seconds))
        trial = self._client.add_trial(vz.Trial(parameters=dict(point), metadata=md))
        self.activate(trial.id)
        return int(trial.id)

    def activate(self, trial_id: int) -> None:
        """``REQUESTED`` -> ``ACTIVE`` (no-op for an ``ACTIVE`` trial)."""
        from vizier._src.service import resources, study_pb2
        store = self._servicer.datastore
        name = resources.StudyResource.from_name(self.resource_name).trial_resource(str(trial_id)).name
        proto = store.get_trial(name)
        if proto.state == study_pb2.Trial.State.REQUESTED:
            proto.state = study_pb2.Trial.State.ACTIVE
            proto.client_id = CLIENT_ID
            store.update_trial(proto)

    def complete(self, trial_id: int, value: float, metrics: Mapping[str, float] | None = None,
                 seconds: float | None = None):
        """Record a finite objective ``value`` (plus extra ``metrics``) and complete the trial."""
        from vizier import pyvizier as vz
        m = {METRIC: float(value)}
        for k, v in (metrics or {}).items():
            m[str(k)] = float(v)
        meas = vz.Measurement(metrics=m, elapsed_secs=float(seconds or 0.0))
        return self._client.complete_trial(int(trial_id), meas)

    def infeasible(self, trial_id: int, reason: str, seconds: float | None = None):
        """Complete the trial as infeasible (e.g. a non-finite objective)."""
        return self._client.complete_trial(int(trial_id), infeasibility_reason=str(reason))

    def close(self) -> None:
        if self._servicer is None:
            self._release()
            return
        try:
            engine = getattr(getattr(self._servicer, "datastore", None), "_engine", None)
            conn = getattr(getattr(self._servicer, "datastore", None), "_connection", None)
            if conn is not None:
                conn.close()
            if engine is not None:
                engine.dispose()
        except Exception:  # pragma: no cover - best effort
            pass
        finally:
            self._release()

    def _release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_database_error(e: BaseException) -> bool:
    if isinstance(e, sqlite3.Error):
        return True
    try:
        import sqlalchemy.exc
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, sqlalchemy.exc.DatabaseError)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def to_record(t) -> TrialRecord:
    """``vz.Trial`` -> :class:`TrialRecord`."""
    from vizier import pyvizier as vz
    point = {k: float(v.value) for k, v in t.parameters.items()}
    md = t.metadata.ns(NAMESPACE)
    source = md.get("source", "unknown")
    sug = md.get("suggest_seconds")
    value, metrics, seconds, reason = None, {}, None, None
    if t.status == vz.TrialStatus.COMPLETED:
        if t.infeasible:
            state, reason = "INFEASIBLE", t.infeasibility_reason
        else:
            state = "COMPLETED"
            fm = t.final_measurement
            value = float(fm.metrics[METRIC].value)
            metrics = {k: float(m.value) for k, m in fm.metrics.items() if k != METRIC}
            seconds = float(fm.elapsed_secs)
    elif t.status == vz.TrialStatus.REQUESTED:
        state = "REQUESTED"
    else:
        state = "ACTIVE"
    return TrialRecord(int(t.id), state, point, value, metrics, seconds, source, reason,
                       None if sug is None else float(sug))


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
