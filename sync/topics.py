"""The MQTT topic tree of one box (docs/protocol.md section 16).

>>> t = Topics("redeemd/v1", "demo", "box-1")
>>> t.events
'redeemd/v1/demo/box/box-1/events'
>>> t.grants
'redeemd/v1/demo/box/box-1/grants'
>>> t.batch_seq("redeemd/v1/demo/box/box-1/batches/7")
7
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str
    merchant: str
    box: str

    @property
    def merchant_root(self) -> str:
        return f"{self.prefix}/{self.merchant}"

    @property
    def box_root(self) -> str:
        return f"{self.merchant_root}/box/{self.box}"

    @property
    def manifest(self) -> str:
        return f"{self.merchant_root}/manifest"

    @property
    def batches(self) -> str:
        """Subscription filter for batches published to every box of the merchant."""
        return f"{self.merchant_root}/batches/+"

    @property
    def box_batches(self) -> str:
        """Subscription filter for resent batches answering this box's requests."""
        return f"{self.box_root}/batches/+"

    @property
    def request(self) -> str:
        return f"{self.box_root}/request"

    @property
    def events(self) -> str:
        return f"{self.box_root}/events"

    @property
    def ack(self) -> str:
        return f"{self.box_root}/ack"

    @property
    def status(self) -> str:
        return f"{self.box_root}/status"

    @property
    def grants(self) -> str:
        """The box's dispensing grant set, retained by the backend (protocol.md 16, 18)."""
        return f"{self.box_root}/grants"

    def subscriptions(self) -> list[str]:
        return [self.manifest, self.batches, self.box_batches, self.ack, self.grants]

    def batch_seq(self, topic: str) -> int | None:
        """The sequence named by a batches topic, or None if `topic` is not one."""
        for root in (self.merchant_root, self.box_root):
            head = f"{root}/batches/"
            if topic.startswith(head):
                tail = topic[len(head) :]
                if tail.isdigit() and tail.isascii() and len(tail) <= 19:
                    return int(tail)
                return None
        return None
