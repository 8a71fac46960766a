"""Kite's ticker wire format: binary tick frames (``codec``) and text messages (``messages``).

Pure code beneath the publisher, the simulator and the consumers, which all speak it.
"""
