"""twistd plugin: ``twistd aimx-verifier`` runs the port-25 verifier service."""

from twisted.application.service import ServiceMaker

aimx_verifier = ServiceMaker(
    "aimx-verifier",
    "aimx.ops.verifier",
    "port-25 verifier for aimx setup and portcheck (/health, /probe, SMTP responder)",
    "aimx-verifier",
)
