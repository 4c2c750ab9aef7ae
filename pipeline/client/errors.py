"""What a failed submit hands back: the exact batch it sent, so sending it again is safe."""

from __future__ import annotations

from pipeline.runtime.errors import RedisUnavailable

__all__ = ["SubmitFailed"]


class SubmitFailed(RedisUnavailable):
    """A `submit`/`submit_many` that did not (or may not have) put its tasks in.

    Attributes:
        tasks: the tasks as sent, as wire fields with each one's `id` (given or assigned);
            `client.submit_many(exc.tasks)` sends exactly the same batch again.
        ids: their task ids, in order.
        maybe_added: False when Redis was not reached or refused the batch (none of the
            tasks was added); True when the connection failed with the batch in flight (all
            or none of them were added, and the client cannot tell which), or when Redis ran
            the transaction but failed some of its XADDs (some were added). Sending `tasks`
            again is safe either way: a task that is already in is dropped by the pipeline
            (same id, same request: no second call, no second result).
    """

    def __init__(self, message: str, tasks: list[dict[str, str]], maybe_added: bool) -> None:
        super().__init__(message)
        self.tasks = tasks
        self.ids = [fields["id"] for fields in tasks]
        self.maybe_added = maybe_added
