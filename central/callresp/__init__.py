"""叫应 (call and respond), central's workflow (DESIGN.md §7): warnings, their targets and
durable timers, the directory of terminals, groups and responsible persons, statistics, API.

- `settings`: per-level deadlines, re-sends, scheduler tick (`[central.callresp]`).
- `schema`: the tables, under their own version table (`callresp_schema_version`).
- `directory`: terminals, groups, persons (who is in charge of which area).
- `workflow`: the transitions as portable SQL programs, each in one transaction with its
  audit rows: create a warning, fire what is due (re-send / escalate), apply receipts and acks.
- `service`: the scheduler loop, the issuing of `play_warning` commands, the ingest hook.
- `stats`, `api`: statistics and the HTTP routes.
"""
