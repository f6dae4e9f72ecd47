"""Built-in component kinds; each sub-package is one kind, registered by entry point."""
