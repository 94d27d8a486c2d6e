"""The narrowband fallback (DESIGN.md §5, 三断): alarms and a heartbeat by BeiDou / 370 MHz
while IP is down; the bearers are in `edge_agent.bearers`."""
