"""How the driver, the evaluation and the learner group read a failed Ray call: its headline, and whether it
means a worker (or the node holding its objects) is gone, which is retried, rather than a bug, which is raised."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The headline of an error (Ray's carry a traceback after it), for messages that name it."""
    return next(iter(str(error).splitlines()), "") or type(error).__name__


def lost_worker(error: BaseException) -> bool:
    """A worker died (Ray restarts it) or an object went with its node: the error of work that can be retried
    elsewhere or later, not a bug."""
    import ray  # here, not at the top: the plain classes that use this module import without Ray

    lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
    return isinstance(error, lost) or (isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, lost))
