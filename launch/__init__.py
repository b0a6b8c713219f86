"""The user's side of civetta: the command line, experiment configs, the MPI launcher."""
