"""Running as a service: systemd notify, health endpoint, reload, rates."""
