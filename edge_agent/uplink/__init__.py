"""The MQTT uplink (DESIGN.md §4): draining the outbox to central, pacing the backlog, the birth
inventory, the `[mqtt]` config and the gateway's enrolment (§8)."""
