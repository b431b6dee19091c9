"""The redeemd service: config, CLI, redemption engine and the run loop."""
