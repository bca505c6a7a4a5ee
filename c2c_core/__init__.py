"""C2C timing workbench: a timed runner for Cache-to-Cache inference, its CLI and web app."""

__version__ = "0.1.0"
