"""Test tools for the WAL (like etcd's ``wal/testing``): a file layer that records every
write, sync, rename and unlink (``recording``), and the crash-state checker built on it
(``crashcheck``). Not part of the WAL's public exports; tests and tools/ import them."""
