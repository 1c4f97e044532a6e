"""procrastinate's job manager, made to ride out a database connection dropped at the wrong moment.

Two of procrastinate's queries leave a worker broken for good when they fail once, with nothing in the log
that says so:

- the heartbeat: its task ends at the first error and nothing notices (procrastinate 3.10 stops watching its
  side tasks once the periodic deferrer, with no periodic task to defer, has returned: upstream issue #1597).
  The worker then runs on without a heartbeat, and `--stalled-after` later every sync it runs counts as
  stalled and is started again elsewhere while it still runs;
- recording a job's end: the job stays `doing` under a worker whose heartbeat goes on, so it never counts as
  stalled, and its lock holds back every later sync of its connection while the worker's other connections
  go on syncing.

Here a failed heartbeat is logged and sent again at the next beat, and an end that could not be recorded is
kept and recorded at the schedule loop's next tick (runner/engine/schedule.py), once the database answers.
"""
from __future__ import annotations

import psycopg
from loguru import logger
from procrastinate import exceptions, jobs, manager


class JobManager(manager.JobManager):
    def __init__(self, connector) -> None:
        super().__init__(connector)
        # Ends not recorded yet, by job id: (status, delete the job, its connection)
        self.unrecorded: dict[int, tuple[jobs.Status, bool, str]] = {}

    async def update_heartbeat(self, worker_id: int) -> None:
        try:
            await super().update_heartbeat(worker_id)
        except exceptions.ConnectorException as exc:
            logger.warning("cannot record this worker's heartbeat ({}); trying again at the next beat", _why(exc))

    async def finish_job(self, job: jobs.Job, status: jobs.Status, delete_job: bool) -> None:
        try:
            await super().finish_job(job=job, status=status, delete_job=delete_job)
        except exceptions.ConnectorException as exc:
            assert job.id is not None
            connection = str(job.task_kwargs.get("connection", job.task_name))
            if _changed_meanwhile(exc):
                _say_changed(connection)
                return
            self.unrecorded[job.id] = (status, delete_job, connection)
            logger.warning("the end of {}'s sync was not recorded in the job queue ({}); recorded at the next "
                           "tick the database answers, and its next sync waits until then", connection, _why(exc))

    async def record_unrecorded(self) -> None:
        """Record the ends that could not be recorded when their syncs ended; raises ConnectorException while
        the database is still away (the rest wait for the next call)."""
        for job_id, (status, delete_job, connection) in list(self.unrecorded.items()):
            try:
                await self.finish_job_by_id_async(job_id=job_id, status=status, delete_job=delete_job)
            except exceptions.ConnectorException as exc:
                if not _changed_meanwhile(exc):
                    raise
                _say_changed(connection)
            else:
                logger.warning("recorded the end of {}'s sync; its next syncs run again", connection)
            del self.unrecorded[job_id]


def _changed_meanwhile(exc: exceptions.ConnectorException) -> bool:
    """Whether the job was no longer `doing` when its end was recorded: recorded already (the reply lost with
    the connection), or taken over by another worker while this one's heartbeat was late."""
    return isinstance(exc.__cause__, psycopg.errors.RaiseException)


def _say_changed(connection: str) -> None:
    logger.warning("{}'s sync job had left the `doing` state already (its end recorded before the connection "
                   "dropped, or the job handed to another worker while this worker's heartbeat was late); "
                   "nothing more to record", connection)


def _why(exc: exceptions.ConnectorException) -> str:
    return str(exc.__cause__ or exc).strip()
