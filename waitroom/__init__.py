"""waitroom: a virtual waiting room and queue engine for ticket flash sales."""
