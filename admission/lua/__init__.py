"""The admission controller's Lua scripts (package data, loaded by :mod:`admission.leader`)."""
