"""The applications people use an LLM for: assistant, knowledge base, writer, creative, analysis.

Each app is a set of plain Python functions taking a loaded `muse.Model` (and a `muse.store.Store`
where it keeps things). Apps reach the model only through the generation API; the CLI and the
server are thin layers over these functions.
"""
