"""evaluation subpackage."""
