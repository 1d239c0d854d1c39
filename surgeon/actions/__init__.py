"""Built-in actions. Each registers through the `surgeon.actions` entry-point group, exactly
like a third-party plugin (see pyproject.toml)."""
