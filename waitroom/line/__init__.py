"""The waiting line: rooms in Redis, identities, the lottery, ETAs and the live broadcast."""
