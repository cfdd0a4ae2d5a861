"""Cloud preemption notices: where each cloud publishes them and how an answer of its
instance metadata service becomes a `Notice`. Pure: no I/O, the time is passed in.

    settings = PreemptionSettings.from_config(config)   # preemption, metadata_url, …
    notice = parse_aws(404, b"", now_wall)               # None: no notice
    notice = parse_aws(200, b'{"action": "terminate", "time": "…Z"}', now_wall)
    notice.deadline_wall                                 # when the instance goes away

`nkat.supervisor.preemption_watch.PreemptionWatch` polls the service in a thread and
hands the shell the first notice. docs/preemption.md cites each cloud's documentation.

- aws: IMDSv2. ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``
  gives a session token; ``GET /latest/meta-data/spot/instance-action`` with
  ``X-aws-ec2-metadata-token`` answers 404 (no notice) or ``{"action": "stop" |
  "terminate" | "hibernate", "time": "2017-09-18T08:22:00Z"}``; 401 means the token
  expired or is invalid: get a new one.
- gcp: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``
  answers ``TRUE`` or ``FALSE``; the instance stops about 30 s after it turns TRUE.
  ``?wait_for_change=true&last_etag=…`` blocks until it changes.
- azure: ``GET /metadata/scheduledevents?api-version=2020-07-01`` with ``Metadata: true``
  answers ``{"DocumentIncarnation": n, "Events": [...]}``; an event of ``EventType``
  ``Preempt`` (a Spot eviction, at least 30 s ahead) or ``Terminate`` (the VM is being
  deleted) whose ``Resources`` name this VM is a notice; ``NotBefore`` (RFC 1123, blank
  once started) is the deadline.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

from nkat.protocol.settings import Role, setting
from nkat.supervisor.policies.settings import FromConfig

CLOUDS = ("aws", "gcp", "azure")

# Each cloud's metadata service (metadata_url replaces these for tests).
DEFAULT_BASE = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}

AWS_TOKEN_PATH = "/latest/api/token"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
AWS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
AWS_MAX_TTL_S = 21600  # six hours, the longest token IMDSv2 grants

GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCP_HEADERS = {"Metadata-Flavor": "Google"}
GCP_NOTICE_S = 30.0  # between the preemption notice and the hard stop

AZURE_API_VERSION = "2020-07-01"
AZURE_EVENTS_PATH = f"/metadata/scheduledevents?api-version={AZURE_API_VERSION}"
AZURE_NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
AZURE_HEADERS = {"Metadata": "true"}
AZURE_NOTICE_TYPES = ("Preempt", "Terminate")


class MetadataError(Exception):
    """An answer that is not one of the documented ones (the message quotes it)."""


_SUP = Role.SUPERVISOR


@dataclasses.dataclass(frozen=True)
class PreemptionSettings(FromConfig):
    """Field names are the config keys.

    preemption: which cloud's notices to watch for: "off", "aws", "gcp" or "azure".
    metadata_url: the metadata service's base URL (null: the cloud's own); for tests.
    preemption_poll_interval: seconds between polls (GCP waits for a change instead).
    """

    preemption: str = setting(
        "off", "watch this cloud's metadata service for a spot/preemption notice", role=_SUP,
        choices=("off", *CLOUDS))
    metadata_url: str | None = setting(
        None, "base URL of the instance metadata service (null: the cloud's own); for tests",
        role=_SUP)
    preemption_poll_interval: float = setting(
        1.0, "seconds between metadata polls (GCP waits for a change instead)", role=_SUP,
        low=0.05, high=60)

    def __post_init__(self) -> None:
        if self.preemption not in ("off", *CLOUDS):
            raise ValueError(f"preemption must be one of off, {', '.join(CLOUDS)}, "
                             f"not {self.preemption!r}")
        if self.metadata_url is not None and not self.metadata_url.startswith("http://"):
            raise ValueError("metadata_url must start with http:// (metadata services are "
                             f"plain HTTP on a link-local address), not {self.metadata_url!r}")
        if not 0.05 <= self.preemption_poll_interval <= 60:
            raise ValueError("preemption_poll_interval must be in [0.05, 60] seconds, "
                             f"not {self.preemption_poll_interval}")

    @property
    def enabled(self) -> bool:
        return self.preemption != "off"

    @property
    def base_url(self) -> str:
        return (self.metadata_url or DEFAULT_BASE[self.preemption]).rstrip("/")


@dataclasses.dataclass(frozen=True)
class Notice:
    """The cloud will take this instance away.

    deadline_wall: when (Unix time), as the cloud says or documents; None when the answer
    named no time. seen_wall / seen_mono: when the poller saw the notice (wall clock and
    time.monotonic), so the shell can turn the deadline into its own clock.
    detail: the cloud's words, for the log (action, event id, type, status).
    """

    cloud: str
    deadline_wall: float | None
    detail: str
    seen_wall: float
    seen_mono: float

    def seconds_left(self, now_wall: float) -> float | None:
        return None if self.deadline_wall is None else self.deadline_wall - now_wall


def parse_aws(status: int, body: bytes, now_wall: float, now_mono: float) -> Notice | None:
    """The answer to ``GET spot/instance-action``. 404 is "no notice"."""
    if status == 404:
        return None
    if status != 200:
        raise MetadataError(f"spot/instance-action answered HTTP {status}: {_quote(body)}")
    try:
        data = json.loads(body)
        action = str(data["action"])
        deadline = _iso_to_wall(str(data["time"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise MetadataError(f"spot/instance-action is not {{action, time}}: {_quote(body)} "
                            f"({exc})") from None
    return Notice("aws", deadline, f"action={action} time={data['time']}", now_wall, now_mono)


def parse_gcp(status: int, body: bytes, now_wall: float, now_mono: float) -> Notice | None:
    """The answer to ``GET instance/preempted``: TRUE or FALSE."""
    if status != 200:
        raise MetadataError(f"instance/preempted answered HTTP {status}: {_quote(body)}")
    value = body.decode(errors="replace").strip().upper()
    if value == "FALSE":
        return None
    if value != "TRUE":
        raise MetadataError(f"instance/preempted is neither TRUE nor FALSE: {_quote(body)}")
    return Notice("gcp", now_wall + GCP_NOTICE_S,
                  f"preempted=TRUE (the VM stops about {GCP_NOTICE_S:g} s after)",
                  now_wall, now_mono)


def parse_azure(status: int, body: bytes, now_wall: float, now_mono: float,
                vm_name: str | None) -> Notice | None:
    """The answer to ``GET scheduledevents``: a notice for the soonest Preempt or
    Terminate event that names ``vm_name`` (any VM when the name is unknown)."""
    if status != 200:
        raise MetadataError(f"scheduledevents answered HTTP {status}: {_quote(body)}")
    try:
        data = json.loads(body)
        events: list[dict[str, Any]] = list(data["Events"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MetadataError(f"scheduledevents has no Events list: {_quote(body)} ({exc})"
                            ) from None
    found: list[tuple[float, str]] = []
    for event in events:
        if not isinstance(event, dict) or event.get("EventType") not in AZURE_NOTICE_TYPES:
            continue
        resources = event.get("Resources") or []
        if vm_name is not None and resources and vm_name not in resources:
            continue  # an event for another VM of the same availability set
        not_before = str(event.get("NotBefore") or "")
        # Blank NotBefore: the event has started (it is shown blank from then on).
        deadline = _rfc1123_to_wall(not_before) if not_before else now_wall
        found.append((deadline, f"{event.get('EventType')} {event.get('EventId')} "
                                f"{event.get('EventStatus')} NotBefore={not_before or '-'}"))
    if not found:
        return None
    deadline, detail = min(found)
    return Notice("azure", deadline, detail, now_wall, now_mono)


def _iso_to_wall(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _rfc1123_to_wall(text: str) -> float:
    # Azure writes "Mon, 19 Sep 2016 18:29:47 GMT"; Python parses English names whatever
    # the locale, as the process never calls setlocale.
    try:
        when = datetime.datetime.strptime(text.strip(), "%a, %d %b %Y %H:%M:%S GMT")
        return when.replace(tzinfo=datetime.UTC).timestamp()
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"NotBefore is not an RFC 1123 date: {text!r}") from exc


def _quote(body: bytes, limit: int = 200) -> str:
    text = body.decode(errors="replace").strip()
    return repr(text if len(text) <= limit else text[:limit] + "…")
