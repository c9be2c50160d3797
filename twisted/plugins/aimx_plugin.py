"""twistd plugin: ``twistd aimx`` runs the aimx mail daemon."""

from twisted.application.service import ServiceMaker

aimx = ServiceMaker(
    "aimx",
    "aimx.daemon.service",
    "aimx mail server for AI agents (SMTP inbound, socket API, hooks, sending)",
    "aimx",
)
