"""The datasets of the robustness suite, by short name (no imports: the command line's help reads them)."""

DATASETS = ("a", "r", "sketch", "c")
