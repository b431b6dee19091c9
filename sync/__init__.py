"""MQTT sync (outbox pump, batch intake, acks, status). Specified in docs/protocol.md;
built by the sync issue. Nothing on the scan path imports it: offline is normal."""
