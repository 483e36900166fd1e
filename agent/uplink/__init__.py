"""Upstream delivery: the SQLite outbox, the cloud MQTT client, message bodies."""
