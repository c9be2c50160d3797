"""SMTP: the inbound server and ingest pipeline, outbound delivery, email authentication, DNS."""
