"""The `mailtresor` command: its parser and commands (main)."""
