"""Applications built on the library: the ``trprompt`` CLI, the demo, its report and paired statistics."""
