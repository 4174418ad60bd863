"""The built-in criteria's names as error messages list them (sorted), for the tests that match those messages."""

REGISTERED = r"\(fraction, global, nm, std, structured_fraction, structured_global, structured_std\)"
