"""What the supervisor tells a person far away: the events worth a notification, the one
JSON document each becomes, and the crash-loop alarm. Pure: no I/O, times are passed in.

    settings = NotifySettings.from_config(config)    # notify_url, notify_command, …
    event = NotifyEvent("run.gave_up", run_id, {"reason": "…", "ckpt_seq": 7}, t_wall)
    body = payload(event, host="gpu-box")            # the JSON document, for every receiver
    headers = http_headers(event)                    # what ntfy reads; others ignore them

`nkat.supervisor.notifier.Notifier` delivers them (a background thread, retries) and is
the only part that does I/O. docs/notify.md documents the document and the receivers.

One document serves three kinds of receiver (see docs/notify.md for the sources):

- Slack (and Mattermost) incoming webhooks read ``text``.
- ntfy, posted to a topic URL, reads the ``X-Title``/``X-Priority``/``X-Tags`` headers and,
  with ``X-Template: yes`` (ntfy 2.10 and later), renders ``X-Message: {{.message}}`` from
  the body: the notification shows ``message``, not raw JSON.
- Anything else gets a stable object: ``schema``, ``event``, ``run_id``, ``host``, ``ts``,
  ``t_wall``, ``title``, ``message``, ``priority`` (1..5, ntfy's scale), ``tags`` and the
  event's own ``fields``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from nkat.protocol.settings import Role, setting
from nkat.supervisor.policies.settings import FromConfig

SCHEMA = "nkat-supervise.notify/1"


_SUP = Role.SUPERVISOR


@dataclasses.dataclass(frozen=True)
class NotifySettings(FromConfig):
    """Where notifications go; field names are the config keys.

    notify_url: POST each event's JSON document here (null: no webhook).
    notify_command: run this command per event, the document on its stdin; split like a
        shell would (shlex) but not run by one (null: none).
    notify_timeout: seconds one delivery attempt may take (connect, send, answer; or the
        command's run) before it counts as failed and is retried.
    """

    notify_url: str | None = setting(
        None, "POST a JSON document per event (run end, kill_failed, thermal emergency, crash "
        "loop, WAL write failure) to this http(s) URL: an ntfy topic, a Slack webhook, ...",
        role=_SUP)
    notify_command: str | None = setting(
        None, "run this command per event with the JSON document on stdin", role=_SUP)
    notify_timeout: float = setting(
        10.0, "seconds one notification attempt may take before it is retried", role=_SUP,
        low=0.1, high=600)

    def __post_init__(self) -> None:
        if self.notify_url is not None and not self.notify_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                f"notify_url must start with http:// or https://, not {self.notify_url!r}"
            )
        if self.notify_command is not None and not self.notify_command.strip():
            raise ValueError("notify_command is empty: give a command, or null for none")
        if not 0 < self.notify_timeout <= 600:
            raise ValueError(
                f"notify_timeout must be in (0, 600] seconds, not {self.notify_timeout}"
            )

    @property
    def enabled(self) -> bool:
        return self.notify_url is not None or self.notify_command is not None


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one event kind is shown: ntfy priority (1 min .. 5 max), tags, a title."""

    priority: int
    tags: tuple[str, ...]
    title: str
    final: bool = False  # the run ends with it: delivered before the supervisor exits


# The events that notify, by their log event names (README's event table). Tags that
# name an emoji are shown as one by ntfy; the others are plain tags.
KINDS: Mapping[str, Kind] = {
    "run.completed": Kind(3, ("white_check_mark",), "run completed", final=True),
    "run.gave_up": Kind(4, ("x",), "run gave up", final=True),
    "worker.kill_failed": Kind(5, ("rotating_light",), "worker survived SIGKILL"),
    "thermal.kill_now": Kind(5, ("fire",), "thermal emergency: worker killed"),
    "worker.crash_loop": Kind(4, ("warning",), "worker is crash-looping"),
    "wal.write_failed": Kind(5, ("floppy_disk",), "WAL write failed"),
}


class UnknownEvent(ValueError):
    """An event kind that is not in KINDS (a programming error in the caller)."""


@dataclasses.dataclass(frozen=True)
class NotifyEvent:
    """One thing to tell. kind: a key of KINDS. fields: JSON-able details (reason, …)."""

    kind: str
    run_id: str
    fields: Mapping[str, Any]
    t_wall: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnknownEvent(f"no notification kind {self.kind!r}; known: {', '.join(KINDS)}")

    @property
    def final(self) -> bool:
        return KINDS[self.kind].final


def title(event: NotifyEvent) -> str:
    return f"nkat-supervise: {KINDS[event.kind].title} ({event.run_id})"


def message(event: NotifyEvent, host: str) -> str:
    """One paragraph for a phone screen: what happened, on which host, the key fields."""
    details = ", ".join(f"{key}={_short(value)}" for key, value in event.fields.items())
    text = f"{KINDS[event.kind].title} on {host}, run {event.run_id}"
    return f"{text}: {details}" if details else text


def payload(event: NotifyEvent, host: str) -> dict[str, Any]:
    """The JSON document posted to notify_url and written to notify_command's stdin."""
    kind = KINDS[event.kind]
    head, body = title(event), message(event, host)
    return {
        "schema": SCHEMA,
        "event": event.kind,
        "run_id": event.run_id,
        "host": host,
        "ts": _iso(event.t_wall),
        "t_wall": event.t_wall,
        "title": head,
        "message": body,
        "text": f"*{head}*\n{body}",  # Slack/Mattermost: bold title, then the message
        "priority": kind.priority,
        "tags": [*kind.tags, "nkat-supervise", event.kind],
        "fields": dict(event.fields),
    }


def http_headers(event: NotifyEvent) -> dict[str, str]:
    """Headers for the POST. The X-* ones are ntfy's; other receivers ignore them."""
    kind = KINDS[event.kind]
    return {
        "Content-Type": "application/json",
        "User-Agent": "nkat-supervise",
        "X-Template": "yes",
        # Under X-Template the title and message are Go templates over the JSON body:
        # taking both from the body keeps non-ASCII text out of the headers.
        "X-Title": "{{.title}}",
        "X-Message": "{{.message}}",
        "X-Priority": str(kind.priority),
        "X-Tags": ",".join([*kind.tags, "nkat-supervise"]),
    }


class CrashLoopAlarm:
    """Raises ``worker.crash_loop`` once when crash restarts pile up without progress.

    Feed it every crash restart (``crashed(now)``) and every durable checkpoint
    (``progressed()``). It fires on the ``alarm_at``-th crash within ``window`` seconds
    with no durable checkpoint between them, then stays quiet until a checkpoint is made
    durable again: a run that crashes, recovers and later crashes again alarms again.
    The restart policy's own give-up (``run.gave_up``) is a separate, final event; this
    one says the run is heading there while it still runs.
    """

    def __init__(self, window: float, alarm_at: int = 2) -> None:
        if alarm_at < 1:
            raise ValueError(f"alarm_at must be at least 1, not {alarm_at}")
        self.window = window
        self.alarm_at = alarm_at
        self._crashes: list[float] = []
        self._fired = False

    def crashed(self, now: float) -> int | None:
        """Count one crash restart at monotonic ``now``; the number of crashes in the
        window when the alarm fires, else None."""
        self._crashes = [t for t in self._crashes if now - t < self.window]
        self._crashes.append(now)
        if self._fired or len(self._crashes) < self.alarm_at:
            return None
        self._fired = True
        return len(self._crashes)

    def progressed(self) -> None:
        """A durable checkpoint: past crashes are forgiven and the alarm is re-armed."""
        self._crashes.clear()
        self._fired = False


def _short(value: Any, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _iso(t_wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(t_wall, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
