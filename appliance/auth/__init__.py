"""API keys, roles and the principal a request acts as."""

from appliance.auth.keys import KeyRecord, KeyService, NewKey, load_or_create_server_secret
from appliance.auth.principal import Principal, Role, local_admin

__all__ = ["KeyRecord", "KeyService", "NewKey", "Principal", "Role", "load_or_create_server_secret", "local_admin"]
