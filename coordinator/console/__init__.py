"""The operator console (`lethe tui`): the fleet, the arrival groups, the shared model and
every deletion request, live. `view` is the plain data and its rules, `source` reads the
stores into it, `app` draws it with Textual."""
