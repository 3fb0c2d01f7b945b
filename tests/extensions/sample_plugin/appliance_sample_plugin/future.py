"""A plugin written for a hookspec this appliance does not have."""

from appliance.hookspecs import hookimpl

APPLIANCE_HOOKSPEC = "2.0"


@hookimpl
def prepare_request(request, principal):
    raise AssertionError("an incompatible plugin must never be called")
