"""叫应 terminals on this gateway (DESIGN.md §7): the driver of each configured terminal
(`link`), its lines (`line`: TCP or serial), the ledger of warnings and events (`ledger`),
the service that plays warnings and records receipts and acks in the outbox (`service`), and
the local rule that plays a warning by itself while the gateway is cut off (`local_rule`)."""
