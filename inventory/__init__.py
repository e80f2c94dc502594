"""Tickets: the event catalogue, and the per-event inventory actors that hold and sell them."""
