"""Central's alarms (DESIGN.md §7): the transition engine, central's own rules, the lifecycle
values, the duty desk's operations and their HTTP API."""
