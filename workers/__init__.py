"""Background work: the payment pool, the outbox relay, the hold safety net, the mock provider."""
