"""A copy of the plugin that cannot be imported."""

from appliance_sample_plugin import no_such_name  # noqa: F401  (ImportError on purpose)
