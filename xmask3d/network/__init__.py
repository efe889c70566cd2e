"""The XMask3D network: its modules, configuration and losses (imports storage and preprocessing only)."""
