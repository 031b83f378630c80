"""The `mailtresor` command: main.py builds its parser from one module per
command group (COMMAND_MODULES) and runs the command; client.py speaks to
the daemon's API socket for the commands the daemon answers."""
