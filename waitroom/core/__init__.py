"""The foundation: settings, errors, Redis key names, clients, logs and HTTP plumbing.

Nothing here imports the rest of waitroom (a test walks the imports to keep it so).
"""
