"""I/O plumbing that both daemons need and neither owns (DESIGN.md §2): logging set-up
(`runtime.logs`), the single-thread SQLite owner and its migrations (`runtime.sqlite`), the
serial line reader (`runtime.serial`), supervised tasks with restart back-off
(`runtime.tasks`) and Prometheus metric families from plain numbers (`runtime.metrics`). It
may import `protocols` only; `edge_agent`, `central` and `firmware_stubs` may import it."""
