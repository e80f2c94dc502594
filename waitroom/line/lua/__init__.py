"""The Lua scripts of the waiting room (package data, loaded by :mod:`waitroom.line.scripts`)."""
