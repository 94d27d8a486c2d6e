"""I/O plumbing that both daemons need and neither owns (DESIGN.md §2): logging set-up, the
single-thread SQLite owner, the serial line reader, the MQTT session with reconnect and
back-off, supervised tasks. It may import `protocols` and third-party libraries only."""
