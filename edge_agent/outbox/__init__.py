"""The edge outbox (DESIGN.md §4): every record is committed here before it may travel; lanes,
seqs, the disk budget, the full-disk ring and upkeep."""
