"""The offline teacher sweep: replay a window, race candidates by successive halving."""
