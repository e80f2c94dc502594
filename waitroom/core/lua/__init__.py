"""The foundation's Lua scripts (package data, loaded by :mod:`waitroom.core.lua_scripts`)."""
