"""The daemon: the service, the socket API and its protocol, hooks and sending."""
