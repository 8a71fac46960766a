"""kitebus settings and Redis key names."""

from config.keys import Keys
from config.settings import Settings, SettingsError, load_client_timeout, load_settings

__all__ = ["Keys", "Settings", "SettingsError", "load_client_timeout", "load_settings"]
