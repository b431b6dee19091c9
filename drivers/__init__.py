"""Scanner inputs. Each driver frames a device's bytes into `cards.scan.Scan` values."""
