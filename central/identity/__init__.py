"""People and trust (DESIGN.md §8): users, sessions, authorisation, the audit log."""
