"""Central's narrowband receiver (DESIGN.md §5): BeiDou and PDT links and what gateways send by
radio while IP is down."""
