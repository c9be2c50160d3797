"""Benchmarks for aimx (``make bench``): inbound SMTP against Postfix, smtp-sink and an
aiosmtpd baseline, sending, listing and memory. Not part of ``make test``."""
