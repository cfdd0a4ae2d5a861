"""Operator commands: the command line and what it shows (status, logs, report, metrics,
the systemd unit). They read a run's files or ask its live supervisor over the control
socket; none of them drives the run loop (docs/architecture.md)."""
