"""nkat.protocol: the shared language of supervisor and worker.

The wire between the supervisor and its workers, and nothing else: the messages
(``nkat.protocol.messages``), the worker's exit codes (``nkat.protocol.exitcodes``),
the settings both sides read (``nkat.protocol.settings``) and ZeroMQ's socket-monitor
frames (``nkat.protocol.monitor_events``).
No process logic; depends only on msgpack; never imports zmq, processes or cupy. The
write-ahead log is the supervisor's own storage and lives in ``nkat.supervisor.wal``.
"""

from nkat.protocol.messages import (
    CMD_OPS,
    DONE_ACK_SEQ,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Ack,
    Beat,
    Ckpt,
    Cmd,
    Done,
    Extend,
    Fail,
    Hello,
    Log,
    Message,
    ProtocolError,
    Resume,
    Welcome,
    canonical_json,
    decode,
    encode,
    result_digest,
    spec_hash,
    state_digest,
)

__all__ = [
    "CMD_OPS", "DONE_ACK_SEQ", "MESSAGE_TYPES", "PROTOCOL_VERSION", "Ack", "Beat", "Ckpt",
    "Cmd", "Done", "Extend", "Fail", "Hello", "Log", "Message", "ProtocolError", "Resume",
    "Welcome", "canonical_json", "decode", "encode", "result_digest", "spec_hash",
    "state_digest",
]
