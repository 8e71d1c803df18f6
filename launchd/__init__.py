"""The LaunchAgent template, shipped as package data (see daemon/launchagent.py)."""
