"""The contract between a RadFed node and the coordinator.

Everything both sides must agree on lives here and nowhere else: wire models,
protocol version, the de-identification profile (the standard's table, our
keep-list and the options), and later the PHI scanner. This package imports
nothing of RadFed's: ``node`` and ``coordinator`` import it, never each other.
"""
