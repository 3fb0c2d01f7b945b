"""The Textual admin console; it talks to the appliance only through the admin HTTP API."""
