"""Identities (DESIGN.md §8): the gateways' certificate authority, enrolment and revocation
(`ca`, `enrolment_store`, `enrolment`, `enrolment_api`, `broker_config`, `pki_cli`)."""
