"""nkat.protocol: the shared language of supervisor and worker.

Two parts, no process logic: the wire messages (``nkat.protocol.messages``) and the
write-ahead log format, writer and recovery (``nkat.protocol.wal``). Depends only on
msgpack and a CRC32C library; never imports zmq, processes or cupy.
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
