"""Layer 0 of the harness: errors, argument checks, console output, atomic files, the registry type.

Imports nothing else of the project; every other module may import it.
"""
