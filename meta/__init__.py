"""The meta-block grammar (DESIGN §7), shared by every domain package: the lowest domain layer, it imports
nothing of the project."""
