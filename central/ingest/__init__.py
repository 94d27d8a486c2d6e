"""MQTT ingest (DESIGN.md §4.3, §9): subscribe, validate, store, then ack; what is refused is
counted."""
