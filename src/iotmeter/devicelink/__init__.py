"""The device channel: device credentials on the broker, configuration to devices, status back."""
