"""The Lua scripts of the waiting room (package data, loaded by :mod:`waitroom.scripts`)."""
