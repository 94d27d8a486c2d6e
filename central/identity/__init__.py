"""Identities and trust (DESIGN.md §8).

Gateways: the certificate authority, enrolment and revocation (`ca`, `enrolment_store`,
`enrolment`, `enrolment_api`, `broker_config`, `pki_cli`). People: users, sessions,
authorisation and the audit log (`users`, `sessions`, `authz`, `accounts`, `audit`, `cli`).
"""
