"""Alarm rules at the edge (DESIGN.md §7): the pure rule engine, its configuration, the alarm
store on disk, and the wiring between pollers and the outbox."""
