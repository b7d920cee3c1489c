"""`flower-supernode`, looking for its coordinator's next message sooner while a run is active.

Flower 1.42's SuperNode asks its SuperLink for a message and, when there is none, sleeps 3 s
(`start_client_internal`); it checks every 0.5 s whether its ClientApp has replied. A round with
secure aggregation is ten messages per node, one stage after another, so those waits add seconds
to every round. Here the node asks every 0.2 s for a minute after its last message (the run's
next stage is on its way) and at Flower's 3 s otherwise, so an idle node costs its coordinator no
more than before, and it checks for its warm worker's reply every 50 ms; a message whose content
the SuperLink does not have yet is asked for again within milliseconds, not after 1-2-4 s.
Everything else is Flower's own `flower-supernode`. These waits are internal to Flower: fedsov
pins `flwr==1.42.*`, and tests/test_warm_worker.py checks the lines this replaces.

    python -m client.supernode_loop <flower-supernode arguments>
"""

from __future__ import annotations

import time

from common.flowerproc import ActivityPoll, retry_objects_sooner

IDLE_SLEEP_S, REPLY_WAIT_S = 3, 0.5  # Flower's waits in start_client_internal
ACTIVE_POLL_S, ACTIVE_WINDOW_S, REPLY_POLL_S = 0.2, 60.0, 0.05


class LoopClock:
    """The `time` module as Flower's SuperNode loop sees it, with its two waits shortened."""

    def __init__(self, poll: ActivityPoll):
        self.poll = poll

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP_S:
            seconds = self.poll.interval()
        elif seconds == REPLY_WAIT_S:
            seconds = REPLY_POLL_S
        time.sleep(seconds)


class RecordedTasks:
    """The tasks one `_pull_and_store_message` call creates, so that none is left open when it returns None.

    Flower creates a message's task before it pulls the content. When the run stops meanwhile (a coordinator
    that restarted: its lost run ends once the SuperLink misses its ServerApp), Flower logs "not in RUNNING
    status", returns None, and leaves the task open: the warm worker would claim it and wait about two minutes
    for content that never comes, while the resumed run's messages queue behind it. Finishing the task as
    failed revokes its token, so the worker's pull fails at once. A task Flower finished itself stays as it is.
    """

    def __init__(self, state):
        self.state, self.task_ids = state, []
        create = state.create_task

        def create_and_record(*args, **kwargs):
            task_id = create(*args, **kwargs)
            if task_id is not None:
                self.task_ids.append(task_id)
            return task_id

        state.create_task = create_and_record

    def stop(self) -> None:
        del self.state.create_task  # the instance attribute set above: the class's method shows again

    def finish_orphans(self) -> None:
        from flwr.common.constant import SubStatus

        for task_id in self.task_ids:
            self.state.finish_task(task_id, SubStatus.FAILED, "the run stopped while its message was received")


class PulledMessages:
    """The instruction messages one pull stored, until Flower deletes each with its sent reply.

    Flower pushes, after each pull, every reply the node holds at that moment, and assumes one is the answer to
    the message just pulled. A reply left over from an earlier message (its run stopped while it was received,
    around a coordinator restart) breaks that: it goes out first, ignored by the SuperLink, and the new
    message's reply, ready a moment later, stays in the node until the next pull, which never comes because the
    coordinator is waiting for that very reply. Knowing what the pull stored, the push stage goes on until
    those messages are answered.
    """

    def __init__(self, state):
        self.unanswered: set[str] = set()
        store, delete = state.store_message, state.delete_messages

        def store_and_note(message):
            # Only a pull stores instruction messages; the worker's replies (reply_to set) are not noted.
            object_id = store(message)
            if object_id is not None and not message.metadata.reply_to_message_id:
                self.unanswered.add(message.metadata.message_id)
            return object_id

        def delete_and_note(*, message_ids=None):
            delete(message_ids=message_ids)
            if message_ids is None:
                self.unanswered.clear()
            else:
                self.unanswered.difference_update(message_ids)

        state.store_message, state.delete_messages = store_and_note, delete_and_note

    @classmethod
    def of(cls, state) -> PulledMessages:
        if not isinstance(getattr(state, "fedsov_pulled", None), cls):
            state.fedsov_pulled = cls(state)
        return state.fedsov_pulled


def patch_supernode_loop() -> ActivityPoll:
    """Shorten the waits of Flower's SuperNode loop in this process; every received message marks activity."""
    from flwr.supernode import start_client_internal as loop

    poll = ActivityPoll(ACTIVE_POLL_S, IDLE_SLEEP_S, ACTIVE_WINDOW_S)
    pull = loop._pull_and_store_message

    push = loop._push_messages

    def pull_and_note(*args, **kwargs):
        created, pulled = RecordedTasks(kwargs["state"]), PulledMessages.of(kwargs["state"])
        pulled.unanswered.clear()  # only this pull's messages hold the push stage
        try:
            run_id = pull(*args, **kwargs)
        finally:
            created.stop()
        if run_id is not None:
            poll.active()
        else:
            created.finish_orphans()
            pulled.unanswered.clear()  # Flower skips the push stage
        return run_id

    def push_until_answered(*args, **kwargs):
        push(*args, **kwargs)
        pulled = PulledMessages.of(kwargs["state"])
        while pulled.unanswered:  # what went out was an older reply: wait for this message's own and send it
            push(*args, **kwargs)

    loop._pull_and_store_message = pull_and_note
    loop._push_messages = push_until_answered
    loop.time = LoopClock(poll)
    retry_objects_sooner(loop)
    announce_heartbeats_sooner()
    return poll


# A node says it will beat every HEARTBEAT_S; the SuperLink counts it gone after two missed intervals.
HEARTBEAT_S = 15


def announce_heartbeats_sooner() -> None:
    """This SuperNode beats every ~8 s and tells its SuperLink so, where Flower beats every ~20 s and announces
    30 s: a node that dies is known to be gone after ~30 s instead of ~60 s, so that a round, its evaluation and
    the audit stop waiting on it that much sooner. One small request per node every 8 s costs nothing that
    matters. (Flower's constants, imported by name into these two modules; tests/test_warm_worker.py.)"""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S  # the sender's pace: (interval - 5 s) x 0.7-0.9
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S  # what the node announces


def main() -> None:
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    patch_supernode_loop()
    update_console_handler(timestamps=True, colored=False)  # the log is a file: when, not colours
    flower_supernode()


if __name__ == "__main__":
    main()
