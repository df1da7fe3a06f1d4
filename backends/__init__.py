"""In-tree backend plugins. Each is registered through the ``glm_runtime.backends`` entry-point
group in pyproject.toml, exactly as a third-party package would register its own."""
