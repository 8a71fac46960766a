"""Kite's formats: binary tick frames (``codec``), text messages (``messages``), and the
instruments dump with symbols in requests (``instruments``).

Pure code beneath the publisher, the simulator and the consumers, which all speak it.
"""
