"""Command-line programs (each module with a `main()`; see pyproject.toml [project.scripts])."""
