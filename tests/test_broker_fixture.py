"""The test broker is real: a paho client can publish through it, and it can be
stopped and restarted on the same port."""

from __future__ import annotations

import queue

import paho.mqtt.client as mqtt
from broker import broker  # noqa: F401  (fixture)


def _client(port: int, inbox: queue.Queue) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: inbox.put((m.topic, m.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_broker_delivers_and_survives_a_restart(broker):  # noqa: F811
    inbox: queue.Queue = queue.Queue()
    client = _client(broker.port, inbox)
    client.subscribe("t/#", qos=1)
    client.publish("t/r", b"kept", qos=1, retain=True).wait_for_publish(10)
    assert inbox.get(timeout=10) == ("t/r", b"kept")
    client.loop_stop()
    client.disconnect()
    broker.restart()  # persistence on: the retained message survives
    client = _client(broker.port, inbox)
    client.subscribe("t/#", qos=1)
    assert inbox.get(timeout=10) == ("t/r", b"kept")
    client.loop_stop()
    client.disconnect()
