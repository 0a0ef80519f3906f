"""Conversion, validation and bundles (edgekd.export). Importing this package imports no heavy library."""
